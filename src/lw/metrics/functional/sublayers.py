"""The sub-layer series (``extraction.sublayers=true``): token products named for the residual
stream points inside each block, and the metrics' series at those points. The states
themselves are captured by lw.job.sublayers (hooks on the blocks, in the forward pass).

Products, from the shared token products ``spectrum/<compat>`` and ``curvature/<compat>``:

- ``sublayer/attn/<product>`` ``(N, L+1, ...)``: row l the stream after block l's attention
  addition (row 0, the embeddings, empty: zeros / NaN);
- ``sublayer/last/<product>`` ``(N, 1, ...)``: block L's raw output, the stream after its MLP
  addition (lw's state L is after the final norm where the architecture has one).

Series: ``<series>/attn`` (after block l's attention addition) and ``<series>/mlp`` (after its
MLP addition: lw's state l for l < L, block L's raw output at L), layer 0 NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

PREFIX = "sublayer/"
KINDS = ("spectrum/", "curvature/")     # the shared token products measured at the points
POINTS = ("attn", "last")


def products(job, names: list[str]) -> list[str]:
    """The sub-layer versions of the token products ``names`` when the job asks for them."""
    if not job.extraction.sublayers:
        return []
    return [f"{PREFIX}{where}/{name}" for where in POINTS for name in names]


def at_points(found: dict[str, Tensor], product: str,
              measure: Callable[[Tensor], dict[str, Tensor]],
              plain: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{<series>/attn, <series>/mlp: (N, L+1)}`` from the sub-layer products.

    Args:
        found: the pass's per-prompt products.
        product: the shared product's name (``spectrum/paper``).
        measure: product values ``(N, rows, ...)`` -> ``{series: (N, rows)}``.
        plain: those series at lw's states ``(N, L+1)`` (after block l's MLP for l < L).
    """
    attn = measure(found[f"{PREFIX}attn/{product}"])
    last = measure(found[f"{PREFIX}last/{product}"])
    out: dict[str, Tensor] = {}
    for series, values in attn.items():
        values = values.clone()
        values[:, 0] = math.nan
        mlp = plain[series].clone()
        mlp[:, 0] = math.nan
        mlp[:, -1] = last[series][:, 0]
        out[f"{series}/attn"], out[f"{series}/mlp"] = values, mlp
    return out
