"""Average curvature of the token trajectory of a prompt (METRICS.md, "Curvature")."""

from __future__ import annotations

from lw.metrics.registry import Metric, Output


def _compute(inputs) -> Output:
    compat = inputs.job.metric.compat
    return Output(per_prompt={"curvature": inputs.products[f"curvature/{compat}"]})


METRIC = Metric(
    name="curvature", definition="Curvature (token level)",
    compute=_compute, default=True, needs=("tokens",), logs={"curvature": None},
    summaries={"curvature": "min"}, agreement=("curvature",), shared_knobs=("compat",),
    # both compat modes are kept: the cache then serves either
    products=lambda job: ["curvature/paper", "curvature/official"],
    description="mean turning angle of each prompt's token trajectory, per layer")
