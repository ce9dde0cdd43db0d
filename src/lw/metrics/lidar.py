"""lidar: LiDAR, the entropy of the LDA matrix of J augmented views per prompt, per layer."""

from __future__ import annotations

from dataclasses import dataclass

from lw.errors import check
from lw.metrics.functional.views import lidar
from lw.metrics.registry import Metric, Output


@dataclass
class LiDARKnobs:
    J: int = 16                      # augmented views per prompt  # noqa: N815
    delta: float = 1e-4

    def __post_init__(self) -> None:
        check(self.J >= 2, f"metric.lidar.J={self.J}: must be >= 2")
        check(self.delta > 0, f"metric.lidar.delta={self.delta}: must be > 0")


def _compute(inputs) -> Output:
    views = inputs.views.transpose(0, 1)                                  # (L+1, N, J, D)
    values = lidar(views[:, :, :inputs.knobs.J], delta=inputs.knobs.delta,
                   normalizations=tuple(inputs.job.metric.normalizations))
    return Output(per_layer={f"lidar/{k}": v for k, v in values.items()})


METRIC = Metric(
    name="lidar", definition="LiDAR (J augmentations per prompt)",
    compute=_compute, needs=("views",), knobs=LiDARKnobs,
    logs={"lidar/": True}, agreement=("lidar/effective_rank",),
    shared_knobs=("normalizations",), n_views=lambda job: job.metric.lidar.J,
    min_prompts=2,  # between-prompt scatter
    description="LiDAR over the first J views of every prompt")
