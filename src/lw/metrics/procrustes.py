"""procrustes: orthogonal Procrustes distance between every pair of layers on the pooled vectors
(Ding, Denain & Steinhardt 2021, code: js-d/sim_metric ``dists/scoring.py``; Williams et al.
2021, code: ahwillia/netrep).

For layers l, m with pooled vectors X (N, Da) and Y (N, Db), each centred over the prompts and
scaled to unit Frobenius norm (||X||_F = ||Y||_F = 1):

        procrustes(l, m) = min_Q ||X - Y Q||_F^2 = 2 - 2 ||X^T Y||_*,       in [0, 2]

(||.||_* the nuclear norm, the sum of singular values; Q ranges over the matrices with
orthonormal rows or columns, so the widths may differ: two models). A distance: 0 for a layer
with itself and whenever Y = X Q for an orthogonal Q (after centring and scaling), symmetric,
and invariant to translation, isotropic scaling, and orthogonal maps and permutations of either
layer's units; not to other invertible linear maps (unlike CCA). Logged: the (L+1) x (L+1)
matrix (results/procrustes_matrix.csv and a heat map, coloured over 0-2), and the curves
``procrustes/to_last`` and ``procrustes/to_next`` (NaN for the last layer); lower is more alike.

As the references compute it: Ding et al.'s ``score_pair.py`` centres each unit over the
datapoints and divides each representation by its Frobenius norm, and ``scoring.procrustes``
returns ``||A||_F^2 + ||B||_F^2 - 2 ||A B^T||_*``: this form, the squared Procrustes distance, as
docs/METRICS.md states it. netrep's ``LinearMetric(alpha=1)`` (centred, zero-padded to equal
widths) reports the angle ``arccos(||X^T Y||_* / (||X||_F ||Y||_F))`` in [0, pi/2] instead, by
default; the two are one function of the other, d = 2 - 2 cos(angle). anatome's
``orthogonal_procrustes_distance`` returns half of d.

Computed from one thin SVD per layer, X = U S V^T: ||X^T Y||_* is the nuclear norm of the
min(N, Da) x min(N, Db) matrix S_x U_x^T U_y S_y (V_x, V_y have orthonormal columns). Numerics:
float64; a layer whose centred vectors have no singular value above max(N, D) eps ||X||_F (X
uncentred: all its vectors equal, up to rounding) gives NaN; rounding can push d a little below
0 for equal layers: it is clipped at 0. Unlike CCA it needs no more prompts than units.

Cost: per layer an SVD, O(N D min(N, D)); per pair an SVD of a min(N, Da) x min(N, Db) matrix
(singular values only); within a model (L+1)(L+2)/2 pairs (the matrix is symmetric). Memory:
the (L+1) N x min(N, D) bases in float64 (33 x 512 x 512 x 8 B = 69 MB) and one row of pairs'
matrices. Measured (``bench/bench.py --pairwise``, 2 CPU cores): the whole matrix at smollm2's
shape (N = 512, 31 layers) on full-rank vectors takes 21 s, 0.23 of smollm2's forward pass of
those prompts: the 496 SVDs of 512 x 512 matrices cannot fit in a tenth of it at this N.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lw.metrics.pairwise import Pairwise, PairwiseKnobs, declare
from lw.metrics.svcca import centred_svd


def scaled_bases(pooled: Tensor) -> tuple[Tensor, Tensor]:
    """``(L+1, N, m)`` U S of each layer's centred pooled vectors ``(N, L+1, D)`` scaled to unit
    Frobenius norm (m = min(N, D)), and ``(L+1,)`` whether the layer varies at all (zero if
    not)."""
    u, s, _, rank = centred_svd(pooled)
    varies = rank > 0
    scale = torch.where(varies, 1 / s.square().sum(dim=1).sqrt().clamp(min=1e-300), 0.0)
    return u * (s * scale[:, None])[:, None, :], varies


def procrustes_between(a: Tensor, b: Tensor) -> Tensor:
    """``(La+1, Lb+1)`` orthogonal Procrustes distance 2 - 2 ||X^T Y||_* between every layer of
    pooled vectors ``a`` ``(N, La+1, Da)`` and every layer of ``b`` ``(N, Lb+1, Db)`` (the same
    N prompts, in the same order; the widths may differ: two models), each centred and scaled to
    unit Frobenius norm. NaN where a layer's vectors are all equal."""
    within = b is a
    xa, va = scaled_bases(a)
    xb, vb = (xa, va) if within else scaled_bases(b)
    out = torch.empty((xa.shape[0], xb.shape[0]), dtype=torch.float64, device=xa.device)
    for layer in range(xa.shape[0]):
        first = layer if within else 0  # within a model: the upper triangle, mirrored
        nuclear = torch.linalg.svdvals(xa[layer].T @ xb[first:]).sum(dim=-1)
        row = (2 - 2 * nuclear).clamp(min=0)
        out[layer, first:] = row
        if within:
            out[first:, layer] = row
    return torch.where(va[:, None] & vb[None, :], out, math.nan)


METRIC = declare(Pairwise(
    name="procrustes", between=procrustes_between, knobs=PairwiseKnobs, best=0.0,
    higher_is_more_similar=False, scale=(0.0, 2.0), label="orthogonal Procrustes distance",
    definition="Similarity family, sinks and Seq-VCR (beyond the papers)/"
               "Orthogonal Procrustes distance",
    description="orthogonal Procrustes distance (Ding et al. 2021): 2 - 2 times the nuclear "
                "norm of X^T Y for centred, unit-norm vectors, between every pair of layers "
                "(matrix, to_last, to_next); 0 for equal layers"))
