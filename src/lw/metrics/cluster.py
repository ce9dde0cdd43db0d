"""cluster: k-means on the pooled vectors scored against data.label_field labels, per layer."""

from __future__ import annotations

from lw.metrics.functional.downstream import cluster
from lw.metrics.registry import Metric, Output


def _compute(inputs) -> Output:
    values = cluster(inputs.pooled.transpose(0, 1), inputs.labels, seed=inputs.job.seed)
    return Output(per_layer={f"cluster/{name}": v for name, v in values.items()})


def _check_plan(job, tokenizer, plan) -> None:
    """The classes the labels give, checked before the model loads."""
    from lw.metrics.functional.downstream import check_labels

    if plan.labels is not None:
        check_labels(plan.labels, None, True)


METRIC = Metric(
    name="cluster", compute=_compute, needs=("pooled", "labels"), logs={"cluster/": True},
    scores=("cluster/v_measure",), check_plan=_check_plan,
    description="k-means V-measure (and ARI, NMI) on the labels")
