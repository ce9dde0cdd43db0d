"""pwcca: projection-weighted CCA between every pair of layers on the pooled vectors (Morcos et
al. 2018; code: google/svcca, ``pwcca.py`` on ``cca_core.py``).

For layers l, m with pooled vectors X (N, Da) and Y (N, Db), each centred over the prompts,
with ranks rx <= ry (else the roles swap): CCA gives the canonical correlations
rho_1 >= ... >= rho_rx and X's canonical variates h_1, ..., h_rx (unit vectors of R^N, the
linear combinations of X's units that correlate best with Y's, orthogonal to each other);
with x_j the j-th unit (column) of X,

        a_i = sum_j |<h_i, x_j>|,        pwcca(l, m) = sum_i a_i rho_i / sum_i a_i,  in [0, 1]

Computed from one thin SVD per layer, X = U S V^T: the canonical correlations are the singular
values of ``U_x^T U_y = P diag(rho) Q^T``, the variates ``U_x P``, and
``<h_i, x_j> = (P^T S V^T)_ij``.

Which side is weighted: google/svcca's ``compute_pwcca`` weights the variates of the layer with
fewer units (``x_idxs``, those it keeps), the first one on a tie; here the layer of lower rank,
the first (the row layer ``l``) on a tie: the same choice whenever, as google/svcca requires,
there are more prompts than units and the units are linearly independent. docs/METRICS.md
says X's variates; lw follows the code, which differs from that when Y is the narrower layer
(two models). The matrix is not symmetric: within a model, entry (l, m) weights layer l's
variates.

Invariances: the canonical correlations are invariant to any invertible linear map of either
layer's units, the weights are not: they are taken in the basis of units. PWCCA is invariant to
translation, isotropic scaling, permutations and sign flips of either layer's units, and to any
invertible map of the units of the side that is not weighted; not to rotations of the weighted
side's units. It is 1 for a layer with itself.

As google/svcca computes it: ``get_cca_similarity`` (covariances by ``np.cov`` rescaled by their
largest entry; units whose rescaled variance is below ``epsilon`` dropped, ``remove_small``;
``epsilon`` added to the diagonals; ``pinv``; ``Sxx^-1/2 Sxy Syy^-1/2`` and its SVD), then the
weights as above, normalised to sum to 1, against ``cca_coef1``. Its canonical directions are
``cca_dirns1 = coef_x invsqrt_xx (acts - mean) + mean`` (the ``compute_dirns`` branch),
orthonormalised by a QR in ``pwcca.py``: the variates h_i here. Two differences from its current
``pwcca.py``:

- it forms the directions as ``coef_x (acts - mean) + mean``, without ``invsqrt_xx``: those are
  not the canonical variates unless X's units are uncorrelated with equal variances (where the
  two agree); lw follows the paper (the variates h_i), as google/svcca's own ``cca_dirns1`` and
  Ding et al.'s reimplementation (js-d/sim_metric ``dists/scoring.py``, ``pwcca_dist``) do;
- it adds the units' means back to the directions and projects the uncentred activations; here
  both are centred (the same for centred data; otherwise theirs depends on the units' means).

tests/test_pwcca.py follows both in numpy on a fixed case. ``epsilon`` (``metric.pwcca.epsilon``,
default 0 as in ``compute_pwcca``) is theirs: units with variance below ``epsilon`` times the
layer's largest unit variance are left out, and ``epsilon`` times that largest variance is added
to the covariance's diagonal (ridge CCA: rho_i shrink below 1); with it the variates are
orthonormalised by a QR, as ``pwcca.py`` does. Ding et al. always weight X's variates and cut
their weights to min(Da, Db) entries without renormalising them; moskomule/anatome sums
``|h_i|`` over the prompts instead of ``|<h_i, x_j>|`` over the units (its issue #30).

Numerics: float64. Directions with a singular value below max(N, D) eps ||X||_F (X uncentred)
are not directions of the data; a layer whose vectors are all equal has rank 0 and gives NaN.
Few prompts: google/svcca refuses fewer datapoints than units, because CCA then degenerates:
centred prompt vectors live in an (N-1)-dimensional space, two layers of rank rx, ry share at
least rx + ry - (N-1) directions, each a canonical correlation of exactly 1, and once both ranks
reach N - 1 (N <= the widths, as with 512 prompts of 768-wide or wider models) every
correlation is 1 and PWCCA is 1 for every pair. Use more prompts than units (better, more than
Da + Db), or SVCCA (its SVD step) or CKA. ``epsilon`` does not rescue it: its ridge is a share
of one unit's variance, small against the variance along each direction when D >> N (it pulls
the 1s down a little, by amounts set by the layers' spectra rather than by how alike they are),
and a larger ``epsilon`` drops units. Canonical variates of equal correlations (such as those
ties at 1) are not unique, and their weights depend on the basis picked.

Cost: per layer an SVD, O(N D min(N, D)); per pair an SVD of an rx x ry matrix and the weights,
O(rx^2 D); (L+1)^2 pairs within a model (not symmetric). Memory: the (L+1) N x min(N, D) bases
and their (L+1) min(N, D) x D unit coordinates in float64, and at most about 256 MB of weights
in flight. Measured (``bench/bench.py --pairwise``, 2 CPU cores): the whole matrix at smollm2's
shape (N = 512, 31 layers) on full-rank vectors takes 74 s, 0.79 of smollm2's forward pass of
those prompts: 961 SVDs of 511 x 511 matrices and their weights; it is the costliest measure
here (and at N <= D, as there, it reads near 1 anyway: see above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lw.errors import check
from lw.metrics.pairwise import Pairwise, PairwiseKnobs, declare
from lw.metrics.svcca import centred_svd

CHUNK = 2 ** 25  # float64 elements of weights (variates x units) computed at once


@dataclass
class PWCCAKnobs(PairwiseKnobs):
    # google/svcca's epsilon: units below it (share of the largest unit variance) are left
    # out, and it (times that variance) is added to the covariances' diagonals; 0: plain CCA
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.epsilon < 1, f"metric.pwcca.epsilon={self.epsilon}: must be in [0, 1)")


def canonical_bases(pooled: Tensor, epsilon: float = 0.0):
    """Per layer: the orthonormal basis ``U`` ``(L+1, N, m)`` of the centred vectors, the
    ranks, the units' coordinates in it ``S Vh`` ``(L+1, m, D)``, and the ridge's shrinkage of
    each basis direction, s / sqrt(s^2 + ridge) (1 without a ridge)."""
    u, s, vh, rank = centred_svd(pooled, unit_floor=epsilon)
    units = s[:, :, None] * vh                                              # (L+1, m, D)
    if epsilon > 0:  # the ridge: epsilon times the largest unit's sum of squares (|x_j|^2)
        ridge = epsilon * units.square().sum(dim=1).amax(dim=1)
        shrink = s / (s.square() + ridge[:, None]).sqrt()
    else:
        shrink = (s > 0).double()
    return u, rank, units, shrink


def pwcca_between(a: Tensor, b: Tensor, epsilon: float = 0.0) -> Tensor:
    """``(La+1, Lb+1)`` PWCCA between every layer of pooled vectors ``a`` ``(N, La+1, Da)`` and
    every layer of ``b`` ``(N, Lb+1, Db)`` (the same N prompts, in the same order; the widths may
    differ: two models), weighting the variates of the layer of lower rank (of ``a`` on a tie).
    NaN where a layer's vectors are all equal."""
    check(0 <= epsilon < 1, f"metric.pwcca.epsilon={epsilon}: must be in [0, 1)")
    ua, ra, units_a, fa = canonical_bases(a, epsilon)
    ub, rb, units_b, fb = (ua, ra, units_a, fa) if b is a else canonical_bases(b, epsilon)
    out = torch.full((ua.shape[0], ub.shape[0]), math.nan, dtype=torch.float64,
                     device=ua.device)
    for layer in range(ua.shape[0]):
        r = int(ra[layer])
        if r == 0:
            continue
        left = ua[layer, :, :r] * fa[layer, :r]                             # (N, r)
        for rank in sorted({int(v) for v in rb if v > 0}):
            group = torch.nonzero(rb == rank).flatten()
            weighted_a = r <= rank
            width = units_a.shape[-1] if weighted_a else units_b.shape[-1]
            step = max(1, CHUNK // (min(r, rank) * width))
            for chunk in group.split(step):
                right = ub[chunk, :, :rank] * fb[chunk, None, :rank]        # (g, N, rank)
                p, rho, qh = torch.linalg.svd(left.T @ right, full_matrices=False)
                if weighted_a:  # a's variates, in a's basis, and a's units
                    variates = fa[layer, :r, None] * p                      # (g, r, r)
                    units = units_a[layer, :r]                              # (r, Da)
                else:
                    variates = fb[chunk, :rank, None] * qh.mT               # (g, rank, rank)
                    units = units_b[chunk, :rank]                           # (g, rank, Db)
                variates = torch.linalg.qr(variates).Q
                weights = (variates.mT @ units).abs().sum(dim=-1)           # (g, min(r, rank))
                out[layer, chunk] = (weights * rho).sum(dim=-1) / weights.sum(dim=-1)
    return out


METRIC = declare(Pairwise(
    name="pwcca", between=pwcca_between, knobs=PWCCAKnobs, label="PWCCA",
    definition="Similarity family, sinks and Seq-VCR (beyond the papers)/PWCCA",
    description="projection-weighted CCA (Morcos et al. 2018) between every pair of layers "
                "(matrix, to_last, to_next); needs more prompts than units"))
