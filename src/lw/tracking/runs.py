"""Run creation: a job's MLflow run with its params, tags (identity, provenance, owner, colour)
and config files; colours and names of who logged."""


from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lw.loading.paths import checkout
from lw.tracking import sweep_state
from lw.tracking.health import fail_run
from lw.tracking.jobdir import upload_files, write_config, write_record
from lw.tracking.resume import HASH_TAG, KEY_TAG, owner_tags
from lw.tracking.store import _tracking, experiment_id, tracking_uri

PARAM_LIMIT = 6000  # MLflow's longest param value


# Run colours in the UI's charts (tag mlflow.runColor): a fixed palette, the slot from a hash
# of the model name, so a model keeps its colour across sweeps (the UI's own colour comes
# from a hash of the run id: two models often share one).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#8C564B",
           "#F0E442", "#7F7F7F", "#000000")


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
    return run_colors([*sweep_state.current().models, model])[model]


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


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"model.name": "smollm2", ...} for every leaf of a nested dict."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(tree)[:PARAM_LIMIT]}


def git_commit() -> str:
    """lw's commit (with -dirty) when it runs from its checkout; "unknown" when installed
    (its version says which release: lw_version)."""
    root = checkout()
    if root is None:
        return "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True,
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


def job_record(cfg: DictConfig, run_name: str, overrides: list[str], job_hash: str,
               identity: dict | None = None, job_key: str = "",
               folder: Path | None = None) -> tuple[Path, dict]:
    """What the job's run is made of (name, params, tags with its ``lw.job_hash`` and owner),
    written to ``folder`` (the job's Hydra folder) before any of it goes to the store:
    ``config/`` and ``lw_run.json``, without a run id (lw.sync logs it from there). Needs no
    store: a job whose server is away at its start computes with this record."""
    from lw.job.perturb import perturbation_tags  # torch: not on lw.sync's import path

    container = OmegaConf.to_container(cfg, resolve=True)
    tracking = _tracking(cfg)
    uri = tracking_uri(tracking)
    tags = {
        HASH_TAG: job_hash, **owner_tags(),
        "lw.model": cfg.model.name, "lw.model.id": cfg.model.id,
        "lw.model.family": cfg.model.family, "lw.model.revision": cfg.model.revision,
        "lw.data": cfg.data.name, **perturbation_tags(cfg.perturbation),
        "lw.skip_first": str(cfg.extraction.skip_first), "lw.seed": str(cfg.seed),
        "lw.version": lw_version(), "lw.git_commit": git_commit(),
        "lw.overrides": " ".join(overrides)[:PARAM_LIMIT],
        **identity_tags(identity or {}, job_key),
        "mlflow.runColor": run_color(cfg.model.name), **source_tags(uri),
    }
    sweep = sweep_state.current()
    if sweep.parent:
        tags["mlflow.parentRunId"] = sweep.parent
    same = sweep.same_weights.get(f"{cfg.model.id}@{cfg.model.revision}")
    if same:  # lw.sweep.revisions: this revision's weights are another's too
        tags["lw.model.same_weights"] = same
    folder = Path(folder or tempfile.mkdtemp(prefix="lw-job-"))
    write_config(cfg, overrides, folder, identity)
    record = {"run_name": run_name, "experiment": tracking.experiment, "tracking_uri": uri,
              "job_hash": job_hash, "tags": tags, "params": flatten(container)}
    write_record(folder, record)
    return folder, record


def start_job_run(client, cfg: DictConfig, run_name: str, overrides: list[str],
                  job_hash: str, identity: dict | None = None, job_key: str = "",
                  folder: Path | None = None, experiment: str | None = None) -> str:
    """Create the job's run (a child when a sweep's parent exists) from its record
    (:func:`job_record`, written to ``folder`` first; the run's id is added to it once the
    run exists), with params, tags and the config files (``config/identity.json``: what the
    hash was taken of). A failure after the run exists leaves it FAILED (or, on a dead server,
    RUNNING until lw.sync logs the folder). ``experiment``: its id where the caller has looked
    it up (one request less)."""
    folder, record = job_record(cfg, run_name, overrides, job_hash, identity, job_key, folder)
    tracking = _tracking(cfg)
    exp = experiment or experiment_id(client, tracking)
    run = client.create_run(exp, run_name=run_name, tags=record["tags"])
    run_id = run.info.run_id
    write_record(folder, {**record, "run_id": run_id})
    try:
        from mlflow.entities import Param

        params_list = [Param(k, v) for k, v in record["params"].items()]
        for start in range(0, len(params_list), 100):  # MLflow: at most 100 params per batch
            client.log_batch(run_id, params=params_list[start:start + 100])
        upload_files(client, run_id, folder, ["config"])
    except BaseException as error:
        fail_run(client, run_id, error, tracking_uri(tracking), folder)
        raise
    return run_id


def identity_tags(identity: dict, job_key: str) -> dict[str, str]:
    """``lw.job_key``, and the commits a hub model's / data set's revision resolved to."""
    tags = {KEY_TAG: job_key} if job_key else {}
    if commit := identity.get("model", {}).get("weights", {}).get("commit"):
        tags["lw.model.commit"] = commit
    if commit := identity.get("data", {}).get("commit"):
        tags["lw.data.commit"] = commit
    return tags
