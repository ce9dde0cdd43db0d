"""The MLflow store: its URI, a client on it (after checking a server answers), the lock on a
local SQLite store, the experiment, and the UI's link to its runs.

Credentials for a shared server come only from MLflow's own environment variables
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN); they are never
part of the config, so never logged as params or written to files.
"""


from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from lw.config.tracking import TrackingConfig
from lw.errors import LwError
from lw.tracking.health import StoreUnreachable


def telemetry_off(env=os.environ) -> None:
    """MLflow 3.17's telemetry thread, offline, deletes an environment variable while requests
    reads the environment (a log-batch then fails with '_MLFLOW_TELEMETRY_SESSION_ID'): off in
    lw's processes unless the user set either switch."""
    if "MLFLOW_DISABLE_TELEMETRY" not in env and "DO_NOT_TRACK" not in env:
        env["MLFLOW_DISABLE_TELEMETRY"] = env["DO_NOT_TRACK"] = "true"


telemetry_off()  # before any MLflow client exists (lw imports mlflow lazily, after this)


def default_store_uri() -> str:
    """The store every lw command uses when none is named (tracking.uri, --uri, uri=): the
    environment's MLFLOW_TRACKING_URI, as in every MLflow tool, else the SQLite file
    mlruns/mlflow.db in the folder the command runs in (an absolute path)."""
    named = os.environ.get("MLFLOW_TRACKING_URI")
    if named:
        TrackingConfig(uri=named)  # its scheme checked, the error naming the value
        return named
    return f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def tracking_uri(cfg: TrackingConfig) -> str:
    """The store a job logs to: tracking.uri, else :func:`default_store_uri` (a local store's
    folder made here)."""
    uri = cfg.uri or default_store_uri()
    if not cfg.uri and uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(cfg: TrackingConfig) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (by default
    ./mlruns/artifacts); a server decides for itself."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if cfg.uri and not cfg.uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri(cfg)[len("sqlite:///"):]).resolve()
    return (database.parent / "artifacts").as_uri()


# A slow server is waited for, a dead one is not: a request may take up to 180 s (a busy server
# answering in 2 minutes fails nothing); a refused connection or a timeout is retried 4 times
# with exponential backoff (about 15 s in all when refused; at most 5 x 180 s + 15 s when every
# try times out). A server's death never interrupts a job's computation; at its end a job
# waits at most one refused request's retries (about 15 s) before it says its results are kept
# (lw.tracking.health). The user's own MLFLOW_HTTP_REQUEST_* settings win.
SERVER_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "180"}


def client_for(cfg: TrackingConfig):
    """An MlflowClient on the configured store, after checking a server answers at all (MLflow
    would otherwise retry for minutes before failing)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    url = urlparse(uri)
    if url.username or url.password:
        raise LwError(f"tracking.uri={url.scheme}://…@{url.hostname}: credentials in the URI "
                      "would be logged; set MLFLOW_TRACKING_USERNAME and "
                      "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    if url.scheme in ("http", "https"):
        # A server that dies mid-job would otherwise hold the job in MLflow's retries (7 with
        # exponential backoff: minutes); the user's own settings win.
        for name, value in SERVER_RETRIES.items():
            os.environ.setdefault(name, value)
        # urllib3 logs a warning per retry; lw says in one line what failed (results_kept)
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=5).close()
        except OSError as error:
            raise StoreUnreachable(f"tracking server {uri} is unreachable ({error}); start "
                                   "it, fix tracking.uri, or use tracking=local") from None
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    # MLflow creates a new SQLite store's tables on first use, and two processes doing it at
    # once break it (`table _alembic_tmp_latest_metrics already exists`): one creates them
    # under a lock beside the database, the others then find them.
    with store_lock(cfg):
        database = Path(uri[len("sqlite:///"):])
        if not database.exists():
            copy_empty_store(database)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # the store (and its tables) exist now
    return client


def copy_empty_store(database: Path) -> None:
    """A new SQLite store as a copy of an empty one that lw keeps in its cache per MLflow
    version: MLflow makes a store through its ~60 schema migrations, 1-2 s that were most of a
    small job's start. The copy's Default experiment then gets the artifact folder and times
    MLflow would have given it. Where the cache cannot be written, MLflow makes the store."""
    import shutil
    import sqlite3
    import tempfile
    import time

    import mlflow
    from mlflow.utils.uri import append_to_uri_path, resolve_uri_if_local

    from lw.loading.paths import cache_dir

    empty = cache_dir() / "mlflow-stores" / f"empty-{mlflow.__version__}.db"
    try:
        if not empty.exists():
            from mlflow.tracking import MlflowClient

            empty.parent.mkdir(parents=True, exist_ok=True)
            fd, made = tempfile.mkstemp(prefix=".empty-", suffix=".db", dir=empty.parent)
            os.close(fd)
            os.unlink(made)
            MlflowClient(f"sqlite:///{made}").search_experiments(max_results=1)
            os.replace(made, empty)  # atomic: another process's copy, if first, is the same
        shutil.copyfile(empty, database)
    except OSError:
        return
    now = int(time.time() * 1000)
    # MLflow's own default for a SQLite store's artifacts: ./mlruns where the store is opened
    default = append_to_uri_path(resolve_uri_if_local("./mlruns"), "0")
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                   "last_update_time = ? WHERE experiment_id = 0", (default, now, now))


@contextlib.contextmanager
def store_lock(cfg: TrackingConfig):
    """An exclusive lock on a local SQLite store (a file beside it: every process on this
    machine that writes there takes it); a server store has none (nothing is held). Yields
    whether a lock is held."""
    uri = tracking_uri(cfg)
    if not uri.startswith("sqlite:///"):
        yield False
        return
    import fcntl

    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# The experiment kind MLflow documents for training runs. MLflow 3.17.2's UI ignores it: a
# feature flag compiled on makes the top-left "GenAI / Model training" switch decide the view
# (the URL's ?workflowType=, else the browser's localStorage `mlflow.workflowType_v1`, else
# GenAI), so a fresh browser lands on the GenAI overview. No tag or server option changes
# that; the links lw gives (README, `make ui`, `python -m lw.server`) end in
# `#/experiments/<id>?workflowType=machine_learning`.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client, cfg: TrackingConfig) -> str:
    found = client.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg),
                                        tags=EXPERIMENT_KIND)
    except Exception:  # another job of the sweep created it first
        return client.get_experiment_by_name(cfg.experiment).experiment_id


def _tracking(cfg: DictConfig) -> TrackingConfig:
    return TrackingConfig(**OmegaConf.to_container(cfg.tracking, resolve=True))


RUNS_VIEW = "?workflowType=machine_learning"  # the UI's "Model training" view: the runs
LOCAL_UI = "http://127.0.0.1:5000"            # `make ui`'s address for the local store


def runs_link(uri: str, experiment: str) -> str:
    """The MLflow UI's runs view of an experiment: on the server itself, or `make ui`'s for a
    local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{experiment}{RUNS_VIEW}"
