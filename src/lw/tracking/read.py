"""Reading runs back: the store, a sweep's parent and children, their results tables."""


from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lw.config.tracking import TrackingConfig
from lw.errors import LwError
from lw.tracking.resume import HASH_TAG
from lw.tracking.store import client_for, default_store_uri


def open_store(uri: str | None = None):
    """An MlflowClient on the store to read: ``uri``, else the store every command uses
    (lw.tracking.store.default_store_uri: MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db). A
    reader never creates a store: a SQLite file that does not exist is an error naming it."""
    uri = uri or default_store_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise LwError(f"no MLflow store at {uri}: pass --uri (uri=) or set "
                      "MLFLOW_TRACKING_URI to the store the sweep logged to")
    return client_for(TrackingConfig(uri=uri))


def latest_parent(client, experiment: str) -> str:
    """The latest sweep's parent run, or the latest single job (``lw.run`` without ``-m``: a
    sweep of one, read as its own child), whichever started last."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LwError(f"tracking.experiment={experiment!r} does not exist in this store")
    latest = [run for where in ("tags.lw.jobs != ''",
                                f"tags.{HASH_TAG} != '' and tags.mlflow.parentRunId IS NULL")
              for run in client.search_runs([found.experiment_id], filter_string=where,
                                            order_by=["attributes.start_time DESC"],
                                            max_results=1)]
    if not latest:
        raise LwError(f"experiment {experiment!r} has no sweep and no job")
    return max(latest, key=lambda run: run.info.start_time).info.run_id


@dataclass
class SweepResults:
    runs: list                              # the finished child runs read (MLflow Run objects)
    curves: pd.DataFrame                    # long: run tags, run_id, run_name, metric, layer,
    #                                         depth (0 = embeddings, 1 = last layer), value
    per_prompt: dict[str, pd.DataFrame]     # run_id -> per-prompt rows (prompt, layer, ...)
    tables: dict[str, pd.DataFrame]         # run_id -> per-layer table
    missing: list[str] = field(default_factory=list)  # "run name: what could not be read"


def with_depth(table: pd.DataFrame) -> pd.DataFrame:
    """A results table with its relative depth as ``depth`` (0-1): tables logged before lw
    wrote that column have ``depth_pct`` (0-100) instead; read either way."""
    if "depth_pct" in table and "depth" not in table:
        table = table.rename(columns={"depth_pct": "depth"})
        table["depth"] = table["depth"] / 100
    return table


def existing_run(client, run_id: str):
    """The run ``run_id``; one that the store does not hold is an LwError naming it and the
    store (MLflow's own is a traceback)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise LwError(f"run {run_id!r} does not exist in {client.tracking_uri}") from None


def children(client, parent: str) -> list:
    """Every child run of ``parent``, page by page (a search returns 1,000 at most). A single
    job (a run of ``lw.run`` without ``-m``) is a sweep of one: its own child."""
    run = existing_run(client, parent)
    found, token = [], None
    while True:
        page = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                  max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    if not found and HASH_TAG in run.data.tags and "mlflow.parentRunId" not in run.data.tags:
        return [run]
    return found


def finished_children(client, parent: str) -> list:
    return [r for r in children(client, parent) if r.info.status == "FINISHED"]


def read_sweep(client, parent: str, per_prompt: bool = True) -> SweepResults:
    """Every finished child's per-layer table (and per-prompt values) from its ``results/``
    artifacts: one paginated search, then one download per run, 8 at a time. A run whose
    files cannot be read (an upload that failed) is named in ``missing``, not fatal."""
    runs = finished_children(client, parent)
    if not runs:
        raise LwError(f"sweep {parent} has no finished child run")
    from mlflow.artifacts import download_artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run
    files = ["table.csv", *(["per_prompt.parquet"] if per_prompt else [])]

    def fetch(run) -> dict[str, pd.DataFrame | str]:
        got: dict[str, pd.DataFrame | str] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in files:
                try:
                    # from the run's artifact URI (in the search result): no run lookup
                    local = download_artifacts(artifact_uri=f"{run.info.artifact_uri}/results/"
                                               f"{name}", dst_path=tmp,
                                               tracking_uri=client.tracking_uri)
                    got[name] = (with_depth(pd.read_csv(local)) if name.endswith(".csv")
                                 else pd.read_parquet(local))
                except Exception as error:  # noqa: BLE001 - named in the report instead
                    got[name] = f"results/{name} unreadable ({str(error).splitlines()[0]})"
        return got

    with ThreadPoolExecutor(8) as pool:
        fetched = list(pool.map(fetch, runs))
    prompts, tables, read, missing = {}, {}, [], []
    for run, got in zip(runs, fetched, strict=True):
        missing += [f"{run.info.run_name} ({run.info.run_id}): {v}" for v in got.values()
                    if isinstance(v, str)]
        if isinstance(got["table.csv"], str):
            continue
        tables[run.info.run_id] = got["table.csv"]
        read.append(run)
        if per_prompt and not isinstance(got["per_prompt.parquet"], str):
            prompts[run.info.run_id] = got["per_prompt.parquet"]
    if not read:
        raise LwError(f"no finished child run of sweep {parent} has readable results: "
                      + "; ".join(missing[:3]))
    # one melt per set of columns and one join for the whole sweep (per run, they cost more
    # than the reading); a run's NaN layers stay, columns it did not log do not appear
    same_columns: dict[tuple, list[pd.DataFrame]] = {}
    for run_id, table in tables.items():
        same_columns.setdefault(tuple(table.columns), []).append(table.assign(run_id=run_id))
    long = pd.concat([pd.concat(group, ignore_index=True).melt(
        id_vars=["run_id", "layer", "depth"], var_name="metric", value_name="value")
        for group in same_columns.values()], ignore_index=True)
    about = pd.DataFrame([{"run_id": r.info.run_id, "run_name": r.info.run_name,
                           **{k: v for k, v in r.data.tags.items() if k.startswith("lw.")}}
                          for r in read])
    curves = long.merge(about, on="run_id", how="left")
    return SweepResults(read, curves, prompts, tables, missing)


def sweep_frame(client, parent: str, metrics: list[str]) -> pd.DataFrame:
    """Long rows, one per (child run, metric, layer): run tags, layer, depth (0-1), value."""
    curves = read_sweep(client, parent, per_prompt=False).curves
    rows = curves[curves["metric"].isin(metrics)]
    if rows.empty:
        raise LwError(f"no finished child run of {parent} logged {', '.join(metrics)}")
    return rows.reset_index(drop=True)


def run_results(client, run_id: str) -> tuple[pd.DataFrame, dict, dict]:
    """A finished job run's results as the job returned them: its per-layer table
    (results/table.csv, full precision), its summaries and its model's description."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, "results", tmp))
        table = with_depth(pd.read_csv(folder / "table.csv", float_precision="round_trip"))
        summary = json.loads((folder / "summary.json").read_text())
        model = json.loads((folder / "model.json").read_text())
    return table, summary, model
