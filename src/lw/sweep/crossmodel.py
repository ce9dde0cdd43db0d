"""Cross-model comparisons: a pairwise measure (lw.metrics.pairwise; cka, ...) between every
layer of one model and every layer of another on the prompts both measured, by relative depth.

One code path for both uses: at a sweep's end for its jobs (logged to the parent run,
:func:`cross_model`), and for any finished runs by id on any store (logged to a run of its own,
:func:`compare_runs`). A run's pooled vectors come from its logged ``results/pooled.pt``
(``extraction.log_pooled=true``: any store, any machine), else from this machine's activation
cache (``extraction.cache=true``); prompts are matched by the SHA-256 of their text."""


from __future__ import annotations

import itertools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from mlflow.entities import Metric
from omegaconf import OmegaConf

from lw.config.schema import LwConfig
from lw.errors import LwError
from lw.metrics import registry
from lw.metrics.pairwise import calibrated, null_of, own_knobs
from lw.tracking.read import children


def job_of_run(client, run) -> LwConfig:
    """The run's composed config (its ``config/config.yaml`` artifact), validated."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, "config/config.yaml", tmp)
        loaded = OmegaConf.load(path)
    loaded.pop("hydra", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LwConfig), loaded))


def pooled_of(job: LwConfig) -> torch.Tensor | None:
    """``(N, L+1, D)`` the job's pooled vectors from the activation cache, or None."""
    from lw.job import cache
    from lw.job.identity import forward_hash

    found = cache.load(forward_hash(job))
    return None if found is None else found.prompts.pooled


def prompts_key(job: LwConfig) -> str:
    """What must agree for two jobs to have measured the same prompts: all but the model."""
    from lw.job.identity import forward_identity, stable_hash

    return stable_hash({k: v for k, v in forward_identity(job).items() if k != "model"})


def vectors_of(client, run, job: LwConfig) -> tuple[torch.Tensor, list[str]] | None:
    """``((N, L+1, D), [N prompt text hashes])`` of a finished run: its logged pooled vectors,
    else its activation-cache entry on this machine; None when it has neither."""
    from lw.job import pooled

    logged = f"results/{pooled.FILE}"
    if any(item.path == logged for item in client.list_artifacts(run.info.run_id, "results")):
        with tempfile.TemporaryDirectory() as tmp:
            return pooled.load(Path(client.download_artifacts(run.info.run_id, logged, tmp)))
    vectors = pooled_of(job)
    if vectors is None:
        return None
    return vectors, [pooled.text_hash(text) for text in prompt_texts(job)]


def prompt_texts(job: LwConfig) -> list[str]:
    from lw.job.stages import plan_job
    from lw.loading.models import load_tokenizer

    return plan_job(job, load_tokenizer(job.model)).texts


def group_label(run_name: str, model: str) -> str:
    """What tells a sweep's groups of jobs apart, from a run name ("smollm2 skip_first=1"):
    the name without the model, as a file name."""
    rest = [part for part in run_name.split() if part != model]
    return "_".join(rest).replace("/", "-").replace("=", "-") or "jobs"  # a metric name


def depth_table(matrix: torch.Tensor) -> pd.DataFrame:
    """The matrix as a table: a row per layer of a (column ``depth``: a's relative depth, 0 =
    embeddings, 1 = last layer), a column per layer of b, named by b's relative depth."""
    rows, cols = matrix.shape
    depth_a = np.arange(rows) / (rows - 1)
    depth_b = np.arange(cols) / (cols - 1)
    table = pd.DataFrame(matrix.numpy(), columns=[f"{d:.3f}" for d in depth_b])
    table.insert(0, "depth", depth_a)
    return table


def depth_diagonal(matrix: torch.Tensor) -> float:
    """Mean CKA of each row layer with the column layer at the nearest relative depth."""
    rows, cols = matrix.shape
    nearest = np.rint(np.arange(rows) / (rows - 1) * (cols - 1)).astype(int)
    return float(np.nanmean(matrix.numpy()[np.arange(rows), nearest]))


def heat_map(matrix: torch.Tensor, a: str, b: str, label: str = "linear CKA"):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(matrix.numpy(), origin="lower", extent=(0, 1, 0, 1), aspect="auto",
                      vmin=0, vmax=1, cmap="viridis")
    ax.set_xlabel(f"{b}: relative depth (0 = embeddings, 1 = last layer)", fontsize=9)
    ax.set_ylabel(f"{a}: relative depth", fontsize=9)
    ax.set_title(f"{label}, {a} x {b}", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def across(name: str):
    """Metric ``name``'s cross-model comparison (its declared ``across_models``)."""
    compare = registry.get(name).across_models
    if compare is None:
        raise LwError(f"metric {name!r} declares no cross-model comparison; those that do: "
                      + ", ".join(m.name for m in registry.every().values() if m.across_models))
    return compare


@dataclass
class Side:
    """One run of a comparison: its label in keys and figures, config, pooled vectors."""

    label: str
    job: LwConfig
    vectors: tuple[torch.Tensor, list[str]] | None


def compare_pair(client, log_to: str, name: str, a: Side, b: Side, key: str,
                 options: dict) -> torch.Tensor | None:
    """Metric ``name``'s layer x layer matrix of ``a`` against ``b`` on the prompts both
    measured, logged to run ``log_to`` under ``cross_<name>/<key>`` (CSV by relative depth, heat
    map, depth diagonal, prompt count); None, said on stderr, when it cannot be made."""
    said = f"[lw] cross-model {name} {a.label} x {b.label}"
    if a.vectors is None or b.vectors is None:
        print(f"{said}: no pooled vectors (run the jobs with extraction.log_pooled=true, or "
              "extraction.cache=true on this machine)", file=sys.stderr)
        return None
    (pooled_a, hashes_a), (pooled_b, hashes_b) = a.vectors, b.vectors
    from lw.job.pooled import common_rows

    rows_a, rows_b = common_rows(hashes_a, hashes_b)
    if len(rows_a) < 4:
        print(f"{said}: {len(rows_a)} prompts measured by both (it needs 4): skipped",
              file=sys.stderr)
        return None
    if len(rows_a) < max(len(hashes_a), len(hashes_b)):
        print(f"{said}: on the {len(rows_a)} prompts both measured (of {len(hashes_a)} and "
              f"{len(hashes_b)}: their tokenizers kept different ones)", file=sys.stderr)
    compare = across(name)
    # the knobs as job a ran the metric, those given (lw.crossmodel's flags) over them
    given = registry.knobs_of(a.job, registry.get(name))
    merged = {**(vars(given) if given is not None else {}), **options}
    knobs = own_knobs(SimpleNamespace(**merged))
    x, y = pooled_a[rows_a], pooled_b[rows_b]
    matrix = compare(x, y, **knobs)
    label = f"cross_{name}"
    tables = {key: matrix}
    stamp = int(time.time() * 1000)
    metrics = [Metric(f"{label}/{key}/depth_diagonal", depth_diagonal(matrix), stamp, 0),
               Metric(f"{label}/{key}/n_prompts", float(len(rows_a)), stamp, 0)]
    if merged.get("calibrate"):  # against the permutation null (lw.metrics.pairwise)
        null = null_of(compare, x, y, merged["permutations"], a.job.seed, **knobs).mean(dim=0)
        tables[f"{key}_calibrated"] = calibrated(matrix, null, getattr(compare, "best", 1.0))
        metrics += [Metric(f"{label}/{key}/depth_diagonal_null", depth_diagonal(null), stamp, 0),
                    Metric(f"{label}/{key}/depth_diagonal_calibrated",
                           depth_diagonal(tables[f"{key}_calibrated"]), stamp, 0)]
    with tempfile.TemporaryDirectory() as tmp:
        for file, values in tables.items():
            path = Path(tmp) / f"{file}.csv"
            depth_table(values).to_csv(path, index=False)
            client.log_artifact(log_to, str(path), artifact_path=label)
    client.log_figure(log_to, heat_map(matrix, a.label, b.label, getattr(compare, "label", name)),
                      f"figures/{label}_{key}.png")
    client.log_batch(log_to, metrics=metrics)
    return matrix


def cross_model(client, parent: str, name: str = "cka", runs: list | None = None,
                only_ran: bool = True, **options) -> dict[str, torch.Tensor]:
    """Every pair of the parent's finished child runs of different models on the same prompts:
    metric ``name``'s cross-model matrix, logged to the parent run under ``cross_<name>/<a>__<b>``
    (and, when the sweep holds several groups of such jobs, the rest of the run name:
    ``__skip_first-1``). ``only_ran``: only jobs that ran metric ``name``."""
    across(name)
    if runs is None:
        runs = children(client, parent)
    groups: dict[str, list[tuple[str, object, LwConfig]]] = {}
    for run in runs:
        if run.info.status != "FINISHED" or (
                only_ran and f"'{name}'" not in run.data.params.get("metrics", "")):
            continue
        job = job_of_run(client, run)
        if only_ran and name not in job.metrics:
            continue
        groups.setdefault(prompts_key(job), []).append(
            (run.info.run_name or job.model.name, run, job))
    found = {}
    several = len(groups) > 1
    for members in groups.values():
        for (name_a, run_a, job_a), (_, run_b, job_b) in itertools.combinations(members, 2):
            if job_a.model == job_b.model:
                continue
            a = Side(job_a.model.name, job_a, vectors_of(client, run_a, job_a))
            b = Side(job_b.model.name, job_b, vectors_of(client, run_b, job_b))
            key = f"{a.label}__{b.label}" + (f"__{group_label(name_a, a.label)}" if several
                                             else "")
            matrix = compare_pair(client, parent, name, a, b, key, options)
            if matrix is not None:
                found[key] = matrix
    return found


class FolderSink:
    """Where a comparison goes when the store will not take a new run (a READ user on a team
    server): the same files and numbers, into a local folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def log_artifact(self, run_id, path: str, artifact_path: str) -> None:
        (self.folder / artifact_path).mkdir(parents=True, exist_ok=True)
        (self.folder / artifact_path / Path(path).name).write_bytes(Path(path).read_bytes())

    def log_figure(self, run_id, figure, name: str) -> None:
        (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(self.folder / name)

    def log_batch(self, run_id, metrics) -> None:
        with open(self.folder / "metrics.csv", "a") as out:
            out.writelines(f"{m.key},{m.value}\n" for m in metrics)


def compare_runs(client, run_ids: list[str], name: str = "cka",
                 **options) -> tuple[str, dict[str, torch.Tensor]]:
    """Every pair of the finished runs ``run_ids`` (any models, any sweeps of one store): metric
    ``name``'s matrix on the prompts both measured, logged to a new run of the first run's
    experiment (named ``crossmodel <a> x <b> ...``, tag ``lw.crossmodel.of``), or, when the
    store refuses a new run (a READ user), into ``./crossmodel/<first run id>.../``. Returns
    (that run's id or folder, the matrices by key). Each run is labelled by its model, or by
    its run name when two runs share a model (checkpoints)."""
    from mlflow.exceptions import MlflowException

    from lw.tracking.read import existing_run

    across(name)
    runs = [existing_run(client, run_id) for run_id in run_ids]
    unfinished = [r.info.run_id for r in runs if r.info.status != "FINISHED"]
    if unfinished:
        raise LwError(f"runs {', '.join(unfinished)} are not FINISHED: compare finished runs")
    jobs = [job_of_run(client, run) for run in runs]
    models = [job.model.name for job in jobs]
    labels = [m if models.count(m) == 1 else (r.info.run_name or r.info.run_id[:8])
              for m, r in zip(models, runs, strict=True)]
    sides = [Side(label, job, vectors_of(client, run, job))
             for label, job, run in zip(labels, jobs, runs, strict=True)]
    try:
        own = client.create_run(
            runs[0].info.experiment_id, run_name=f"crossmodel {' x '.join(labels)}"[:250],
            tags={"lw.crossmodel.of": ",".join(run_ids), "lw.crossmodel.measure": name})
    except MlflowException as error:
        if error.error_code != "PERMISSION_DENIED":
            raise
        own = None
    sink = client if own is not None else FolderSink(
        Path.cwd() / "crossmodel" / "_".join(run_id[:8] for run_id in run_ids))
    where = own.info.run_id if own is not None else str(sink.folder)
    found = {}
    try:
        for a, b in itertools.combinations(sides, 2):
            key = f"{a.label}__{b.label}".replace("/", "-").replace(" ", "_")
            matrix = compare_pair(sink, where, name, a, b, key, options)
            if matrix is not None:
                found[key] = matrix
    except BaseException:
        if own is not None:
            client.set_terminated(where, "FAILED")
        raise
    if own is not None:
        client.set_terminated(where, "FINISHED" if found else "FAILED")
    return where, found


def after_sweep(client, parent: str, runs: list) -> None:
    """The sweep's end (lw.sweep.callback): each metric that declares a cross-model comparison
    (``across_models``), for the jobs that ran it; a failure here is said, never fails the
    sweep."""
    for metric in registry.every().values():
        if metric.across_models is None or not any(
                f"'{metric.name}'" in run.data.params.get("metrics", "") for run in runs):
            continue
        try:
            cross_model(client, parent, metric.name, runs)
        except Exception as error:  # noqa: BLE001 - an extra on top of finished jobs
            print(f"[lw] cross-model {metric.name} not logged: {type(error).__name__}: "
                  f"{error}", file=sys.stderr)
