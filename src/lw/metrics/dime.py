"""dime: DiME, the difference of matrix entropies between two augmented views, per layer."""

from __future__ import annotations

from dataclasses import dataclass

from lw.errors import check
from lw.metrics.functional.views import dime
from lw.metrics.registry import Metric, Output


@dataclass
class DiMEKnobs:
    alpha: float = 1.0
    r: int = 10                      # random permutations (negatives)

    def __post_init__(self) -> None:
        check(self.alpha > 0, f"metric.dime.alpha={self.alpha}: must be > 0")
        check(self.r >= 1, f"metric.dime.r={self.r}: must be >= 1")


def _compute(inputs) -> Output:
    views = inputs.views.transpose(0, 1)                                  # (L+1, N, J, D)
    k = inputs.knobs
    return Output(per_layer={"dime": dime(views[:, :, 0], views[:, :, 1], alpha=k.alpha, r=k.r,
                                          generator=inputs.generator,
                                          compat=inputs.job.metric.compat)})


METRIC = Metric(
    name="dime", definition="DiME (two augmented views)",
    compute=_compute, needs=("views",), knobs=DiMEKnobs, logs={"dime": True},
    agreement=("dime",), shared_knobs=("compat",), n_views=lambda job: 2,
    min_prompts=2,  # compares each prompt with the others
    description="DiME between views 0 and 1 of every prompt")
