"""svcca: singular vector CCA between every pair of layers on the pooled vectors (Raghu et al.
2017; code: google/svcca, ``cca_core.py`` and ``tutorials/001_Introduction.ipynb``).

For layers l, m with pooled vectors X (N, Da) and Y (N, Db), each centred over the prompts:

1. SVD step: X = U S V^T; keep the top kx directions, kx = the fewest whose variances (squared
   singular values) make up ``keep`` of the total (``metric.svcca.keep``, default 0.99); the
   reduced data is U_kx S_kx (N, kx). The same for Y.
2. CCA between the two reduced sets: the canonical correlations rho_1 >= ... >= rho_min(kx, ky)
   are the singular values of U_kx^T U_ky, the cosines of the principal angles between the two
   kept subspaces of R^N (Björck & Golub 1973; the same numbers as the covariance form
   Sxx^-1/2 Sxy Syy^-1/2).

        svcca(l, m) = (1 / min(kx, ky)) sum_i rho_i,        in [0, 1]

SVCCA is 1 for a layer with itself, symmetric, and invariant to translation, orthogonal maps and
permutations of either layer's units and isotropic scaling; not to other invertible linear maps,
since the SVD step ranks directions by their variance (with ``keep=1`` it is plain CCA, which is
invariant to any invertible map of the units). Logged: the (L+1) x (L+1) matrix
(results/svcca_matrix.csv and a heat map), and the curves ``svcca/to_last`` and
``svcca/to_next`` (NaN for the last layer).

As google/svcca computes it: its tutorials centre each unit over the datapoints, take
``np.linalg.svd`` of the (units, datapoints) matrix, keep ``s[:k] * V[:k]`` with k fixed by hand
(20 in the introduction; the paper keeps 99% of the variance, as here), and report
``np.mean(cca_core.get_cca_similarity(...)["cca_coef1"])``: the mean of all min(kx, ky)
canonical correlations, which ``get_cca_similarity`` takes from the covariance matrices
(``np.cov``, rescaled by their largest entry, ``epsilon`` added to their diagonals, ``pinv``,
square roots by ``eigh``). The same numbers here: tests/test_svcca.py follows that code in numpy.
Not used: the dictionary's ``"mean"``, which averages only the leading coefficients that make up
``threshold`` (0.98) of their sum, and the ``epsilon`` ridge (0 by default; the 1e-10 the
tutorials pass changes nothing, the SVD step leaves a well-conditioned problem). moskomule/anatome
(``distance.py``, ``_svd_reduction``) counts the kept directions by the singular values, not
their squares, and keeps those whose running share is strictly below ``keep``: fewer
directions than here.

Numerics: one thin SVD per layer of the centred vectors, in float64. Directions whose singular
value is below max(N, D) eps ||X||_F (X uncentred: what centring's rounding can leave) are not
directions of the data, so kx <= rank X <= min(N-1, D); a layer whose vectors are all equal has
none and gives NaN. Few prompts: google/svcca refuses fewer datapoints than units (plain CCA is
then degenerate: every canonical correlation is 1). Here the SVD step is what keeps SVCCA
defined, but two kept subspaces of the (N-1)-dimensional space of centred prompt vectors share
at least kx + ky - (N-1) directions, each a canonical correlation of exactly 1: once kx + ky >
N - 1, SVCCA is pushed towards 1 whatever the layers (use more prompts, or a lower ``keep``).

Cost: per layer an SVD, O(N D min(N, D)); per pair of layers an SVD of a kx x ky matrix; within a
model (L+1)(L+2)/2 pairs (the matrix is symmetric). Memory: the (L+1) N x min(N, D) bases in
float64 (33 x 512 x 512 x 8 B = 69 MB) and one row of pairs' kx x ky matrices. Measured
(``bench/bench.py --pairwise``, 2 CPU cores): the whole matrix at smollm2's shape (N = 512, 31
layers) on full-rank vectors (kx near N, the worst case) takes 12.6 s, 0.14 of smollm2's
forward pass of those prompts; real layers keep fewer directions at 99 % of their variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lw.errors import check
from lw.metrics.pairwise import Pairwise, PairwiseKnobs, declare


@dataclass
class SVCCAKnobs(PairwiseKnobs):
    keep: float = 0.99  # share of variance kept by the SVD step

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.keep <= 1, f"metric.svcca.keep={self.keep}: must be in (0, 1]")


def centred_svd(pooled: Tensor, unit_floor: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each layer's thin SVD ``X_l = U S Vh`` of the pooled vectors ``(N, L+1, D)`` centred over
    the prompts, in float64: ``U`` ``(L+1, N, m)``, ``S`` ``(L+1, m)`` descending, ``Vh``
    ``(L+1, m, D)`` with m = min(N, D), and the numerical ranks ``(L+1,)``; the columns of U, the
    entries of S and the rows of Vh past a layer's rank are zero. With ``unit_floor`` > 0 the
    units whose variance is below ``unit_floor`` times the layer's largest unit variance are
    set to zero first (google/svcca's ``remove_small``)."""
    raw = pooled.transpose(0, 1).double()                                   # (L+1, N, D)
    x = raw - raw.mean(dim=1, keepdim=True)
    if unit_floor > 0:
        variance = x.square().sum(dim=1)                                    # (L+1, D)
        kept = variance >= unit_floor * variance.amax(dim=1, keepdim=True)
        x = x * kept[:, None, :]
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    n, d = x.shape[1:]
    floor = max(n, d) * torch.finfo(torch.float64).eps * raw.flatten(1).norm(dim=1)
    real = s > floor[:, None]
    return u * real[:, None, :], s * real, vh * real[:, :, None], real.sum(dim=1)


def kept_directions(s: Tensor, rank: Tensor, keep: float) -> Tensor:
    """``(L+1,)`` how many leading directions of singular values ``s`` ``(L+1, m)`` make up
    ``keep`` of the variance: the fewest whose squared singular values sum to at least ``keep``
    of the total (all ``rank`` of them for ``keep=1``)."""
    variance = s.square()
    share = variance.cumsum(dim=1) / variance.sum(dim=1, keepdim=True).clamp(min=1e-300)
    if keep >= 1:
        return rank.clone()
    return torch.minimum((share < keep).sum(dim=1) + 1, rank)


def svcca_between(a: Tensor, b: Tensor, keep: float = 0.99) -> Tensor:
    """``(La+1, Lb+1)`` SVCCA between every layer of pooled vectors ``a`` ``(N, La+1, Da)`` and
    every layer of ``b`` ``(N, Lb+1, Db)`` (the same N prompts, in the same order; the widths may
    differ: two models): the mean canonical correlation of the directions that make up ``keep``
    of each layer's variance. NaN where a layer's vectors are all equal."""
    check(0 < keep <= 1, f"metric.svcca.keep={keep}: must be in (0, 1]")
    within = b is a

    def bases(pooled: Tensor) -> tuple[Tensor, Tensor]:
        u, s, _, rank = centred_svd(pooled)
        k = kept_directions(s, rank, keep)
        columns = torch.arange(u.shape[-1], device=u.device)
        u = u * (columns[None, :] < k[:, None])[:, None, :]                 # kept directions
        return u[:, :, :max(int(k.max()), 1)], k

    ua, ka = bases(a)
    ub, kb = (ua, ka) if within else bases(b)
    out = torch.full((ua.shape[0], ub.shape[0]), math.nan, dtype=torch.float64,
                     device=ua.device)
    for layer in range(ua.shape[0]):
        first = layer if within else 0  # within a model: the upper triangle, mirrored
        rho = torch.linalg.svdvals(ua[layer].T @ ub[first:])                 # zero-padded
        pairs = torch.minimum(ka[layer], kb[first:]).double()
        row = torch.where(pairs > 0, rho.sum(dim=-1) / pairs.clamp(min=1), math.nan)
        out[layer, first:] = row
        if within:
            out[first:, layer] = row
    return out


METRIC = declare(Pairwise(
    name="svcca", between=svcca_between, knobs=SVCCAKnobs, label="SVCCA",
    definition="Similarity family, sinks and Seq-VCR (beyond the papers)/SVCCA",
    description="SVCCA (Raghu et al. 2017): mean canonical correlation of the directions "
                "holding a share keep (0.99) of each layer's variance, between every pair of "
                "layers (matrix, to_last, to_next)"))
