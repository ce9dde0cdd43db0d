"""cka: linear CKA between every pair of layers on the pooled vectors (Kornblith et al. 2019).

For layers l, m with pooled vectors X_l (N, D), centered (X - mean over prompts), and Gram
matrices K_l = X_l X_l^T:

    CKA(l, m) = HSIC(K_l, K_m) / sqrt(HSIC(K_l, K_l) HSIC(K_m, K_m))

with the biased HSIC(K, L) = tr(K L) / (N-1)^2 (here tr(K_l K_m) = ||X_m^T X_l||_F^2), or, with
``metric.cka.debiased=true``, the unbiased estimator of Song et al. (2012), for small N: with
K~ = K with its diagonal set to 0,

    HSIC_u(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((N-1)(N-2)) - 2/(N-2) 1^T K~ L~ 1]
                   / (N (N-3))

CKA is 1 for a layer with itself and invariant to orthogonal transforms and isotropic scaling
of either layer's vectors. Logged: the (L+1) x (L+1) matrix (results/cka_matrix.csv and a heat
map), and the curves ``cka/to_last`` (each layer against the last) and ``cka/to_next`` (layer l
against l+1; NaN for the last).

Memory: the (L+1) N x N Gram matrices in float64, (L+1) N^2 8 B (31 x 512^2 x 8 B = 65 MB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lw.metrics.pairwise import Pairwise, PairwiseKnobs, declare


@dataclass
class CKAKnobs(PairwiseKnobs):
    debiased: bool = False           # the unbiased HSIC estimator (N >= 4)


def grams(pooled: Tensor, debiased: bool = False) -> Tensor:
    """``(L+1, N, N)`` float64 Gram matrices of each layer's centered pooled vectors ``(N, L+1,
    D)``; with ``debiased``, their diagonals set to 0 (K~)."""
    x = pooled.transpose(0, 1).double()                                     # (L+1, N, D)
    x = x - x.mean(dim=1, keepdim=True)
    gram = x @ x.transpose(1, 2)
    if debiased:
        gram = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    return gram


def hsic(a: Tensor, b: Tensor, debiased: bool = False) -> Tensor:
    """``(La, Lb)`` HSIC between every Gram matrix of ``a`` ``(La, N, N)`` and of ``b``
    (as :func:`grams` gives them), up to the factor common to all pairs of a biased estimate."""
    n = a.shape[1]
    cross = a.flatten(1) @ b.flatten(1).T                                   # tr(K L)
    if not debiased:
        return cross
    if n < 4:
        return torch.full((a.shape[0], b.shape[0]), math.nan, dtype=torch.float64)
    total_a, total_b = a.sum(dim=(1, 2)), b.sum(dim=(1, 2))                 # 1^T K~ 1
    rows_a, rows_b = a.sum(dim=2), b.sum(dim=2)                             # K~ 1
    return (cross + torch.outer(total_a, total_b) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * rows_a @ rows_b.T) / (n * (n - 3))


def cka_between(a: Tensor, b: Tensor, debiased: bool = False) -> Tensor:
    """``(La+1, Lb+1)`` linear CKA between every layer of pooled vectors ``a`` ``(N, La+1, Da)``
    and every layer of ``b`` ``(N, Lb+1, Db)`` (the same N prompts, in the same order; the
    widths may differ: two models). NaN where a layer's vectors are all equal."""
    ga = grams(a, debiased)
    gb = ga if b is a else grams(b, debiased)  # within a model: the Gram matrices once
    scale_a = torch.diagonal(hsic(ga, ga, debiased)).clamp(min=0).sqrt()
    scale_b = scale_a if b is a else torch.diagonal(hsic(gb, gb, debiased)).clamp(min=0).sqrt()
    scale = torch.outer(scale_a, scale_b)
    return torch.where(scale > 0, hsic(ga, gb, debiased) / scale, math.nan)


def cka_matrix(pooled: Tensor, debiased: bool = False) -> Tensor:
    """Linear CKA between every pair of layers.

    Args:
        pooled: ``(N, L+1, D)`` one vector per prompt and layer.
        debiased: unbiased HSIC (needs N >= 4; NaN otherwise).

    Returns:
        ``(L+1, L+1)`` float64, symmetric; NaN where a layer's vectors are all equal.
    """
    return cka_between(pooled, pooled, debiased)


METRIC = declare(Pairwise(
    name="cka", between=cka_between, knobs=CKAKnobs, label="linear CKA",
    definition="Layer-comparison measures (beyond the papers)/Linear CKA",
    description="linear CKA between every pair of layers (matrix, to_last, to_next)"))
