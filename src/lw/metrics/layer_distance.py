"""layer_distance: how far n blocks move the token states (Gromov et al. 2024, "The
Unreasonable Ineffectiveness of the Deeper Layers"; ShortGPT's block influence).

For state l and state l+n of the same token, the angular distance

    d(h_l, h_{l+n}) = arccos(cos(h_l, h_{l+n})) / pi   in [0, 1]

computed from the dot products, and as 2 atan2(|u - v|, |u + v|) / pi on the unit vectors u, v
where cos > 0.99 (there arccos of a float32 cos loses half its digits), averaged over every
real token after ``extraction.skip_first`` of every prompt (token-weighted), for n = 1 ...
``max_n``. Logged: the curves ``layer_distance/n<n>`` (value at layer l: d(l, l+n); NaN where
l+n > L), and per n the block whose removal changes the states least: blocks l+1 ... l+n for
the l with the smallest d(l, l+n) (summaries ``layer_distance/n<n>/min_layer``, ``.../min``; tag
``lw.layer_distance.prunable`` for n = max_n).

In-pass products: the per-prompt mean distance ``layer_distance/<n>`` (N, L+1), cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lw.errors import check
from lw.metrics.registry import Metric, Output


@dataclass
class LayerDistanceKnobs:
    max_n: int = 4                   # the largest block of layers compared (n = 1 ... max_n)

    def __post_init__(self) -> None:
        check(self.max_n >= 1, f"metric.layer_distance.max_n={self.max_n}: must be >= 1")


NEAR_PARALLEL = 0.99  # cos above this: recomputed from u - v (float32's cos loses the angle)


def layer_distances(hidden: Tensor, mask: Tensor, offsets) -> dict[int, Tensor]:
    """Per prompt, the mean angular distance between states l and l+n over its masked tokens,
    for each n in ``offsets``.

    Args:
        hidden: ``(L+1, B, T, D)`` token states; mask: ``(B, T)`` bool, the tokens counted.
        offsets: layer offsets n >= 1.

    Returns:
        ``{n: (L+1, B)}`` float64 in [0, 1]; NaN for l + n > L and for prompts with no token.
    """
    states, batch = hidden.shape[0], hidden.shape[1]
    # the norms once for every n, the dot products without a (L+1, B, T, D) temporary
    norms = torch.linalg.vector_norm(hidden, dim=-1).double().clamp(min=torch.finfo().tiny)
    weights = mask.to(device=hidden.device, dtype=torch.float64)
    count = weights.sum(dim=-1)
    out = {}
    for n in offsets:
        curve = torch.full((states, batch), math.nan, dtype=torch.float64, device=hidden.device)
        if n < states:
            a, b = hidden[:-n], hidden[n:]
            cos = torch.einsum("...d,...d->...", a, b).double() / (norms[:-n] * norms[n:])
            angle = torch.arccos(cos.clamp(-1.0, 1.0))                      # (L+1-n, B, T)
            near = (cos > NEAR_PARALLEL).nonzero(as_tuple=True)
            if len(near[0]):  # exact for nearly parallel states: 2 atan2(|u - v|, |u + v|)
                u = a[near] / norms[:-n][near].unsqueeze(-1).to(a.dtype)
                v = b[near] / norms[n:][near].unsqueeze(-1).to(b.dtype)
                angle[near] = 2 * torch.atan2(torch.linalg.vector_norm(u - v, dim=-1),
                                              torch.linalg.vector_norm(u + v, dim=-1)).double()
            curve[:-n] = (angle / math.pi * weights).sum(dim=-1) / count
        out[n] = curve
    return out


def angular_distances(hidden: Tensor, mask: Tensor, n: int) -> Tensor:
    """``(L+1, B)``: :func:`layer_distances` for one offset n."""
    return layer_distances(hidden, mask, [n])[n]


def _products(job) -> list[str]:
    return [f"layer_distance/{n}" for n in range(1, job.metric.layer_distance.max_n + 1)]


def _token_fn(job, loaded, wanted: list[str]):
    offsets = [int(name.split("/")[1]) for name in wanted]

    def batch_products(hidden: Tensor, mask: Tensor, _ids: Tensor) -> dict[str, Tensor]:
        return {f"layer_distance/{n}": d for n, d in layer_distances(hidden, mask, offsets).items()}

    return batch_products


def _compute(inputs) -> Output:
    weights = inputs.rows.double()                                          # (N,) tokens
    per_layer, summary, tags = {}, {}, {}
    max_n = inputs.knobs.max_n
    for n in range(1, max_n + 1):
        per_prompt = inputs.products[f"layer_distance/{n}"]                  # (N, L+1)
        curve = (weights @ per_prompt.nan_to_num(0.0)) / weights.sum()
        curve[per_prompt.isnan().all(dim=0)] = math.nan
        per_layer[f"layer_distance/n{n}"] = curve
        if curve.isnan().all():
            continue
        start = int(curve.nan_to_num(math.inf).argmin())
        summary[f"summary/layer_distance/n{n}/min_layer"] = float(start)
        summary[f"summary/layer_distance/n{n}/min"] = float(curve[start])
        if n == max_n:
            tags["lw.layer_distance.prunable"] = (
                f"blocks {start + 1}-{start + n} (states {start} -> {start + n}, "
                f"distance {float(curve[start]):.4f})")
    return Output(per_layer=per_layer, summary=summary, tags=tags)


METRIC = Metric(
    name="layer_distance",
    definition="Layer-comparison measures (beyond the papers)/Angular distance",
    compute=_compute, needs=("tokens",), knobs=LayerDistanceKnobs,
    logs={"layer_distance/": None}, products=_products, token_fn=_token_fn,
    description="angular distance between the token states of layers l and l+n")
