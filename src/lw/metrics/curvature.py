"""Average curvature of the token trajectory of a prompt (METRICS.md, "Curvature")."""

from __future__ import annotations

from lw.metrics.functional import sublayers
from lw.metrics.registry import Metric, Output

PRODUCTS = ["curvature/paper", "curvature/official"]


def _compute(inputs) -> Output:
    product = f"curvature/{inputs.job.metric.compat}"
    values = {"curvature": inputs.products[product]}
    if inputs.sublayers:
        # curvature/attn, curvature/mlp: after block l's attention / MLP addition
        values.update(sublayers.at_points(inputs.products, product,
                                          lambda value: {"curvature": value}, values))
    return Output(per_prompt=values)


METRIC = Metric(
    name="curvature", definition="Curvature (token level)",
    compute=_compute, default=True, needs=("tokens",),
    logs={"curvature": None, "curvature/attn": None, "curvature/mlp": None},
    summaries={"curvature": "min"}, agreement=("curvature",), shared_knobs=("compat",),
    # both compat modes are kept: the cache then serves either
    products=lambda job: [*PRODUCTS, *sublayers.products(job, PRODUCTS)],
    description="mean turning angle of each prompt's token trajectory, per layer (with "
                "extraction.sublayers=true also after each block's attention addition, "
                "curvature/attn, and after its MLP addition, curvature/mlp)")
