"""A job's results: one table with a row per layer, plus the per-prompt values behind it.

Tracking and plots read these; they compute nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from lw.loading.models import ModelInfo
from lw.metrics.functional.downstream import layer_choice, metric_agreement


@dataclass
class JobResult:
    table: pd.DataFrame          # one row per layer: layer, depth (0-1), a column per metric
    per_prompt: pd.DataFrame     # one row per (prompt, layer): per-prompt metric values
    summary: dict[str, float]    # scalars: best layers, NaN counts, prompts/s ...
    info: ModelInfo
    tags: dict[str, str] = field(default_factory=dict)  # what the numbers are of (lw.views.of)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # results/<name>.csv
    # figures a metric adds: name -> fn(result, title) -> {figure name: Figure}
    figures: dict = field(default_factory=dict)
    # extraction.log_pooled: ((N, L+1, D) pooled vectors, the N prompts' texts)
    pooled: tuple[torch.Tensor, list[str]] | None = None


def build_result(info: ModelInfo, per_prompt: dict[str, torch.Tensor],
                 per_layer: dict[str, torch.Tensor], n_tokens: torch.Tensor,
                 summaries: dict[str, str] | None = None, scores: tuple[str, ...] = (),
                 agreement: tuple[str, ...] = ()) -> JobResult:
    """Per-prompt values (N, L+1) are averaged over prompts (NaNs left out and counted);
    per-layer values (L+1,) go in as they are. ``summaries``: {series: "min" | "max"}, the
    layers where they take that extreme; ``scores``: downstream scores, and ``agreement``: the
    series (or prefixes) whose agreement with them is logged (lw.metrics.registry)."""
    n_states = info.n_layers + 1
    layers = np.arange(n_states)
    # relative depth, the one unit users see: 0 = embeddings, 1 = last layer
    columns: dict[str, np.ndarray] = {"layer": layers, "depth": layers / info.n_layers}
    summary: dict[str, float] = {}
    for name, values in per_prompt.items():
        array = values.numpy()
        nan = np.isnan(array)
        with np.errstate(all="ignore"):
            columns[name] = np.where(nan.all(axis=0), np.nan,
                                     np.nansum(array, axis=0) / np.maximum((~nan).sum(axis=0), 1))
        summary[f"nan_count/{name}"] = float(nan.sum())
    for name, values in per_layer.items():
        columns[name] = values.double().cpu().numpy()
        summary[f"nan_count/{name}"] = float(np.isnan(columns[name]).sum())
    table = pd.DataFrame(columns)
    summary.update(layer_summaries(table, summaries or {}))
    summary.update(downstream_summaries(table, scores, agreement))
    n, _ = next(iter(per_prompt.values())).shape
    long = {"prompt": np.repeat(np.arange(n), n_states), "layer": np.tile(layers, n),
            "n_tokens": np.repeat(n_tokens.numpy(), n_states)}
    long.update({name: values.numpy().reshape(-1) for name, values in per_prompt.items()})
    return JobResult(table=table, per_prompt=pd.DataFrame(long), summary=summary, info=info)


def add_prompt_columns(result: JobResult, columns: dict) -> None:
    """Per-prompt values that do not depend on the layer (``(N,)`` tensors, arrays or lists:
    a subject, a BM25 overlap, an answer's correctness) as columns of ``result.per_prompt``,
    repeated on each of the prompt's layer rows; they stay out of the per-layer table."""
    prompt = result.per_prompt["prompt"].to_numpy()
    for name, values in columns.items():
        values = values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        result.per_prompt[name] = values[prompt]


def layer_summaries(table: pd.DataFrame, picks: dict[str, str]) -> dict[str, float]:
    """The layer (and relative depth) where each series of ``picks`` takes its extreme ("min" or
    "max")."""
    out: dict[str, float] = {}
    for column, label in picks.items():
        if column in table and table[column].notna().any():
            row = table.loc[getattr(table[column], f"idx{label}")()]
            out[f"summary/{column}/{label}_layer"] = float(row["layer"])
            out[f"summary/{column}/{label}_depth"] = float(row["depth"])
            out[f"summary/{column}/{label}"] = float(row[column])
    return out


def downstream_summaries(table: pd.DataFrame, scores: tuple[str, ...],
                         agreement: tuple[str, ...]) -> dict[str, float]:
    """For each downstream score in the table: its best and last layer, and how each series
    starting with one of ``agreement`` tracks it over the layers (Spearman rho; does its
    argmax / argmin layer equal the best downstream layer?)."""
    out: dict[str, float] = {}
    metrics = [c for c in table.columns if agreement and c.startswith(agreement)]
    for score in scores:
        if score not in table:
            continue
        downstream = torch.tensor(table[score].to_numpy())
        out.update({f"summary/{score}/{k}": v for k, v in layer_choice(downstream).items()})
        for metric in metrics:
            values = torch.tensor(table[metric].to_numpy())
            prefix = f"agreement/{metric}/{score}"
            for prefer in ("max", "min"):
                found = metric_agreement(values, downstream, prefer)
                out[f"{prefix}/arg{prefer}_is_best"] = found["best_layer_match"]
            out[f"{prefix}/spearman"] = found["spearman"]
    return out
