"""infonce: InfoNCE between two augmented views of every prompt, per layer (METRICS.md)."""

from __future__ import annotations

from dataclasses import dataclass

from lw.errors import check
from lw.metrics.functional.views import infonce
from lw.metrics.registry import Metric, Output


@dataclass
class InfoNCEKnobs:
    tau: float = 0.1                 # temperature

    def __post_init__(self) -> None:
        check(self.tau > 0, f"metric.infonce.tau={self.tau}: must be > 0")


def _compute(inputs) -> Output:
    views = inputs.views.transpose(0, 1)                                  # (L+1, N, J, D)
    values = infonce(views[:, :, 0], views[:, :, 1], tau=inputs.knobs.tau)
    return Output(per_layer={f"infonce/{k}": v for k, v in values.items()})


METRIC = Metric(
    name="infonce", definition="InfoNCE (two augmented views)",
    compute=_compute, needs=("views",), knobs=InfoNCEKnobs,
    logs={"infonce/loss": False, "infonce/mi_bound": True, "infonce/normalized": True},
    agreement=("infonce/mi_bound",),
    n_views=lambda job: 2, description="InfoNCE between views 0 and 1 of every prompt")
