"""mutual_knn: mutual k-nearest-neighbour alignment between every pair of layers on the pooled
vectors (Huh et al. 2024, "The Platonic Representation Hypothesis"; code: minyoungg/platonic-rep,
``metrics.py``, ``AlignmentMetrics.mutual_knn``).

For layers l, m with pooled vectors X_l (N, D), rows L2-normalised, and S_l(i) = the k prompts
j != i with the largest <x_i, x_j> (prompt i itself never counts as its own neighbour):

    mutual_knn(l, m) = (1/N) sum_i |S_l(i) ∩ S_m(i)| / k,    in [0, 1]

It is 1 for a layer with itself, 1 whenever the two layers rank every prompt's neighbours alike
(so invariant to rotations, isotropic scaling and any rescaling of single prompts' vectors),
and about k/(N-1) for unrelated vectors (the chance overlap). Computed once per layer as the
``(L+1, N, N)`` 0/1 neighbour matrix A_l (A_l[i, j] = 1 for j in S_l(i)); every pair's overlap
is then one matmul of the flattened matrices: sum_ij A_l[i, j] A_m[i, j]. The knob ``k``
(``metric.mutual_knn.k``, default 10 as platonic-rep's ``--topk``) must be below the number of
prompts N (checked before the model loads, and by the kernel).

As platonic-rep computes it: its ``measure_alignment.compute_score`` L2-normalises each layer's
rows (``normalize=True``) before calling ``mutual_knn``, which ranks neighbours by inner product
with the diagonal filled with -1e8 (self excluded) and averages ``|S_A(i) ∩ S_B(i)| / k`` over
the prompts, as here and in docs/METRICS.md. Not done here: its feature preparation
(``prepare_features``) first clips each model's features at the 0.95 quantile of their absolute
values (``remove_outliers``), a step of its pipeline rather than of the measure; lw uses the
pooled vectors as they are. Ties between equal similarities are broken by ``torch.topk``, not
by platonic-rep's ``argsort`` (no difference without exact ties).

Logged: the (L+1) x (L+1) matrix (results/mutual_knn_matrix.csv and a heat map), and the curves
``mutual_knn/to_last`` and ``mutual_knn/to_next`` (NaN for the last layer).

Memory: (L+1) N x N float64 matrices (similarities, their copy with the diagonal masked, the
neighbour masks), (L+1) N^2 8 B each (31 x 512^2 x 8 B = 65 MB), about 3 per model at the peak
(0.2 GB within a model of 31 layers and 512 prompts); time (La+1)(Lb+1) N^2 for the overlaps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lw.errors import check
from lw.metrics.pairwise import Pairwise, PairwiseKnobs, declare


@dataclass
class MutualKNNKnobs(PairwiseKnobs):
    k: int = 10                      # neighbours of each prompt (below the number of prompts)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.k >= 1, f"metric.mutual_knn.k={self.k}: must be >= 1")


def cosine_grams(pooled: Tensor) -> Tensor:
    """``(L+1, N, N)`` float64 inner products of each layer's L2-normalised pooled vectors
    ``(N, L+1, D)`` (cosine similarities; a zero vector stays zero), made exactly symmetric."""
    x = F.normalize(pooled.transpose(0, 1).double(), p=2, dim=-1)           # (L+1, N, D)
    gram = x @ x.transpose(1, 2)
    return (gram + gram.transpose(1, 2)) / 2


def check_neighbours(name: str, k: int, n: int) -> None:
    """``k`` neighbours other than the prompt itself need ``k < n`` prompts."""
    check(k < n, f"metric.{name}.k={k}: must be below the number of prompts N={n} (each "
                 f"prompt's k nearest others); lower metric.{name}.k or raise data.n_prompts")


def knn_mask(gram: Tensor, k: int) -> Tensor:
    """``(L+1, N, N)`` 0/1 float64: row i marks the k largest entries of row i of ``gram``
    ``(L+1, N, N)``, its diagonal (the prompt itself) left out."""
    n = gram.shape[-1]
    diagonal = torch.eye(n, dtype=torch.bool, device=gram.device)
    ranked = gram.masked_fill(diagonal, -torch.inf)
    nearest = ranked.topk(k, dim=-1).indices                                # (L+1, N, k)
    return torch.zeros_like(gram).scatter_(-1, nearest, 1.0)


def neighbours(pooled: Tensor, k: int, name: str = "mutual_knn") -> tuple[Tensor, Tensor]:
    """The cosine Gram matrices of :func:`cosine_grams` and their k-NN masks
    (:func:`knn_mask`), after checking ``k`` against the number of prompts."""
    check_neighbours(name, k, pooled.shape[0])
    gram = cosine_grams(pooled)
    return gram, knn_mask(gram, k)


def mutual_knn_between(a: Tensor, b: Tensor, k: int = 10) -> Tensor:
    """``(La+1, Lb+1)`` mutual k-NN alignment between every layer of pooled vectors ``a``
    ``(N, La+1, Da)`` and every layer of ``b`` ``(N, Lb+1, Db)`` (the same N prompts, in the
    same order; the widths may differ: two models). Needs ``1 <= k < N``."""
    n = a.shape[0]
    mask_a = neighbours(a, k)[1]
    mask_b = mask_a if b is a else neighbours(b, k)[1]  # within a model: the masks once
    shared = mask_a.flatten(1) @ mask_b.flatten(1).T                        # sum_i |∩|
    return shared / (n * k)


def _check_plan(job, tokenizer, plan) -> None:
    """``k`` against the number of prompts, before the model loads."""
    check_neighbours("mutual_knn", job.metric.mutual_knn.k, len(plan.ids))


METRIC = dataclasses.replace(
    declare(Pairwise(
        name="mutual_knn", between=mutual_knn_between, knobs=MutualKNNKnobs,
        label="mutual k-NN alignment",
        definition="Similarity family, sinks and Seq-VCR (beyond the papers)/Mutual k-NN alignment",
        description="mutual k-NN alignment (Huh et al. 2024) between every pair of layers "
                    "(matrix, to_last, to_next)")),
    check_plan=_check_plan)
