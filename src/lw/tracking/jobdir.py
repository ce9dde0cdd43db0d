"""The job folder, the truth of a run: config/, results/, figures/ and lw_run.json written there
first, then uploaded to the run (metric points with step = layer and depth per-mille)."""


from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

DEPTH_PREFIX = "depth/"  # per-layer curves again, keyed by depth per-mille (log_result)


IDENTITY_FILE = "identity.json"  # artifact config/identity.json: what lw.job_hash was taken of
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
        # the ids are steps, not metrics (depth_pct: folders written before depth was 0-1)
        if (column in ("layer", "depth", "depth_pct")
                or not pd.api.types.is_numeric_dtype(table[column])):
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
    if getattr(result, "pooled", None) is not None:  # extraction.log_pooled
        from lw.job import pooled  # torch: not on lw.sync's import path

        pooled.save(folder / pooled.FILE, *result.pooled)
