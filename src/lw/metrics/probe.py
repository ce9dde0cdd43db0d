"""probe: a linear probe's cross-validated accuracy on data.label_field labels, per layer."""

from __future__ import annotations

from dataclasses import dataclass

from lw.errors import check
from lw.metrics.functional.downstream import probe
from lw.metrics.registry import Metric, Output


@dataclass
class ProbeKnobs:
    folds: int = 5                   # stratified k-fold
    C: float = 1.0                   # inverse L2 strength of the logistic regression  # noqa: N815
    max_iter: int = 1000

    def __post_init__(self) -> None:
        check(self.folds >= 2, f"metric.probe.folds={self.folds}: must be >= 2")
        check(self.C > 0, f"metric.probe.C={self.C}: must be > 0")


def _compute(inputs) -> Output:
    k = inputs.knobs
    values = probe(inputs.pooled.transpose(0, 1), inputs.labels, folds=k.folds,
                   seed=inputs.job.seed, max_iter=k.max_iter, C=k.C)
    return Output(per_layer={f"probe/{name}": v for name, v in values.items()})


def _check_plan(job, tokenizer, plan) -> None:
    """The classes the labels give, checked before the model loads."""
    from lw.metrics.functional.downstream import check_labels

    if plan.labels is not None:
        check_labels(plan.labels, job.metric.probe.folds, False)


METRIC = Metric(
    name="probe", compute=_compute, needs=("pooled", "labels"), knobs=ProbeKnobs,
    logs={"probe/": True}, scores=("probe/accuracy",),
    check_plan=_check_plan,
    description="logistic-regression probe accuracy (stratified k-fold) on the labels")
