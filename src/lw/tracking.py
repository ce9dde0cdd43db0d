"""MLflow: one run per job (a child of the sweep's parent run under ``-m``), per-layer values
with ``step = layer index``, the results table, per-prompt values and figures as artifacts.

Credentials for a shared server come only from MLflow's own environment variables
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN); they are never
part of the config, so never logged as params or written to files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lw.config import LwError, TrackingConfig
from lw.models import PROJECT_ROOT
from lw.perturb import perturbation_tags
from lw.resume import HASH_TAG, KEY_TAG, SWEEP_PID_ENV, Heartbeat, owner_tags, reap
from lw.server_app import runs_link


def telemetry_off(env=os.environ) -> None:
    """MLflow 3.17's telemetry thread, offline, deletes an environment variable while requests
    reads the environment (a log-batch then fails with '_MLFLOW_TELEMETRY_SESSION_ID'): off in
    lw's processes unless the user set either switch."""
    if "MLFLOW_DISABLE_TELEMETRY" not in env and "DO_NOT_TRACK" not in env:
        env["MLFLOW_DISABLE_TELEMETRY"] = env["DO_NOT_TRACK"] = "true"


telemetry_off()  # before any MLflow client exists (lw imports mlflow lazily, after this)

PARENT_ENV = "LW_PARENT_RUN_ID"
PARAM_LIMIT = 6000  # MLflow's longest param value
DEPTH_PREFIX = "depth/"  # per-layer curves again, keyed by depth per-mille (log_result)


def tracking_uri(cfg: TrackingConfig) -> str:
    """The store's URI; the default SQLite file is absolute, whatever Hydra's cwd is."""
    if cfg.uri:
        return cfg.uri
    (PROJECT_ROOT / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{PROJECT_ROOT / 'mlruns' / 'mlflow.db'}"


def artifact_location(cfg: TrackingConfig) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (by default
    <project>/mlruns/artifacts); a server decides for itself."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if cfg.uri and not cfg.uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri(cfg)[len("sqlite:///"):]).resolve()
    return (database.parent / "artifacts").as_uri()


# A slow server is waited for, a dead one is not: a request may take up to 180 s (a busy server
# answering in 2 minutes fails nothing); a refused connection or a timeout is retried 4 times
# with exponential backoff (about 15 s in all when refused; at most 5 x 180 s + 15 s when every
# try times out). ServerWatch ends a job within DEAD_AFTER_S + PROBE_S of a server's death
# whatever step it is in. The user's own MLFLOW_HTTP_REQUEST_* settings win.
SERVER_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "180"}
PROBE_S = 3.0        # how often a job checks that its tracking server accepts connections
DEAD_AFTER_S = 12.0  # refused that long (several probes in a row): the server is dead


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
        # urllib3 logs a warning per retry; lw says in one line what failed (tracking_lost)
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=5).close()
        except OSError as error:
            raise LwError(f"tracking server {uri} is unreachable ({error}); start it, fix "
                          "tracking.uri, or use tracking=local") from None
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    # MLflow creates a new SQLite store's tables on first use, and two processes doing it at
    # once break it (`table _alembic_tmp_latest_metrics already exists`): one creates them
    # under a lock beside the database, the others then find them.
    with store_lock(cfg):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # the store (and its tables) exist now
    return client


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


def server_refuses(uri: str, timeout: float = 5.0) -> str | None:
    """Why the tracking server at ``uri`` is dead (connection refused or reset, host
    unreachable), or None: it accepts connections, or is only slow (a timeout), or the store
    is not a server."""
    url = urlparse(uri)
    if url.scheme not in ("http", "https"):
        return None
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https"
                                                             else 80)), timeout=timeout).close()
    except TimeoutError:
        return None
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


class TrackingLost(LwError):
    """The tracking server died while a job ran (ServerWatch)."""


class ServerWatch:
    """Ends the job once its tracking server has refused connections for ``dead_after``
    seconds, whatever the job is doing (a forward pass, a metric, an upload): a probe every
    ``every`` seconds from a daemon thread, then TrackingLost raised in the main thread. A
    slow server (probes time out, requests take minutes) is waited for."""

    def __init__(self, uri: str, every: float = PROBE_S, dead_after: float = DEAD_AFTER_S):
        self.uri, self.every, self.dead_after = uri, every, dead_after
        self.dead: str | None = None
        self.lock, self.stop_event = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="lw-server-watch")
        self.previous_handler = None

    def _watch(self) -> None:
        refused_since = None
        while not self.stop_event.wait(self.every):
            why = server_refuses(self.uri, timeout=self.every)
            if why is None:
                refused_since = None
                continue
            refused_since = refused_since or time.monotonic() - self.every
            if time.monotonic() - refused_since >= self.dead_after:
                with self.lock:
                    if not self.stop_event.is_set():
                        self.dead = why
                        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                return

    def _raise(self, *_) -> None:
        raise TrackingLost(f"tracking server {self.uri} is unreachable ({self.dead}) for "
                           f"{self.dead_after:.0f} s")

    def __enter__(self) -> ServerWatch:
        watched = urlparse(self.uri).scheme in ("http", "https")
        if watched and threading.current_thread() is threading.main_thread():
            self.previous_handler = signal.signal(signal.SIGUSR1, self._raise)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.stop_event.set()
        if self.previous_handler is not None:
            signal.signal(signal.SIGUSR1, self.previous_handler)


def is_connection_failure(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a tracking request that found no server."""
    import requests

    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, (TrackingLost, requests.exceptions.ConnectionError,
                              ConnectionRefusedError, ConnectionResetError)):
            return True
        text = str(error)
        if any(s in text for s in ("Max retries exceeded", "Connection refused",
                                    "Connection reset", "Connection aborted")):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def tracking_lost(error: BaseException, uri: str, folder: Path) -> LwError | None:
    """The one-line error for a job whose tracking server went away (None for other errors):
    the URI, and where the job's results are kept (lw.sync puts them in the store)."""
    if isinstance(error, LwError) and not isinstance(error, TrackingLost):
        return None  # already says what to do (client_for's unreachable server included)
    if not is_connection_failure(error) or server_refuses(uri) is None and \
            not isinstance(error, TrackingLost):
        return None
    results = Path(folder) / "results" / "table.csv"
    kept = (f"its results are kept in {folder}; `python -m lw.sync {folder}` logs them once "
            "the server is back" if results.exists() else
            "the job did not finish; run it again once the server is back")
    if isinstance(error, TrackingLost):
        return LwError(f"{error}: {kept}")
    return LwError(f"tracking server {uri} is unreachable "
                   f"({server_refuses(uri) or 'connection failed'}): {kept}")


def fail_run(client, run_id: str, error: BaseException, uri: str, folder: Path | None) -> None:
    """Mark the run FAILED with its error (tag ``lw.error``, artifact ``error.txt``), each
    step on its own, so that one failing (a full disk) does not leave the run RUNNING; on a
    dead server there is nothing to mark (lw.sync logs the kept results later)."""
    import traceback

    text = "".join(traceback.format_exception(error))
    if folder is not None:
        try:
            (Path(folder) / "error.txt").write_text(text)
        except OSError:
            pass
    if server_refuses(uri) is not None:
        return
    for step in (lambda: client.set_tag(run_id, "lw.error",
                                        f"{type(error).__name__}: {error}"[:5000]),
                 lambda: client.set_terminated(run_id, "FAILED"),
                 lambda: client.log_text(run_id, text, "error.txt")):
        try:
            step()
        except Exception:  # noqa: BLE001 - the next step may still get through
            pass


# The experiment kind MLflow documents for training runs. MLflow 3.17.2's UI ignores it: a
# feature flag compiled on makes the top-left "GenAI / Model training" switch decide the view
# (the URL's ?workflowType=, else the browser's localStorage `mlflow.workflowType_v1`, else
# GenAI), so a fresh browser lands on the GenAI overview. No tag or server option changes
# that; the links lw gives (README, `make ui`, `python -m lw.server`) end in
# `#/experiments/<id>?workflowType=machine_learning`.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Run colours in the UI's charts (tag mlflow.runColor): a fixed palette, the slot from a hash
# of the model name, so a model keeps its colour across sweeps (the UI's own colour comes
# from a hash of the run id: two models often share one).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#8C564B",
           "#F0E442", "#7F7F7F", "#000000")
SWEEP_MODELS_ENV = "LW_SWEEP_MODELS"   # the sweep's models, for colours that differ
SWEEP_VARIES_ENV = "LW_SWEEP_VARIES"   # the override keys the sweep varies, for run names


def run_colors(models: list[str]) -> dict[str, str]:
    """A colour per model: its hash's slot, or the next free one when a model of the same
    sweep took it (models in name order), so that up to len(PALETTE) models differ."""
    import hashlib

    taken: dict[str, str] = {}
    for model in sorted(set(models)):
        slot = int(hashlib.sha256(model.encode()).hexdigest(), 16) % len(PALETTE)
        for step in range(len(PALETTE)):
            color = PALETTE[(slot + step) % len(PALETTE)]
            if color not in taken.values():
                break
        else:
            color = PALETTE[slot]
        taken[model] = color
    return taken


def run_color(model: str) -> str:
    models = [m for m in os.environ.get(SWEEP_MODELS_ENV, "").split(",") if m]
    return run_colors([*models, model])[model]


def sweep_values(config: DictConfig) -> dict[str, list[str]]:
    """The sweep's varied overrides, key -> values (command line and the sweeper's params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = list(config.hydra.overrides.task)
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    lines += [f"{key}={value}" for key, value in params.items()]
    varied: dict[str, list[str]] = {}
    parser = OverridesParser.create()
    for line in lines:
        try:  # names only: a sweep form without a list of values (interval) is left out
            override = parser.parse_override(line)
            if override.is_sweep_override():
                key = override.get_key_element().lstrip("+~")
                varied[key] = [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # noqa: BLE001, S112
            continue
    return varied


def run_user(uri: str) -> str:
    """Who logs: the tracking username on a server (MLflow shows it as "Created by"), else the
    local user."""
    import getpass

    if uri.startswith(("http://", "https://")) and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return os.environ["MLFLOW_TRACKING_USERNAME"]
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        return "unknown"


def source_tags(uri: str) -> dict[str, str]:
    return {"mlflow.user": run_user(uri), "mlflow.source.name": "lw.run",
            "mlflow.source.type": "LOCAL"}


def experiment_id(client, cfg: TrackingConfig) -> str:
    found = client.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg),
                                        tags=EXPERIMENT_KIND)
    except Exception:  # another job of the sweep created it first
        return client.get_experiment_by_name(cfg.experiment).experiment_id


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"model.name": "smollm2", ...} for every leaf of a nested dict."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(tree)[:PARAM_LIMIT]}


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lw_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lw")
    except PackageNotFoundError:
        return "unknown"


def start_job_run(client, cfg: DictConfig, run_name: str, overrides: list[str],
                  job_hash: str, identity: dict | None = None, job_key: str = "",
                  folder: Path | None = None, experiment: str | None = None) -> str:
    """Create the job's run (a child when a sweep's parent exists) with params and tags,
    its ``lw.job_hash`` and its owner (lw.resume: host, pid, heartbeat); the identity the
    hash was taken of goes to ``config/identity.json``, its resolved commits to tags. With
    ``folder`` (the job's Hydra folder), what the run is made of is written there first
    (``config/``, ``lw_run.json``: what lw.sync needs). A failure after the run exists leaves
    it FAILED. ``experiment``: its id where the caller has looked it up (one request less)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    tracking = _tracking(cfg)
    exp = experiment or experiment_id(client, tracking)
    tags = {
        HASH_TAG: job_hash, **owner_tags(),
        "lw.model": cfg.model.name, "lw.model.id": cfg.model.id,
        "lw.model.family": cfg.model.family, "lw.model.revision": cfg.model.revision,
        "lw.data": cfg.data.name, **perturbation_tags(cfg.perturbation),
        "lw.skip_first": str(cfg.extraction.skip_first), "lw.seed": str(cfg.seed),
        "lw.version": lw_version(), "lw.git_commit": git_commit(),
        "lw.overrides": " ".join(overrides)[:PARAM_LIMIT],
        **identity_tags(identity or {}, job_key),
        "mlflow.runColor": run_color(cfg.model.name), **source_tags(client.tracking_uri),
    }
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    params = flatten(container)
    folder = Path(folder or tempfile.mkdtemp(prefix="lw-job-"))
    write_config(cfg, overrides, folder, identity)
    record = {"run_name": run_name, "experiment": tracking.experiment,
              "tracking_uri": tracking_uri(tracking), "job_hash": job_hash,
              "tags": tags, "params": params}
    write_record(folder, record)
    run = client.create_run(exp, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    write_record(folder, {**record, "run_id": run_id})
    try:
        from mlflow.entities import Param

        params_list = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(params_list), 100):  # MLflow: at most 100 params per batch
            client.log_batch(run_id, params=params_list[start:start + 100])
        upload_files(client, run_id, folder, ["config"])
    except BaseException as error:
        fail_run(client, run_id, error, tracking_uri(tracking), folder)
        raise
    return run_id


RUN_FILE = "lw_run.json"  # in the job folder: the run's name, params, tags and id (lw.sync)


def write_config(cfg: DictConfig, overrides: list[str], folder: Path,
                 identity: dict | None = None) -> None:
    (folder / "config").mkdir(parents=True, exist_ok=True)
    (folder / "config" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (folder / "config" / "overrides.yaml").write_text(
        "\n".join(f"- {o}" for o in overrides) + "\n")
    if identity is not None:
        (folder / "config" / IDENTITY_FILE).write_text(
            json.dumps(identity, indent=2, default=str))


def read_record(folder: Path) -> dict:
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(folder: Path, record: dict) -> None:
    """lw_run.json, replaced whole (a reader never sees half of it)."""
    path = Path(folder) / RUN_FILE
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(record, indent=1))
    part.replace(path)


def save_job_files(result, figures: dict[str, Any], extra_tags: dict[str, str],
                   folder: Path) -> None:
    """Everything the run will hold, in the job's folder, before any of it goes to the store:
    results/ (table.csv, table.json, per_prompt.parquet, model.json, summary.json), figures/
    and the result tags (lw_run.json)."""
    import matplotlib.pyplot as plt

    folder = Path(folder)
    save_result_files(result, folder / "results")
    (folder / "figures").mkdir(exist_ok=True)
    for name, figure in figures.items():
        figure.savefig(folder / "figures" / f"{name}.png")
        plt.close(figure)
    tags = {**extra_tags, **result.tags,
            **{f"lw.model.{k}": str(v) for k, v in result.info.as_dict().items()},
            # what MlflowClient.log_table records: the UI shows table.json as a table
            LOGGED_ARTIFACTS: json.dumps([{"path": "results/table.json", "type": "table"}])}
    record = read_record(folder)
    write_record(folder, {**record, "result_tags": tags, "logged_at": int(time.time() * 1000)})


LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"


def result_metrics(folder: Path, timestamp: int) -> list:
    """The run's metric points, read back from the job folder's table.csv (full float
    precision) and summary.json: per-layer curves (step = layer), the same curves over
    relative depth (``depth/<name>``, step = depth in per-mille, 0 = embeddings, 1000 = last
    layer: models of different depths overlay in the MLflow UI) and the summaries."""
    import pandas as pd
    from mlflow.entities import Metric

    results = Path(folder) / "results"
    table = pd.read_csv(results / "table.csv", float_precision="round_trip")
    n_layers = json.loads((results / "model.json").read_text())["n_layers"]
    summary = json.loads((results / "summary.json").read_text())
    metrics = []
    layers = table["layer"].astype(int)
    per_mille = (1000 * layers / n_layers).round().astype(int)
    for column in table.columns:
        if column in ("layer", "depth_pct") or not pd.api.types.is_numeric_dtype(table[column]):
            continue
        for layer, depth, value in zip(layers, per_mille, table[column], strict=True):
            metrics.append(Metric(column, float(value), timestamp, int(layer)))
            metrics.append(Metric(f"{DEPTH_PREFIX}{column}", float(value), timestamp, int(depth)))
    metrics += [Metric(k, float(v), timestamp, 0) for k, v in summary.items()]
    return metrics


def upload_job(client, run_id: str, folder: Path,
               subfolders: tuple[str, ...] = ("results", "figures")) -> None:
    """Put a job folder's results into its run: metric points and result tags in batches
    (points carry the folder's timestamp, so logging them again adds no point), then the
    files of ``subfolders`` (several uploads at once; config/ went up with the run's start)."""
    from mlflow.entities import RunTag

    folder = Path(folder)
    record = read_record(folder)
    metrics = result_metrics(folder, record["logged_at"])
    tags = [RunTag(k, str(v)) for k, v in record["result_tags"].items()]
    # MLflow's limits per batch: 1000 entities in all, at most 100 of them tags
    metric_batches = [metrics[i:i + 900] for i in range(0, len(metrics), 900)]
    tag_batches = [tags[i:i + 100] for i in range(0, len(tags), 100)]
    for i in range(max(len(metric_batches), len(tag_batches))):
        client.log_batch(run_id, metrics=metric_batches[i] if i < len(metric_batches) else [],
                         tags=tag_batches[i] if i < len(tag_batches) else [])
    upload_files(client, run_id, folder, list(subfolders))


def upload_files(client, run_id: str, folder: Path, subfolders: list[str]) -> None:
    """Every file of ``folder/<sub>`` as the run's artifact ``<sub>/...``, a few at once (a
    slow server costs one round trip, not one per file)."""
    from concurrent.futures import ThreadPoolExecutor

    files = [(path, str(path.parent.relative_to(folder)))
             for sub in subfolders for path in sorted((Path(folder) / sub).rglob("*"))
             if path.is_file()]
    if not files:
        return
    with ThreadPoolExecutor(min(8, len(files))) as pool:
        list(pool.map(lambda item: client.log_artifact(run_id, str(item[0]), item[1]), files))


IDENTITY_FILE = "identity.json"  # artifact config/identity.json: what lw.job_hash was taken of


def identity_tags(identity: dict, job_key: str) -> dict[str, str]:
    """``lw.job_key``, and the commits a hub model's / data set's revision resolved to."""
    tags = {KEY_TAG: job_key} if job_key else {}
    if commit := identity.get("model", {}).get("weights", {}).get("commit"):
        tags["lw.model.commit"] = commit
    if commit := identity.get("data", {}).get("commit"):
        tags["lw.data.commit"] = commit
    return tags


def log_result(client, run_id: str, result, figures: dict[str, Any],
               extra_tags: dict[str, str], folder: Path | None = None) -> None:
    """A finished job's files written to ``folder`` (its Hydra folder), then put in its run."""
    folder = Path(folder or tempfile.mkdtemp(prefix="lw-job-"))
    save_job_files(result, figures, extra_tags, folder)
    upload_job(client, run_id, folder)


def save_result_files(result, folder: Path) -> None:
    """The results table (CSV, and JSON as MlflowClient.log_table writes it), per-prompt
    values (parquet), model description and summaries (JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(folder / "table.csv", index=False)
    result.table.to_json(folder / "table.json", orient="split", index=False, date_format="iso")
    result.per_prompt.to_parquet(folder / "per_prompt.parquet", index=False)
    (folder / "model.json").write_text(json.dumps(result.info.as_dict(), indent=2))
    (folder / "summary.json").write_text(json.dumps(result.summary, indent=2))
    for name, table in getattr(result, "tables", {}).items():  # a metric's own tables (cka)
        table.to_csv(folder / f"{name}.csv", index=False)


def _tracking(cfg: DictConfig) -> TrackingConfig:
    return TrackingConfig(**OmegaConf.to_container(cfg.tracking, resolve=True))


# Jobs of this sweep that failed, kept in the process (Hydra's basic launcher runs every job
# here), so that the exit status is right even when MLflow itself was what failed.
FAILED_JOBS: list[str] = []
# The same, and the jobs skipped as already done, as files in each job's folder: jobs of the
# joblib and submitit launchers run in other processes (or on other machines).
FAILED_FILE, SKIPPED_FILE = "lw_failed.txt", "lw_skipped.txt"


def record_failure(line: str, output_dir: str | Path) -> None:
    FAILED_JOBS.append(line)
    try:
        (Path(output_dir) / FAILED_FILE).write_text(line + "\n")
    except OSError:  # a read-only or full folder: this process still counts it
        pass


def _close_parent_at_exit(config: DictConfig) -> None:
    """A sweep that stopped before on_multirun_end (Hydra calls it only when every job could
    be launched: a read-only sweep folder stops it earlier) leaves its parent FAILED, not
    RUNNING."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None:
        return
    while _PARENT_HEARTBEAT:
        _PARENT_HEARTBEAT.pop().stop()
    tracking = _tracking(config)
    try:
        client = client_for(tracking)
        error = RuntimeError("the sweep stopped before all its jobs were launched and "
                             "reported (see its output)")
        fail_run(client, parent, error, tracking_uri(tracking), None)
    except Exception:  # noqa: BLE001 - at exit: the store is what failed
        pass


def _job_files(sweep_dir: str, name: str) -> list[str]:
    return sorted(p.read_text().strip() for p in Path(sweep_dir).rglob(name))


def short_value(key: str, value: str) -> str:
    """How a run name shows one varied override: a group's choice, a revision or a file as its
    value (a file's name), a knob as its last name and value (perturbation.p=0.5 -> p=0.5)."""
    value = Path(value).name if "/" in value else value  # a file: its name
    if "." not in key or key in ("model.revision", "data.revision", "data.path"):
        return value
    return f"{key.rsplit('.', 1)[-1]}={value}"


def sweep_name(varied: dict[str, list[str]], folder: str) -> str:
    """A parent run named after what the sweep varies: "sweep smollm2,minilm x wiki-vital"."""
    parts = []
    for key, values in varied.items():
        shown = [short_value(key, v) for v in values]
        if "=" in shown[0]:  # a knob: its name once, "p=0,0.5"
            shown = [shown[0]] + [v.split("=", 1)[1] for v in shown[1:]]
        parts.append(",".join(shown))
    return "sweep " + (" x ".join(parts)[:80] or folder)


# The sweep's parent run's heartbeat (lw.resume), from on_multirun_start to on_multirun_end.
_PARENT_HEARTBEAT: list[Heartbeat] = []


class ParentRunCallback(Callback):
    """Under ``-m``, one parent run holds the sweep's jobs as children; the sweep exits 1 when
    any job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lw.distributed import current_ranks

        if not current_ranks().is_main:  # one parent per sweep, however many ranks
            return
        sweep_dir = str(config.hydra.sweep.dir)
        for name in (FAILED_FILE, SKIPPED_FILE):  # a re-run into the same sweep folder
            for old in Path(sweep_dir).rglob(name):
                old.unlink()
        tracking = _tracking(config)
        client = client_for(tracking)
        experiment = experiment_id(client, tracking)
        # a killed earlier sweep's parent and children: KILLED, not RUNNING forever
        reap(client, experiment, f"sweep {sweep_dir}")
        varied = sweep_values(config)
        os.environ[SWEEP_MODELS_ENV] = ",".join(varied.get("model", []))
        os.environ[SWEEP_VARIES_ENV] = ",".join(varied)
        run = client.create_run(
            experiment, run_name=sweep_name(varied, Path(sweep_dir).name),
            tags={"lw.sweep_dir": sweep_dir, "lw.git_commit": git_commit(),
                  "lw.version": lw_version(), **owner_tags(), **source_tags(client.tracking_uri),
                  "lw.overrides": " ".join(config.hydra.overrides.task)[:PARAM_LIMIT]})
        os.environ[PARENT_ENV] = run.info.run_id
        os.environ[SWEEP_PID_ENV] = str(os.getpid())  # its workers die with it (lw.resume)
        print(f"[lw] sweep {run.info.run_id} started; its runs: "
              f"{runs_link(client.tracking_uri, experiment)}", flush=True)
        _PARENT_HEARTBEAT.append(Heartbeat(client, run.info.run_id).start())
        import atexit

        atexit.register(_close_parent_at_exit, config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lw.distributed import current_ranks

        parent = os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEEP_MODELS_ENV, None)
        os.environ.pop(SWEEP_VARIES_ENV, None)
        while _PARENT_HEARTBEAT:
            _PARENT_HEARTBEAT.pop().stop()
        failed_here, FAILED_JOBS[:] = list(FAILED_JOBS), []
        if not current_ranks().is_main:  # rank 0 reports; the others share its exit status
            if failed_here:
                raise SystemExit(1)
            return
        # what the jobs reported, wherever they ran (this process, joblib workers, submitit)
        sweep_dir = str(config.hydra.sweep.dir)
        failed_here = sorted(set(failed_here) | set(_job_files(sweep_dir, FAILED_FILE)))
        skipped = _job_files(sweep_dir, SKIPPED_FILE)
        try:
            if parent is None:
                raise LwError("no parent run")
            client = client_for(_tracking(config))
            children = client.search_runs(
                [client.get_run(parent).info.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=50000)
            # KILLED: its process was killed (scancel, a lost node: hydra_plugins.lw_launchers)
            failed = [r for r in children if r.info.status in ("FAILED", "KILLED")]
            # what the store holds: a run left RUNNING (its server died) is not finished
            unfinished = [r for r in children
                          if r.info.status not in ("FAILED", "KILLED", "FINISHED")]
            finished = len(children) - len(failed) - len(unfinished)
            client.set_tag(parent, "lw.jobs", str(len(children)))
            client.set_tag(parent, "lw.failed_jobs", str(len(failed) + len(unfinished)))
            client.set_tag(parent, "lw.skipped_jobs", str(len(skipped)))
            from lw.crossmodel import log_to_parent  # pairs of models that ran cka

            log_to_parent(client, parent, children)
            nothing_done = not finished and not skipped
            client.set_terminated(parent, "FAILED" if nothing_done and (children or failed_here)
                                  else "FINISHED")
        except Exception:  # noqa: BLE001 - tracking is what failed: say what the jobs reported
            for line in failed_here:
                print(f"[lw] FAILED job {line}")
            print(folders_line(sweep_dir, store_failed=True))
            if failed_here:
                raise SystemExit(1) from None
            return
        # jobs that failed before their run was opened (a bad value, a task killed before
        # it opened one) have no child run: their lines ("#<n> <overrides>: ...") say it
        covered = tuple(r.data.tags.get("lw.overrides", "") + ": " for r in failed + unfinished)
        uncovered = [line for line in failed_here
                     if not (covered and line.partition(" ")[2].startswith(covered))]
        total = len(children) + len(uncovered)
        elsewhere = [line for line in skipped if ": RUNNING in run" in line]  # lw.run
        print(f"[lw] sweep done: {finished} of {total} jobs "
              f"finished, {len(skipped) - len(elsewhere)} skipped (already FINISHED), "
              + (f"{len(elsewhere)} left to the launch running them, " if elsewhere else "")
              + f"MLflow parent run {parent} in {tracking_uri(_tracking(config))}; its runs: "
              f"{runs_link(client.tracking_uri, client.get_run(parent).info.experiment_id)}")
        for run in failed + unfinished:
            print(f"[lw] FAILED {run.info.run_name}: "
                  f"{run.data.tags.get('lw.error', run.info.status)}")
        for line in uncovered:
            print(f"[lw] FAILED job {line}")
        print(folders_line(sweep_dir, store_failed=bool(unfinished)))
        if failed or failed_here or unfinished:
            raise SystemExit(1)


def folders_line(sweep_dir: str, store_failed: bool) -> str:
    """The sweep's last line: where every job's files are (and how to log them later)."""
    line = f"[lw] every job's files (results/, figures/, config/) are in {sweep_dir}/<job #>/"
    if store_failed:
        line += (f"; the store lacks some: `python -m lw.sync {sweep_dir}` logs those once the "
                 "server is back")
    return line
