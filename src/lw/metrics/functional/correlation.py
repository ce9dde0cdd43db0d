"""Pearson and Spearman correlation of paired samples, batched over leading dims (layers)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n along the last dim, ties sharing their average rank (scipy's ``rankdata``).

    rank_i = #{j: x_j < x_i} + (#{j: x_j = x_i} + 1) / 2. Pairwise: O(n^2) memory per row,
    meant for n up to a few thousand.
    """
    below = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1)
    tied = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1)
    return below.to(torch.float64) + (tied.to(torch.float64) + 1) / 2


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """r = sum(dx dy) / sqrt(sum(dx^2) sum(dy^2)) along the last dim, dx = x - mean(x).

    Args:
        x, y: ``(..., n)``, broadcastable. Returns ``(...)`` float64; NaN where either side is
        constant or holds a NaN.
    """
    x, y = torch.broadcast_tensors(x.double(), y.double())
    dx, dy = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    denominator = (dx.square().sum(-1) * dy.square().sum(-1)).sqrt()
    r = (dx * dy).sum(-1) / denominator
    return torch.where(denominator > 0, r.clamp(-1, 1), torch.nan)


def pvalue(r: Tensor, n: int) -> Tensor:
    """Two-sided p-value of a correlation r over n pairs under independence:
    t = r sqrt((n - 2) / (1 - r^2)), Student's t with n - 2 degrees of freedom (what scipy's
    ``pearsonr`` and ``spearmanr`` report). NaN for n < 3."""
    from scipy.stats import t as student_t  # scipy.stats: 0.6 s to import, not on every path

    if n < 3:
        return torch.full_like(r, torch.nan)
    r_np = r.double().cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r_np * np.sqrt((n - 2) / (1 - r_np**2))
    return torch.from_numpy(2 * student_t.sf(np.abs(t), n - 2)).to(r.device)


def correlations(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``pearson``, ``spearman`` (Pearson of average ranks) and their p-values along the last
    dim of ``x`` and ``y`` (``(..., n)``, broadcastable): each ``(...)`` float64."""
    x, y = torch.broadcast_tensors(x.double(), y.double())
    n = x.shape[-1]
    r = pearson(x, y)
    has_nan = x.isnan().any(-1) | y.isnan().any(-1)
    rho = torch.where(has_nan, torch.nan, pearson(average_ranks(x), average_ranks(y)))
    return {"pearson": r, "pearson_pvalue": pvalue(r, n),
            "spearman": rho, "spearman_pvalue": pvalue(rho, n)}
