"""dataset_entropy: the matrix entropy of the Gram matrix of all prompts' pooled vectors, per
layer (METRICS.md, "Dataset entropy")."""

from __future__ import annotations

from dataclasses import dataclass

from lw.errors import check
from lw.metrics.functional.entropy import dataset_entropy
from lw.metrics.registry import Metric, Output


@dataclass
class DatasetEntropyKnobs:
    alpha: float = 1.0               # Renyi order; 1 = Shannon

    def __post_init__(self) -> None:
        check(self.alpha > 0,
              f"metric.dataset_entropy.alpha={self.alpha}: must be > 0 (1 = Shannon)")


def _compute(inputs) -> Output:
    m = inputs.job.metric
    values = dataset_entropy(inputs.pooled.transpose(0, 1), alpha=inputs.knobs.alpha,
                             compat=m.compat, normalizations=tuple(m.normalizations))
    return Output(per_layer={f"dataset_entropy/{k}": v for k, v in values.items()})


METRIC = Metric(
    name="dataset_entropy", definition="Dataset entropy (one value per layer)",
    compute=_compute, default=True, knobs=DatasetEntropyKnobs,
    logs={"dataset_entropy/": None}, summaries={"dataset_entropy/max": "min"},
    agreement=("dataset_entropy/",), shared_knobs=("compat", "normalizations"),
    spread=True,
    description="matrix entropy of the pooled vectors' Gram matrix")
