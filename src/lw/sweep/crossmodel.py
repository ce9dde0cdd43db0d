"""Cross-model comparisons after a sweep: linear CKA between every layer of two models on the
same prompts (from the activation cache), by relative depth, logged to the parent run."""


from __future__ import annotations

import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.entities import Metric
from omegaconf import OmegaConf

from lw.config.schema import LwConfig
from lw.errors import LwError
from lw.metrics import registry
from lw.metrics.pairwise import own_knobs
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


def prompt_texts(job: LwConfig) -> list[str]:
    from lw.job.stages import plan_job
    from lw.loading.models import load_tokenizer

    return plan_job(job, load_tokenizer(job.model)).texts


def common_rows(texts_a: list[str], texts_b: list[str]) -> tuple[list[int], list[int]]:
    """The rows of the prompts both jobs measured, in a's order: tokenizers keep different
    prompts (``data.min_tokens``) and order them differently."""
    where: dict[str, list[int]] = {}
    for row, text in enumerate(texts_b):
        where.setdefault(text, []).append(row)
    rows_a, rows_b = [], []
    for row, text in enumerate(texts_a):
        if where.get(text):
            rows_a.append(row)
            rows_b.append(where[text].pop(0))
    return rows_a, rows_b


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


def cross_model(client, parent: str, name: str = "cka", runs: list | None = None,
                only_ran: bool = True, **options) -> dict[str, torch.Tensor]:
    """Every pair of the parent's finished child runs on the same prompts: metric ``name``'s
    cross-model matrix (its declared ``across_models``, with ``options``) on the prompts both
    measured, logged to the parent run under ``cross_<name>/<a>__<b>`` (and, when the sweep
    holds several groups of such jobs, the rest of the run name: ``__skip_first-1``).
    ``only_ran``: only jobs that ran metric ``name``."""
    compare = registry.get(name).across_models
    if compare is None:
        raise LwError(f"metric {name!r} declares no cross-model comparison; those that do: "
                      + ", ".join(m.name for m in registry.every().values() if m.across_models))
    label = f"cross_{name}"
    if runs is None:
        runs = children(client, parent)
    groups: dict[str, list[tuple[str, LwConfig]]] = {}
    for run in runs:
        if run.info.status != "FINISHED" or (
                only_ran and f"'{name}'" not in run.data.params.get("metrics", "")):
            continue
        job = job_of_run(client, run)
        if only_ran and name not in job.metrics:
            continue
        groups.setdefault(prompts_key(job), []).append((run.info.run_name or job.model.name, job))
    found = {}
    several = len(groups) > 1
    for members in groups.values():
        for (name_a, job_a), (name_b, job_b) in itertools.combinations(members, 2):
            if job_a.model == job_b.model:
                continue
            pooled_a, pooled_b = pooled_of(job_a), pooled_of(job_b)
            if pooled_a is None or pooled_b is None:
                print(f"[lw] cross-model {name} {name_a} x {name_b}: no activation-cache entry "
                      "(run the jobs with extraction.cache=true)", file=sys.stderr)
                continue
            texts_a, texts_b = prompt_texts(job_a), prompt_texts(job_b)
            rows_a, rows_b = common_rows(texts_a, texts_b)
            if len(rows_a) < 4:
                print(f"[lw] cross-model {name} {name_a} x {name_b}: {len(rows_a)} prompts "
                      "measured by both (it needs 4): skipped", file=sys.stderr)
                continue
            if len(rows_a) < max(len(texts_a), len(texts_b)):
                print(f"[lw] cross-model {name} {name_a} x {name_b}: on the {len(rows_a)} prompts "
                      f"both measured (of {len(texts_a)} and {len(texts_b)}: their tokenizers "
                      "kept different ones)", file=sys.stderr)
            # the knobs: as given (lw.crossmodel's flags), else as job a ran the metric
            knobs = options or own_knobs(registry.knobs_of(job_a, registry.get(name)))
            matrix = compare(pooled_a[rows_a], pooled_b[rows_b], **knobs)
            a, b = job_a.model.name, job_b.model.name
            key = f"{a}__{b}" + (f"__{group_label(name_a, a)}" if several else "")
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{key}.csv"
                depth_table(matrix).to_csv(path, index=False)
                client.log_artifact(parent, str(path), artifact_path=label)
            client.log_figure(parent, heat_map(matrix, a, b, getattr(compare, "label", name)),
                              f"figures/{label}_{key}.png")
            stamp = int(time.time() * 1000)
            client.log_batch(parent, metrics=[
                Metric(f"{label}/{key}/depth_diagonal", depth_diagonal(matrix), stamp, 0),
                Metric(f"{label}/{key}/n_prompts", float(len(rows_a)), stamp, 0)])
            found[key] = matrix
    return found


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
