"""Pairwise measures: a score between two sets of pooled vectors of the same prompts, declared
once (:class:`Pairwise`) and used twice (:func:`declare` makes the registry's ``Metric``):

- within a model: every pair of its layers, the ``(L+1) x (L+1)`` matrix
  (``results/<name>_matrix.csv``, a heat map) and the curves ``<name>/to_last`` (each layer
  against the last) and ``<name>/to_next`` (layer l against l+1; NaN for the last);
- across models: every layer of one model against every layer of another, by relative depth,
  logged to the sweep's parent run (``lw.sweep.crossmodel``: ``cross_<name>/<a>__<b>.csv``).

A measure's kernel is ``between(a (N, La+1, Da), b (N, Lb+1, Db), **knobs) -> (La+1, Lb+1)``
float64, batched over layers: rows of ``a`` and ``b`` are the same N prompts in the same order,
the widths may differ.

Calibration (``metric.<name>.calibrate=true``, Gröger et al. 2026): the score's null is its
value with the prompts of ``b`` shuffled (``permutations`` shuffles, seeded by ``seed``), and
the calibrated score is ``(s - mean_null) / (best - mean_null)``: 0 at chance, 1 for identical
representations, whatever the measure's own scale. Logged beside the raw score:
``<name>/to_last_null`` / ``..._calibrated`` (and ``to_next``), and the matrices
``<name>_matrix_null.csv`` / ``<name>_matrix_calibrated.csv``. It costs ``permutations`` more
evaluations of the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lw.errors import check
from lw.metrics.registry import Metric, Output


@dataclass
class PairwiseKnobs:
    """The knobs every pairwise measure has; a measure's own knob class inherits them."""

    calibrate: bool = False          # also the score against its permutation null (Gröger 2026)
    permutations: int = 10           # shuffles of the prompts for that null

    def __post_init__(self) -> None:
        check(self.permutations >= 1,
              f"metric.<pairwise>.permutations={self.permutations}: must be >= 1")


@dataclass(frozen=True)
class Pairwise:
    """A pairwise measure. ``best``: its value for identical representations (1 for a
    similarity, 0 for a distance); ``higher_is_more_similar``: False for a distance;
    ``scale``: the heat maps' colour range."""

    name: str
    between: Callable[..., Tensor]
    knobs: type = PairwiseKnobs
    best: float = 1.0
    higher_is_more_similar: bool = True
    scale: tuple[float, float] = (0.0, 1.0)
    label: str = ""                  # how figures name it ("linear CKA")
    description: str = ""
    definition: str = ""
    version: int = 1
    min_prompts: int = 4


def own_knobs(knobs) -> dict:
    """The measure's own knobs as ``between``'s keyword arguments (calibration's left out)."""
    shared = {f.name for f in PairwiseKnobs.__dataclass_fields__.values()}
    return {k: v for k, v in (vars(knobs) if knobs is not None else {}).items() if k not in shared}


def null_of(between: Callable[..., Tensor], a: Tensor, b: Tensor, permutations: int,
            seed: int, **knobs) -> Tensor:
    """``(P, La+1, Lb+1)`` the score with the prompts of ``b`` shuffled, P times (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([between(a, b[torch.randperm(b.shape[0], generator=generator)], **knobs)
                        for _ in range(permutations)])


def calibrated(score: Tensor, null_mean: Tensor, best: float) -> Tensor:
    """``(s - mean_null) / (best - mean_null)``: 0 at chance, 1 at ``best``."""
    span = best - null_mean
    return torch.where(span.abs() > 1e-12, (score - null_mean) / span, math.nan)


def curves(matrix: Tensor, prefix: str) -> dict[str, Tensor]:
    """``to_last`` (each layer against the last) and ``to_next`` (l against l+1) of a square
    layer x layer matrix."""
    last = matrix.shape[0] - 1
    to_next = torch.full((last + 1,), math.nan, dtype=torch.float64)
    to_next[:-1] = torch.diagonal(matrix, offset=1)
    return {f"{prefix}/to_last": matrix[:, last], f"{prefix}/to_next": to_next}


def layer_table(matrix: Tensor) -> pd.DataFrame:
    table = pd.DataFrame(matrix.numpy(), columns=[str(m) for m in range(matrix.shape[1])])
    table.insert(0, "layer", np.arange(matrix.shape[0]))
    return table


def heat_map(matrix: np.ndarray, title: str, label: str, scale: tuple[float, float]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(matrix, origin="lower", vmin=scale[0], vmax=scale[1], cmap="viridis")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\n{label} between layers", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def declare(measure: Pairwise) -> Metric:
    """The registry's Metric for ``measure``: the within-model matrix and curves, and the
    cross-model comparison the sweep runs at its end."""
    name, label = measure.name, measure.label or measure.name

    def compute(inputs) -> Output:
        knobs = inputs.knobs
        pooled = inputs.pooled
        matrix = measure.between(pooled, pooled, **own_knobs(knobs))
        out = Output(per_layer=curves(matrix, name), tables={f"{name}_matrix": layer_table(matrix)})
        values = {f"{name}_matrix": matrix.numpy()}
        if knobs.calibrate:
            null = null_of(measure.between, pooled, pooled, knobs.permutations,
                           inputs.job.seed, **own_knobs(knobs)).mean(dim=0)
            scaled = calibrated(matrix, null, measure.best)
            for suffix, values_of in (("null", null), ("calibrated", scaled)):
                out.tables[f"{name}_matrix_{suffix}"] = layer_table(values_of)
                out.per_layer.update({f"{k}_{suffix}": v
                                      for k, v in curves(values_of, name).items()})
            values[f"{name}_matrix_calibrated"] = scaled.numpy()
        out.figures[name] = lambda result, title: {
            key: heat_map(value, title, label + (" (calibrated)" if "calibrated" in key else ""),
                          (0.0, 1.0) if "calibrated" in key else measure.scale)
            for key, value in values.items()}
        return out

    compute.__module__ = measure.between.__module__  # the docs show the measure's docstring

    def across_models(a: Tensor, b: Tensor, **knobs) -> Tensor:
        return measure.between(a, b, **knobs)

    across_models.label = label  # the cross-model heat map's title
    across_models.best = measure.best  # what calibration scales to

    # the curves say how alike two layers are: neither higher nor lower is "better"
    return Metric(
        name=name, compute=compute, version=measure.version, needs=("pooled",),
        knobs=measure.knobs, definition=measure.definition, description=measure.description,
        logs={f"{name}/": None}, across_models=across_models, min_prompts=measure.min_prompts)
