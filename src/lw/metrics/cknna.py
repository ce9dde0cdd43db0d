"""cknna: centered kernel nearest-neighbour alignment between every pair of layers on the pooled
vectors (Huh et al. 2024, "The Platonic Representation Hypothesis"; code: minyoungg/platonic-rep,
``metrics.py``, ``AlignmentMetrics.cknna``): CKA restricted to the pairs of prompts that are
near neighbours in both layers.

For layers l, m with pooled vectors X_l, X_m (N, D), rows L2-normalised, linear kernels
K = X_l X_l^T and L = X_m X_m^T, P (Q) the 0/1 mask of each prompt's k nearest other prompts by
K (by L; row i marks i's neighbours, the diagonal never), and M = P∘Q:

    CKNNA(l, m) = HSIC(M∘K, M∘L) / sqrt(HSIC(P∘K, P∘K) HSIC(Q∘L, Q∘L))

with the unbiased HSIC of Song et al. (2012), for matrices A, B with zero diagonals

    HSIC(A, B) = [tr(A B) + (1^T A 1)(1^T B 1) / ((N-1)(N-2)) - 2/(N-2) 1^T A B 1] / (N (N-3))

It is 1 for a layer with itself and invariant to rotations and isotropic scaling of either
layer's vectors (and to rescaling single prompts' vectors: the rows are normalised). It is not
0 for unrelated vectors: about the chance overlap of the masks (near mutual_knn's k/(N-1);
``calibrate=true`` reads it against the permutation null), and not symmetric: CKNNA(l, m) !=
CKNNA(m, l) in general, through the term 1^T A B 1 (below). With k = N-1 (every other prompt a
neighbour) it is the unbiased linear CKA of the normalised vectors (``metric.cka.debiased=true``
on them). The knob ``k`` (``metric.cknna.k``, default 10 as platonic-rep's ``--topk``) must lie
in [2, N-1] (platonic-rep refuses k < 2; k < N is checked before the model loads, and by the
kernel); NaN for N < 4 and where a layer's own term HSIC(P∘K, P∘K) is not positive.

platonic-rep's computation (``cknna`` with its default ``unbiased=True``, called by
``measure_alignment.compute_score`` with ``normalize=True``): what lw follows where
docs/METRICS.md leaves it open or differs, and the two steps it does not take:

- the rows are L2-normalised first (compute_score does it for every measure; METRICS.md's
  bullet does not say so), and K, L are not centered (the unbiased HSIC needs no centering);
- the masks are not symmetric (j among i's neighbours, not necessarily i among j's), and its
  ``hsic_unbiased`` uses ``sum(K~ * L~.T)`` = tr(A B) and ``sum(K~ @ L~)`` = 1^T A B 1, which
  for such A, B differ from the symmetric forms tr(A B^T), 1^T A^T B 1 (lw.metrics.cka's
  ``hsic``): the trace term counts only the pairs that are neighbours both ways in both layers.
  lw follows the code;
- its score divides by ``sqrt(...) + 1e-6``; lw divides by the square root alone (NaN where it
  is 0), so that the score is exactly scale-free and 1 for identical inputs;
- its pipeline clips each model's features at the 0.95 quantile of their absolute values
  (``prepare_features``) before measuring; lw uses the pooled vectors as they are.

Every pair (l, m) has its own mask M = P_l∘Q_m, so lw.metrics.cka's ``hsic`` (one Gram matrix
per layer) does not apply; with K, L symmetric each term of HSIC(M∘K, M∘L) is a sum over pairs
(i, j) of a product of one factor of layer l and one of layer m, so all pairs of layers come
from matmuls of per-layer ``(L+1, N, N)`` matrices (tr(A B) = sum (P∘P^T∘K)(Q∘Q^T∘L); 1^T A 1
= sum (P∘K) Q; 1^T A B 1 = sum_j (sum_i (P∘K)_ij Q_ij)(sum_k P_jk (Q∘L)_jk)). The neighbour
masks are lw.metrics.mutual_knn's.

Logged: the (L+1) x (L+1) matrix (results/cknna_matrix.csv and a heat map), and the curves
``cknna/to_last`` and ``cknna/to_next`` (NaN for the last layer).

Memory: (L+1) N x N float64 matrices (kernels, masks, their products, transposed copies),
(L+1) N^2 8 B each (31 x 512^2 x 8 B = 65 MB), about 6 per model at the peak (0.4 GB within a
model, 0.7 GB across two of 31 layers and 512 prompts); time (La+1)(Lb+1) N^2 (about 1 s within
such a model on a CPU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lw.errors import check
from lw.metrics.mutual_knn import check_neighbours, neighbours
from lw.metrics.pairwise import Pairwise, PairwiseKnobs, declare


@dataclass
class CKNNAKnobs(PairwiseKnobs):
    k: int = 10                      # neighbours of each prompt (below the number of prompts)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.k >= 2, f"metric.cknna.k={self.k}: must be >= 2 (as platonic-rep's cknna)")


def masked_hsic(mask_a: Tensor, gram_a: Tensor, mask_b: Tensor, gram_b: Tensor,
                pairs: bool = True) -> Tensor:
    """Unbiased HSIC(M∘K, M∘L), M = P∘Q, in platonic-rep's convention (tr(A B), 1^T A B 1),
    between every layer's (P, K) of ``mask_a``, ``gram_a`` ``(La, N, N)`` and every layer's
    (Q, L) of ``mask_b``, ``gram_b`` ``(Lb, N, N)``: ``(La, Lb)``; with ``pairs=False`` (La =
    Lb), layer l against layer l only: ``(La,)``. The masks have zero diagonals, the Gram
    matrices are symmetric. NaN for N < 4."""
    n = gram_a.shape[-1]
    size = (gram_a.shape[0], gram_b.shape[0]) if pairs else (gram_a.shape[0],)
    if n < 4:
        return torch.full(size, math.nan, dtype=torch.float64)
    m = "b" if pairs else "a"
    out = "ab" if pairs else "a"

    def total(x: Tensor, y: Tensor) -> Tensor:                # sum_ij x_l[i, j] y_m[i, j]
        return torch.einsum(f"aij,{m}ij->{out}", x, y)

    def per_row(x: Tensor, y: Tensor) -> Tensor:              # sum_j x_l[i, j] y_m[i, j]
        return torch.einsum(f"aij,{m}ij->{out}i", x, y)  # fast on rows contiguous in j

    masked_a, masked_b = mask_a * gram_a, mask_b * gram_b                 # P∘K, Q∘L
    both_ways_a = masked_a * mask_a.transpose(1, 2)                       # P∘P^T∘K
    both_ways_b = masked_b * mask_b.transpose(1, 2)
    trace = total(both_ways_a, both_ways_b)                               # tr(A B)
    sum_a, sum_b = total(masked_a, mask_b), total(mask_a, masked_b)       # 1^T A 1, 1^T B 1
    columns_a = per_row(masked_a.mT.contiguous(), mask_b.mT.contiguous())  # A^T 1
    rows_b = per_row(mask_a, masked_b)                                        # B 1
    middle = (columns_a * rows_b).sum(dim=-1)                             # 1^T A B 1
    return (trace + sum_a * sum_b / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * middle) / (n * (n - 3))


def cknna_between(a: Tensor, b: Tensor, k: int = 10) -> Tensor:
    """``(La+1, Lb+1)`` CKNNA between every layer of pooled vectors ``a`` ``(N, La+1, Da)`` and
    every layer of ``b`` ``(N, Lb+1, Db)`` (the same N prompts, in the same order; the widths
    may differ: two models). Needs ``k < N``; NaN for N < 4 and where a layer's own term is
    not positive."""
    gram_a, mask_a = neighbours(a, k, "cknna")
    if b is a:  # within a model: its own terms are the diagonal of the matrix
        cross = masked_hsic(mask_a, gram_a, mask_a, gram_a)
        scale_a = scale_b = torch.diagonal(cross).clamp(min=0).sqrt()
    else:
        gram_b, mask_b = neighbours(b, k, "cknna")
        cross = masked_hsic(mask_a, gram_a, mask_b, gram_b)
        scale_a = masked_hsic(mask_a, gram_a, mask_a, gram_a, pairs=False).clamp(min=0).sqrt()
        scale_b = masked_hsic(mask_b, gram_b, mask_b, gram_b, pairs=False).clamp(min=0).sqrt()
    scale = torch.outer(scale_a, scale_b)
    return torch.where(scale > 0, cross / scale, math.nan)


def _check_plan(job, tokenizer, plan) -> None:
    """``k`` against the number of prompts, before the model loads."""
    check_neighbours("cknna", job.metric.cknna.k, len(plan.ids))


METRIC = dataclasses.replace(
    declare(Pairwise(
        name="cknna", between=cknna_between, knobs=CKNNAKnobs, label="CKNNA",
        definition="Similarity family, sinks and Seq-VCR (beyond the papers)/CKNNA",
        description="CKNNA, CKA on mutual nearest neighbours (Huh et al. 2024), between every "
                    "pair of layers (matrix, to_last, to_next)")),
    check_plan=_check_plan)
