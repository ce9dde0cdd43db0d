"""MLflow: one run per job (a child of the sweep's parent run under ``-m``), per-layer values
with ``step = layer index``, the results table, per-prompt values and figures as artifacts.

Credentials for a shared server come only from MLflow's own environment variables
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN); they are never
part of the config, so never logged as params or written to files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lw.config import LwError, TrackingConfig
from lw.models import PROJECT_ROOT
from lw.perturb import perturbation_tags
from lw.resume import HASH_TAG, Heartbeat, owner_tags, reap
from lw.server_app import runs_link

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


SERVER_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


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
    import fcntl

    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # the store (and its tables) exist now
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


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
                  job_hash: str) -> str:
    """Create the job's run (a child when a sweep's parent exists) with params and tags,
    its ``lw.job_hash`` and its owner (lw.resume: host, pid, heartbeat)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    exp = experiment_id(client, _tracking(cfg))
    tags = {
        HASH_TAG: job_hash, **owner_tags(),
        "lw.model": cfg.model.name, "lw.model.id": cfg.model.id,
        "lw.model.family": cfg.model.family, "lw.model.revision": cfg.model.revision,
        "lw.data": cfg.data.name, **perturbation_tags(cfg.perturbation),
        "lw.skip_first": str(cfg.extraction.skip_first), "lw.seed": str(cfg.seed),
        "lw.version": lw_version(), "lw.git_commit": git_commit(),
        "lw.overrides": " ".join(overrides)[:PARAM_LIMIT],
        "mlflow.runColor": run_color(cfg.model.name), **source_tags(client.tracking_uri),
    }
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp, run_name=run_name, tags=tags)
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in flatten(container).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (Path(tmp) / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides) + "\n")
        client.log_artifacts(run.info.run_id, tmp, artifact_path="config")
    return run.info.run_id


def log_result(client, run_id: str, result, figures: dict[str, Any],
               extra_tags: dict[str, str]) -> None:
    """Per-layer curves (step = layer), the same curves over relative depth (``depth/<name>``,
    step = depth in per-mille, 0 = embeddings, 1000 = last layer: models of different depths
    overlay in the MLflow UI), summaries, tables and figures of one finished job."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    layers = result.table["layer"].astype(int)
    per_mille = (1000 * layers / result.info.n_layers).round().astype(int)
    for column in result.table.columns:
        if column in ("layer", "depth_pct"):
            continue
        for layer, depth, value in zip(layers, per_mille, result.table[column], strict=True):
            metrics.append(Metric(column, float(value), now, int(layer)))
            metrics.append(Metric(f"{DEPTH_PREFIX}{column}", float(value), now, int(depth)))
    metrics += [Metric(k, float(v), now, 0) for k, v in result.summary.items()]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for key, value in {**extra_tags, **result.tags, **{f"lw.model.{k}": str(v)
                                        for k, v in result.info.as_dict().items()}}.items():
        client.set_tag(run_id, key, value)
    client.log_table(run_id, data=result.table, artifact_file="results/table.json")
    with tempfile.TemporaryDirectory() as tmp:
        save_result_files(result, Path(tmp))
        client.log_artifacts(run_id, tmp, artifact_path="results")
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"figures/{name}.png")


def save_result_files(result, folder: Path) -> None:
    """The results table (CSV), per-prompt values (parquet) and model description (JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(folder / "table.csv", index=False)
    result.per_prompt.to_parquet(folder / "per_prompt.parquet", index=False)
    (folder / "model.json").write_text(json.dumps(result.info.as_dict(), indent=2))
    (folder / "summary.json").write_text(json.dumps(result.summary, indent=2))


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
    (Path(output_dir) / FAILED_FILE).write_text(line + "\n")


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
        print(f"[lw] sweep {run.info.run_id} started; its runs: "
              f"{runs_link(client.tracking_uri, experiment)}", flush=True)
        _PARENT_HEARTBEAT.append(Heartbeat(client, run.info.run_id).start())

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
            failed = [r for r in children if r.info.status == "FAILED"]
            client.set_tag(parent, "lw.jobs", str(len(children)))
            client.set_tag(parent, "lw.failed_jobs", str(len(failed)))
            client.set_tag(parent, "lw.skipped_jobs", str(len(skipped)))
            client.set_terminated(parent, "FAILED" if failed and len(failed) == len(children)
                                  else "FINISHED")
        except Exception:  # noqa: BLE001 - tracking is what failed: say what the jobs reported
            for line in failed_here:
                print(f"[lw] FAILED job {line}")
            if failed_here:
                raise SystemExit(1) from None
            return
        # jobs that failed before their run was opened (a bad value) have no child run
        total = len(children) + max(0, len(failed_here) - len(failed))
        print(f"[lw] sweep done: {len(children) - len(failed)} of {total} jobs "
              f"finished, {len(skipped)} skipped (already FINISHED), MLflow parent run "
              f"{parent} in {tracking_uri(_tracking(config))}; its runs: "
              f"{runs_link(client.tracking_uri, client.get_run(parent).info.experiment_id)}")
        for run in failed:
            print(f"[lw] FAILED {run.info.run_name}: {run.data.tags.get('lw.error', '')}")
        if len(failed_here) > len(failed):  # some failed before their run was opened
            for line in failed_here:
                print(f"[lw] FAILED job {line}")
        if failed or failed_here:
            raise SystemExit(1)
