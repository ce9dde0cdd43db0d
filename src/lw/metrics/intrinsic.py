"""Intrinsic dimension of a set of vectors by TwoNN (Facco et al. 2017), as dadapy's
``Data.compute_id_2NN()`` computes it (the authors' registry; dadapy itself needs numpy < 2)."""

from __future__ import annotations

import torch
from torch import Tensor


def twonn(points: Tensor, fraction: float = 0.9) -> Tensor:
    """TwoNN intrinsic dimension, batched over leading dims (layers).

    For each point, ``mu = r2 / r1`` (distances to its 2 nearest other points, Euclidean).
    With the ``log mu`` sorted ascending and ``F_i = i / n`` (i = 1..n), the smallest
    ``floor(fraction n)`` are fitted by least squares through the origin:
    ``-ln(1 - F_i) = d ln mu_(i)``, so ``d = sum(x y) / sum(x^2)``. Points with ``r1 = 0``
    (duplicates) have no ratio and are left out (n counts the rest).

    Args:
        points: ``(..., N, D)``, N >= 3.
        fraction: share of the smallest ratios fitted, in (0, 1) (dadapy's default 0.9).

    Returns:
        ``(...)`` float64; NaN where fewer than 2 ratios are fitted.
    """
    x = points.double()
    distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    n = x.shape[-2]
    distances.diagonal(dim1=-2, dim2=-1).fill_(torch.inf)
    r1, r2 = distances.topk(2, dim=-1, largest=False).values.unbind(-1)        # (..., N)
    valid = r1 > 0
    log_mu = torch.where(valid, (r2 / r1.clamp(min=torch.finfo(x.dtype).tiny)).log(),
                         torch.inf).sort(dim=-1).values
    n_valid = valid.sum(-1, keepdim=True).double()                             # (..., 1)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    fitted = i <= torch.floor(fraction * n_valid)
    y = -torch.log1p(-torch.where(fitted, i / n_valid, 0.0))
    log_mu = torch.where(fitted, log_mu, 0.0)
    d = (log_mu * y).sum(-1) / log_mu.square().sum(-1)
    return torch.where(fitted.sum(-1) >= 2, d, torch.nan)
