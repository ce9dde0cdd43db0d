"""Intrinsic dimension of a set of vectors by TwoNN (Facco et al. 2017), as dadapy's
``Data.compute_id_2NN()`` computes it (the authors' registry; dadapy itself needs numpy < 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from lw.errors import LwError


def twonn(points: Tensor, fraction: float = 0.9) -> Tensor:
    """TwoNN intrinsic dimension, batched over leading dims (layers).

    For each point, ``mu = r2 / r1`` (distances to its 2 nearest other points, Euclidean).
    With the ``log mu`` sorted ascending and ``F_i = i / n`` (i = 1..n), the smallest
    ``floor(fraction n)`` are fitted by least squares through the origin:
    ``-ln(1 - F_i) = d ln mu_(i)``, so ``d = sum(x y) / sum(x^2)``. Points with ``r1 = 0``
    (duplicates) have no ratio and are left out (n counts the rest).

    Args:
        points: ``(..., N, D)``, N >= 3 (else LwError). Memory: one leading index's points
            in float64 plus a block of at most 2**24 distances, whatever the leading dims.
        fraction: share of the smallest ratios fitted, in (0, 1) (dadapy's default 0.9).

    Returns:
        ``(...)`` float64; NaN where fewer than 2 ratios are fitted.
    """
    *lead, n, _ = points.shape
    if n < 3:
        raise LwError(f"intrinsic dimension (TwoNN) needs at least 3 points, got {n}")
    # One layer at a time, distances a block of rows at a time: the peak is one layer's
    # points in float64 plus a (rows x N) block, not an (L+1) x N x N tensor.
    flat = points.reshape(-1, *points.shape[-2:])
    r1 = torch.empty(flat.shape[0], n, dtype=torch.float64, device=points.device)
    r2 = torch.empty_like(r1)
    rows = max(1, 2**24 // n)                                  # a block: <= 128 MiB float64
    for index in range(flat.shape[0]):
        x = flat[index].double()
        for start in range(0, n, rows):
            block = torch.cdist(x[start:start + rows], x,
                                compute_mode="donot_use_mm_for_euclid_dist")
            own = torch.arange(block.shape[0], device=x.device)
            block[own, own + start] = torch.inf                # a point is not its neighbour
            nearest = block.topk(2, dim=-1, largest=False).values
            r1[index, start:start + rows], r2[index, start:start + rows] = nearest.unbind(-1)
    r1, r2 = r1.reshape(*lead, n), r2.reshape(*lead, n)                         # (..., N)
    valid = r1 > 0
    log_mu = torch.where(valid, (r2 / r1.clamp(min=torch.finfo(torch.float64).tiny)).log(),
                         torch.inf).sort(dim=-1).values
    n_valid = valid.sum(-1, keepdim=True).double()                             # (..., 1)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=points.device)
    fitted = i <= torch.floor(fraction * n_valid)
    y = -torch.log1p(-torch.where(fitted, i / n_valid, 0.0))
    log_mu = torch.where(fitted, log_mu, 0.0)
    d = (log_mu * y).sum(-1) / log_mu.square().sum(-1)
    return torch.where(fitted.sum(-1) >= 2, d, torch.nan)
