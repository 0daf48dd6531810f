"""Your own text at a URI the engine does not read (runs:/, models:/, a bucket, http): downloaded
here, through MLflow's artifact stores, so the engine only ever sees a local path."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ticketsmith.base.config import Config
from ticketsmith.base.errors import DataError, TrackingError
from ticketsmith.base.secrets import redact
from ticketsmith.base.textfiles import is_local


def resolve_text_source(cfg: Config) -> Config:
    """``cfg`` with ``data.path`` replaced by a local copy when it names a remote text source.

    The copy lives in ``<data.root>/text-download/<sha256 of the URI>/`` and is fetched again on
    every call (a bucket's content may change); the experiment hash covers the content, so it is
    the same as for the same files given by a local path.
    """
    uri = cfg.data.path
    if cfg.data.name != "text" or cfg.data.factory is not None or uri is None or is_local(uri):
        return cfg
    import mlflow
    from mlflow.exceptions import MlflowException

    dest = Path(cfg.data.root) / "text-download" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        staged = Path(tmp) / "staged"
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staged)))
        except MlflowException as e:  # no such run or artifact, a malformed URI: bad input
            raise DataError(f"data.path: cannot download {redact(uri)} ({_oneline(e)}); expected a "
                            "text file or folder of .txt files at that URI") from None
        except (OSError, ConnectionError) as e:
            raise TrackingError(f"data.path: cannot download {redact(uri)}: {_oneline(e)}") from None
        # Keep the name it has at the URI: a single file stays a file (its documents are named
        # after it), a folder stays a folder.
        inside = local.resolve().relative_to(staged.resolve())
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staged, dest)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(dest / inside)})})

def _oneline(exc: BaseException) -> str:
    return redact(" ".join(str(exc).split()))[:300]
