"""New SQLite tracking stores: complete when they appear, and quick to make.

MLflow builds a new SQLite store by running every Alembic migration since its first schema,
about 3 s of CPU here, once per store. The tables it ends with depend only on the installed
MLflow, so they are built once per MLflow version into a template in the user's cache and each
new store starts as a copy of it. MLflow's own constructor then opens the copy as it would any
store: it checks the schema is at its head revision and adds the default experiment with this
store's artifact root, so the result is the store MLflow would have built.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def template_dir() -> Path:
    """Where schema templates are kept: $TICKETSMITH_CACHE_DIR, else the XDG cache folder."""
    explicit = os.environ.get("TICKETSMITH_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ticketsmith"


def _template(mlflow_version: str) -> Path | None:
    """The migrated, empty schema of this MLflow version (built on first use); None when the
    cache cannot be written (a read-only home in a container): the store is then built in place."""
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

    path = template_dir() / f"mlflow-{mlflow_version}-schema.db"
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
        tmp.unlink(missing_ok=True)
        engine = create_sqlalchemy_engine(f"sqlite:///{tmp}")
        try:
            _initialize_tables(engine)  # tables and migrations only: no rows of any store
        finally:
            engine.dispose()
        os.replace(tmp, path)  # whole or absent, also when two processes race
    except OSError:
        return None
    return path


def import_store_modules(uri: str | None = None) -> None:
    """Import MLflow and, for a SQLite store, its SQLAlchemy stores (mappers, Alembic): about
    2 s of CPU that the first store call would otherwise pay, imported ahead by whoever has
    the time (the pipeline's import thread, the tracking process beside training)."""
    import mlflow

    if (uri or mlflow.get_tracking_uri()).startswith("sqlite:"):
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def prepare_store(uri: str | None = None) -> None:
    """Create a new SQLite tracking store all at once: it is made in a temporary file beside
    it, which is then linked into place. A kill while MLflow builds the tables of the store
    itself leaves a half-built schema that every later command refuses ("out-of-date database
    schema"); a killed temporary file is just left over. Other stores: nothing to do.
    """
    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):].split("?")[0])
    if path.exists() or path.name in ("", ":memory:"):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
    template = _template(mlflow.__version__)
    try:
        _create(tmp, template)
    except Exception:  # noqa: BLE001 - a template MLflow refuses (out of date, not SQLite)
        if template is None:
            raise
        # Dropped (the next store rebuilds it); this store is built by MLflow's migrations,
        # under another name: MLflow keeps an engine per URI, open on the refused copy.
        template.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.migrated.creating")
        _create(tmp, None)
    try:
        os.link(tmp, path)  # atomic, and never over a store another process just created
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _create(tmp: Path, template: Path | None) -> None:
    """A complete store at `tmp`: a copy of `template` (None: empty) opened by MLflow's own
    constructor, as the client would call it (same default artifact root)."""
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    tmp.unlink(missing_ok=True)
    if template is not None:
        shutil.copyfile(template, tmp)
    _get_sqlalchemy_store(f"sqlite:///{tmp}", None).engine.dispose()
