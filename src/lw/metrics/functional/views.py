"""Metrics on augmented views of the same prompts: InfoNCE, DiME, LiDAR (METRICS.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lw.metrics.functional.entropy import (
    NORMALIZATIONS,
    check_compat,
    normalize_entropy,
    prep,
    psd_entropy,
)


def infonce(a: Tensor, b: Tensor, tau: float = 0.1) -> dict[str, Tensor]:
    """InfoNCE between two views, with its mutual-information bound.

    ``A = prep(a)``, ``B = prep(b)``, logits ``A B^T / tau``,
    ``loss = mean_i [logsumexp_j(logits_ij) - logits_ii]`` (cross entropy with target i).

    Args:
        a, b: ``(..., N, D)`` pooled vectors of two augmentations of the same N prompts.
        tau: temperature.

    Returns:
        ``loss``, ``mi_bound = ln N - loss`` (nats) and ``normalized = 1 - loss / ln N``
        (what the authors' code reported), each ``(...)`` float64; NaN when N < 2.
    """
    *lead, n, _ = a.shape
    # One leading index (layer) at a time: the peak is one N x N logits matrix, not (..., N, N).
    flat_a, flat_b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    loss = torch.empty(flat_a.shape[0], dtype=torch.float64, device=a.device)
    for index in range(flat_a.shape[0]):
        logits = prep(flat_a[index]) @ prep(flat_b[index]).mT / tau
        loss[index] = (torch.logsumexp(logits, -1) - torch.diagonal(logits)).mean()
    loss = loss.reshape(lead)
    if n < 2:  # one sample: the loss is 0 whatever the views, and ln N = 0
        loss = torch.full_like(loss, math.nan)
    log_n = math.log(n) if n >= 2 else math.nan
    return {"loss": loss, "mi_bound": log_n - loss, "normalized": 1.0 - loss / log_n}


def random_permutations(n: int, r: int, generator: torch.Generator | None = None) -> Tensor:
    """``(r, n)`` int64: r independent uniform permutations of ``range(n)``."""
    device = generator.device if generator is not None else None
    noise = torch.rand(r, n, generator=generator, dtype=torch.float64, device=device)
    return torch.argsort(noise, dim=-1)


def dime(
    a: Tensor,
    b: Tensor,
    alpha: float = 1.0,
    r: int = 10,
    generator: torch.Generator | None = None,
    compat: str = "paper",
    perms: Tensor | None = None,
) -> Tensor:
    """DiME (difference of matrix entropies) between two views.

    ``Ka = A A^T``, ``Kb = B B^T`` (``N x N``, A, B prepped) and
    ``DiME = mean_pi [S_alpha(Ka o Pi Kb Pi^T) - S_alpha(Ka o Kb)]`` over r permutations,
    ``o`` the element-wise product, ``S_alpha`` the entropy of the trace-normalized spectrum
    (alpha = 2 via ``||K||_F^2 / tr(K)^2``). The same permutations serve every leading index.
    Memory: one leading index at a time, one matrix at a time (3 N x N float64 and
    eigvalsh's workspace), whatever the leading dims and r.

    ``compat="official"``: repitl's ``doe`` applied no clamp and no trace normalization, and its
    alpha = 2 shortcut is ``||K||_F^2 / N^2`` on ``K`` as given (equal to the paper value when
    every prepped row has unit norm). Its D x D covariances for N > D are not reproduced.

    Args:
        a, b: ``(..., N, D)`` pooled vectors of two augmentations of the same N prompts.
        alpha: entropy order. r: number of permutations.
        generator: source of the permutations (seeded by the caller).
        perms: optional ``(r, N)`` explicit permutations (overrides r and generator).

    Returns:
        ``(...)`` float64; NaN when N < 2.
    """
    check_compat(compat)
    *lead, n, _ = a.shape
    if perms is None:
        perms = random_permutations(n, r, generator)
    perms = perms.to(a.device)
    frobenius_n = None
    if compat == "official" and alpha == 2.0:
        frobenius_n = torch.tensor(float(n), dtype=torch.float64, device=a.device)
    # One leading index (layer) and one matrix at a time: the peak is Ka, Kb and one joint
    # matrix (3 N x N float64) plus eigvalsh's workspace, not (..., r+1, N, N).
    flat_a, flat_b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out = torch.empty(flat_a.shape[0], dtype=torch.float64, device=a.device)
    for index in range(flat_a.shape[0]):
        pa, pb = prep(flat_a[index]), prep(flat_b[index])
        ka, kb = pa @ pa.mT, pb @ pb.mT
        del pa, pb
        joint = psd_entropy(ka * kb, alpha, frobenius_n)
        permuted = torch.stack([psd_entropy(ka * kb[perm[:, None], perm[None, :]], alpha,
                                            frobenius_n) for perm in perms])
        out[index] = permuted.mean() - joint
    out = out.reshape(lead)
    return out if n >= 2 else torch.full_like(out, math.nan)


def lidar(
    x: Tensor, delta: float = 1e-4, normalizations: Sequence[str] = NORMALIZATIONS
) -> dict[str, Tensor]:
    """LiDAR: entropy of the LDA matrix of J augmentations per prompt.

    Rows ``x_ij`` are centered on the grand mean and L2-normalized (:func:`prep` over all
    N J rows); ``mu_i`` = class mean, ``mu`` = grand mean of the normalized rows;
    ``Sb = (1/N) sum_i (mu_i - mu)(mu_i - mu)^T``,
    ``Sw = (1/(N J)) sum_ij (x_ij - mu_i)(x_ij - mu_i)^T + delta I``,
    ``L = Sw^{-1/2} Sb Sw^{-1/2}`` (via eigh of Sw) and ``S_1`` the Shannon entropy of L's
    trace-normalized spectrum.

    Normalizations treat the N prompts as the rows, as the authors' code did
    (``entropy_normalization(x, norm, NUM_SAMPLES, D)``): max = S / ln(min(N, D)), since L has
    rank <= min(N - 1, D); logN = S / ln N; logD = S / ln D.

    Args:
        x: ``(..., N, J, D)`` pooled vectors: N prompts x J views. Memory: one leading index's
            N J x D rows in float64 and a few D x D matrices at a time.
        delta: ridge on Sw.
        normalizations: subset of ``("raw", "max", "logN", "logD")``.

    Returns:
        each normalization ``(...)`` and ``effective_rank = exp(S_1)`` in [1, D] (what the
        LiDAR paper calls LiDAR); NaN where Sb = 0 (e.g. N = 1) or x is not finite.
    """
    *lead, n, j, d = x.shape
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    # One leading index (layer) at a time: the peak is one layer's N J x D rows in float64
    # and a few D x D matrices, not (..., N, J, D).
    flat = x.reshape(-1, n, j, d)
    s = torch.empty(flat.shape[0], dtype=torch.float64, device=x.device)
    for index in range(flat.shape[0]):
        layer = flat[index]
        # eigh raises on NaN/inf: compute on zeros there and report NaN.
        finite = bool(torch.isfinite(layer).all())
        z = prep(torch.where(torch.isfinite(layer), layer, 0.0).reshape(n * j, d))
        z = z.reshape(n, j, d)
        class_means = z.mean(-2)                                 # (N, D)
        between = class_means - class_means.mean(-2, keepdim=True)
        within = z.sub_(class_means.unsqueeze(-2)).reshape(n * j, d)
        sb = between.mT @ between / n
        sw = within.mT @ within / (n * j) + delta * eye
        del z, within
        w_eigs, w_vecs = torch.linalg.eigh(sw)
        inv_sqrt = (w_vecs * w_eigs.rsqrt().unsqueeze(-2)) @ w_vecs.mT
        lda = inv_sqrt @ sb @ inv_sqrt
        s[index] = psd_entropy((lda + lda.mT) / 2, alpha=1.0) if finite else math.nan
    s = s.reshape(lead)                                          # symmetrized: rounding
    rows = torch.full(s.shape, float(n), dtype=torch.float64, device=x.device)
    out = normalize_entropy(s, rows, d, normalizations)
    out["effective_rank"] = torch.exp(s)
    return out
