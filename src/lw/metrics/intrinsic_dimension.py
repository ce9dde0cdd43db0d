"""intrinsic_dimension: TwoNN on the pooled vectors, per layer (as dadapy's compute_id_2NN)."""

from __future__ import annotations

from dataclasses import dataclass

from lw.errors import check
from lw.metrics.functional.intrinsic import twonn
from lw.metrics.registry import Metric, Output


@dataclass
class IntrinsicDimensionKnobs:
    fraction: float = 0.9            # TwoNN: share of the smallest r2/r1 ratios fitted (dadapy)

    def __post_init__(self) -> None:
        # F = i/n reaches 1 at i = n, where -ln(1 - F) is infinite: some must be left out
        check(0 < self.fraction < 1,
              f"metric.intrinsic_dimension.fraction={self.fraction}: must lie in (0, 1)")


def _compute(inputs) -> Output:
    return Output(per_layer={"intrinsic_dimension": twonn(inputs.pooled.transpose(0, 1),
                                                          fraction=inputs.knobs.fraction)})


METRIC = Metric(
    name="intrinsic_dimension", compute=_compute, knobs=IntrinsicDimensionKnobs,
    logs={"intrinsic_dimension": None},
    min_prompts=3, spread=True,  # TwoNN needs a second neighbour
    description="TwoNN intrinsic dimension")
