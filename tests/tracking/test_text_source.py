"""Your own text at an MLflow artifact URI: downloaded by the tracking layer, hashed by content."""
from __future__ import annotations

import mlflow
import pytest

from ticketsmith.base.config import load_config
from ticketsmith.base.errors import DataError
from ticketsmith.cli import main
from ticketsmith.tracking.text_source import resolve_text_source


@pytest.fixture
def logged_corpus(sqlite_uri, tmp_path):
    """A folder of 12 text files logged as the artifact `corpus` of a real run."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"d{i:02d}.txt").write_text(f"document {i}\n" * (i + 1))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="corpus")
    return folder, f"runs:/{run.info.run_id}/corpus"


def test_a_runs_uri_is_downloaded_and_hashed_like_the_local_folder(logged_corpus, tmp_path, capsys):
    folder, uri = logged_corpus
    cfg = load_config(None, ["data.name=text", f"data.path={uri}", f"data.root={tmp_path / 'data'}"])
    resolved = resolve_text_source(cfg)
    assert resolved.data.path.startswith(str(tmp_path / "data" / "text-download"))
    assert resolved.hash() == load_config(None, ["data.name=text", f"data.path={folder}"]).hash()
    assert main(["data", "--set", "data.name=text", "--set", f"data.path={uri}",
                 "--set", f"data.root={tmp_path / 'data'}"]) == 0
    assert "train   10 documents" in capsys.readouterr().out


def test_a_missing_artifact_is_bad_input_naming_the_uri(logged_corpus, tmp_path):
    _, uri = logged_corpus
    cfg = load_config(None, ["data.name=text", f"data.path={uri}-typo", f"data.root={tmp_path}"])
    with pytest.raises(DataError, match=r"data.path: cannot download runs:/\w+/corpus-typo"):
        resolve_text_source(cfg)
