"""Matrix-based alpha-entropy of representations (METRICS.md, "Matrix-based alpha-entropy").

Everything is batched over leading dims ``...`` (typically layers x prompts) and computed in
float64. Undefined values (fewer than 2 real rows, all rows zero) come back as NaN, never as an
exception, so one degenerate prompt cannot stop a run.

``compat="official"`` reproduces the authors' code (OFSkean/information_flow,
``experiments/utils/metrics/metric_functions.py::compute_entropy`` with repitl's
``matrix_itl.matrixAlphaEntropy``): the Gram matrix it eigendecomposes is chosen per matrix as
``X X^T`` when rows <= D, else ``X^T X``; it is clamped element-wise at 0, divided by its trace,
and for alpha = 2 repitl's shortcut ``sum(K^2) / n^2`` (n = that Gram's size) replaces
``sum(lam^2)``, which adds ``2 ln n`` to the entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

NORMALIZATIONS = ("raw", "max", "logN", "logD")
COMPAT_MODES = ("paper", "official")
# An eigenvalue this small relative to the largest is rounding noise, not a direction.
EIG_RTOL = 1e-12
# A centered row this small relative to the largest input row is zero up to float64 rounding.
ZERO_ROW_RTOL = 1e-12


def _real_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    return mask.to(device=x.device, dtype=torch.bool).expand(x.shape[:-1])


def prep(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Center on the mean real row, then L2-normalize every row.

    Args:
        x: ``(..., n, D)`` rows (token states or pooled vectors).
        mask: ``(..., n)`` bool, True for real rows; None means all rows are real.

    Returns:
        ``(..., n, D)`` float64: ``(x_i - mean_real(x)) / |x_i - mean_real(x)|`` for real rows;
        padded rows and rows of norm 0 (up to rounding) are 0.
    """
    # In place on one float64 copy: this runs on every token state of every batch (the
    # largest tensor of a job), so each pass over it counts.
    x = x.to(dtype=torch.float64, copy=True)
    real = _real_mask(x, mask)
    x.masked_fill_(~real.unsqueeze(-1), 0.0)
    count = real.sum(-1, keepdim=True).clamp(min=1).unsqueeze(-1)
    mean = x.sum(-2, keepdim=True) / count
    # Identical rows leave ~1e-17 residues after centering; those must stay 0, not become
    # random unit vectors.
    scale = x.norm(dim=-1).amax(-1, keepdim=True)
    x.sub_(mean)
    norms = x.norm(dim=-1)
    keep = real & (norms > ZERO_ROW_RTOL * scale)
    return x.mul_(torch.where(keep, 1.0 / torch.where(keep, norms, 1.0), 0.0).unsqueeze(-1))


def compact(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Move the real rows to the front, keeping their order (left or right padding alike).

    Args:
        x: ``(..., n, D)``; mask: ``(..., n)`` bool or None.

    Returns:
        ``(x', rows)``: ``x'`` ``(..., n, D)`` with row k < rows the k-th real row and the rest
        0; ``rows`` ``(...)`` int64, the number of real rows.
    """
    real = _real_mask(x, mask)
    rows = real.sum(-1)
    keep = torch.arange(x.shape[-2], device=x.device) < rows.unsqueeze(-1)
    if torch.equal(real, keep):  # right padding (what extract makes): nothing to move
        return x, rows
    order = torch.sort((~real).to(torch.uint8), dim=-1, stable=True).indices
    moved = torch.gather(x, -2, order.unsqueeze(-1).expand(x.shape))
    return torch.where(keep.unsqueeze(-1), moved, 0), rows


def spectrum_entropy(eigs: Tensor, alpha: float = 1.0) -> Tensor:
    """Renyi entropy of a trace-normalized spectrum.

    Args:
        eigs: ``(..., m)`` eigenvalues of a symmetric matrix (any order, any scale).
        alpha: order, > 0.

    Returns:
        ``(...)``: with ``p`` the eigenvalues > ``1e-12 * max`` divided by their sum,
        ``-sum(p ln p)`` for alpha = 1, else ``ln(sum(p^alpha)) / (1 - alpha)``; NaN when no
        eigenvalue is positive.
    """
    eigs = eigs.to(torch.float64)
    top = eigs.amax(-1, keepdim=True)
    kept = torch.where(eigs > EIG_RTOL * top.clamp(min=0), eigs, 0.0)
    total = kept.sum(-1, keepdim=True)
    valid = (total > 0).squeeze(-1)
    p = kept / torch.where(total > 0, total, 1.0)
    positive = p > 0
    safe_p = torch.where(positive, p, 1.0)
    if alpha == 1.0:
        s = -(p * torch.log(safe_p)).sum(-1) + 0.0  # + 0.0 turns -0.0 into 0.0
    else:
        s = torch.log(torch.where(positive, safe_p**alpha, 0.0).sum(-1)) / (1.0 - alpha)
    return torch.where(valid, s, math.nan)


def psd_entropy(k: Tensor, alpha: float = 1.0, frobenius_n: Tensor | None = None) -> Tensor:
    """``S_alpha`` of the spectrum of symmetric matrices ``k`` ``(..., m, m)`` -> ``(...)``.

    alpha = 2 skips the eigendecomposition: ``sum(p^2) = ||k||_F^2 / tr(k)^2``. With
    ``frobenius_n`` ``(...)`` (the authors' shortcut) it is instead ``||k||_F^2 / n^2`` on
    ``k`` as given. NaN where ``tr(k) <= 0`` or ``k`` is not finite.
    """
    k = k.to(torch.float64)
    # eigvalsh raises on NaN/inf (e.g. a half-precision overflow upstream): report NaN instead.
    finite = torch.isfinite(k).all(-1).all(-1)
    k = torch.where(finite[..., None, None], k, 0.0)
    trace = torch.diagonal(k, dim1=-2, dim2=-1).sum(-1)
    if alpha == 2.0:
        frob2 = k.square().sum((-2, -1))
        denom = trace.square() if frobenius_n is None else frobenius_n.to(k).square()
        s = -torch.log(frob2 / torch.where(denom > 0, denom, 1.0))
    else:
        s = spectrum_entropy(torch.linalg.eigvalsh(k), alpha)
    return torch.where((trace > 0) & finite, s, math.nan)


def check_compat(compat: str) -> None:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat={compat!r}: use one of {COMPAT_MODES}")


def normalize_entropy(
    s: Tensor, rows: Tensor, dim: int, normalizations: Sequence[str] = NORMALIZATIONS
) -> dict[str, Tensor]:
    """Entropy ``s`` ``(...)`` under each normalization: raw = S, max = S / ln(min(rows, dim)),
    logN = S / ln(rows), logD = S / ln(dim). ``rows`` broadcasts against ``s``."""
    rows = rows.to(device=s.device, dtype=torch.float64)
    dims = torch.full_like(rows, float(dim))
    divisors = {
        "raw": None,
        "max": torch.log(torch.minimum(rows, dims)),
        "logN": torch.log(rows),
        "logD": torch.log(dims),
    }
    out = {}
    for name in normalizations:
        if name not in divisors:
            raise ValueError(f"unknown normalization {name!r}: use one of {NORMALIZATIONS}")
        out[name] = s if divisors[name] is None else s / divisors[name]
    return out


def _gram(x: Tensor, mask: Tensor | None, rows: Tensor, compat: str) -> Tensor:
    """The Gram matrix whose spectrum is used (the smaller orientation, or per matrix in
    official mode)."""
    n, dim = x.shape[-2:]
    if n <= dim:  # every matrix has rows <= D: the row Gram is the smaller one everywhere
        return x @ x.mT
    feature = x.mT @ x
    if compat != "official":  # same non-zero spectrum either way: one shape for the batch
        return feature
    # The clamp makes the orientation matter: matrices with rows <= D get their row Gram,
    # built from the compacted real rows cut to D (zero rows add only zero eigenvalues).
    use_rows = rows <= dim
    row_gram = compact(x, mask)[0][..., :dim, :]
    row_gram = row_gram @ row_gram.mT
    return torch.where(use_rows[..., None, None], row_gram, feature)


def gram_spectrum(x: Tensor, mask: Tensor | None = None, compat: str = "paper") -> Tensor:
    """Eigenvalues of the Gram matrix whose spectrum :func:`matrix_entropy` measures.

    ``K = X X^T`` (``n x n``) when ``n <= D``, else ``X^T X`` (``D x D``): same non-zero
    spectrum. ``compat="official"`` clamps K at 0 and divides it by its trace first (the
    authors' code; module docstring). Everything the entropy needs for any alpha and
    normalization is in this spectrum and the row count, which is why the activation cache
    keeps spectra rather than entropies.

    Args:
        x: ``(..., n, D)`` prepped rows (see :func:`prep`), padded rows 0.
        mask: ``(..., n)`` bool, True = real row; None = all real.
        compat: ``"paper"`` or ``"official"``.

    Returns:
        ``(..., m)`` float64 ascending, ``m = min(n, D)``; all NaN where ``x`` is not finite.
    """
    check_compat(compat)
    x = x.to(torch.float64)
    rows = _real_mask(x, mask).sum(-1)
    gram = _gram(x, mask, rows, compat)
    # eigvalsh raises on NaN/inf (e.g. a half-precision overflow upstream): report NaN instead.
    finite = torch.isfinite(gram).all(-1).all(-1)
    gram = torch.where(finite[..., None, None], gram, 0.0)
    if compat == "official":
        gram = gram.clamp(min=0)
        trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
        gram = gram / torch.where(trace > 0, trace, 1.0)[..., None, None]
    eigs = torch.linalg.eigvalsh(gram)
    return torch.where(finite[..., None], eigs, math.nan)


def spectrum_matrix_entropy(
    eigs: Tensor,
    rows: Tensor,
    dim: int,
    alpha: float = 1.0,
    compat: str = "paper",
    normalizations: Sequence[str] = NORMALIZATIONS,
) -> dict[str, Tensor]:
    """:func:`matrix_entropy` from a :func:`gram_spectrum`.

    Args:
        eigs: ``(..., m)`` spectrum; trailing zeros (padding to a common width) change nothing.
        rows: ``(...)`` real rows of each matrix; dim: D.
        alpha, compat, normalizations: as :func:`matrix_entropy`. Official alpha = 2 is the
            authors' ``sum(K^2) / n^2`` with ``n = rows if rows <= D else D``, and
            ``sum(K^2) = sum(lam^2)`` for a symmetric K.

    Returns:
        ``{name: (...)}`` float64; NaN where rows < 2, the spectrum has no positive value, or
        it is NaN.
    """
    check_compat(compat)
    eigs = eigs.to(torch.float64)
    rows = rows.to(device=eigs.device)
    if compat == "official" and alpha == 2.0:
        n = torch.where(rows <= dim, rows, torch.full_like(rows, dim)).to(torch.float64)
        total = eigs.sum(-1)
        s = -torch.log(eigs.square().sum(-1) / n.clamp(min=1).square())
        s = torch.where(total > 0, s, math.nan)
    else:
        s = spectrum_entropy(eigs, alpha)
    s = torch.where(rows >= 2, s, math.nan)
    return normalize_entropy(s, rows, dim, normalizations)


def matrix_entropy(
    x: Tensor,
    mask: Tensor | None = None,
    alpha: float = 1.0,
    compat: str = "paper",
    normalizations: Sequence[str] = NORMALIZATIONS,
) -> dict[str, Tensor]:
    """Matrix-based alpha-entropy ``S_alpha(X)`` of already prepped rows.

    ``K = X X^T`` (``n x n``) when ``n <= D``, else ``X^T X`` (``D x D``): same non-zero
    spectrum. ``lam`` = eigenvalues of K > 1e-12 max, divided by their sum;
    ``S = -sum(lam ln lam)`` (alpha = 1) or ``ln(sum(lam^alpha)) / (1 - alpha)``.
    Normalizations: raw = S, max = S / ln(min(rows, D)), logN = S / ln(rows), logD = S / ln(D).

    Args:
        x: ``(..., n, D)`` prepped rows (see :func:`prep`), padded rows 0.
        mask: ``(..., n)`` bool, True = real row; None = all real. Only counts rows
            (and, in official mode, picks each matrix's Gram orientation).
        alpha: entropy order, > 0.
        compat: ``"paper"`` (METRICS.md) or ``"official"`` (module docstring).
        normalizations: subset of ``("raw", "max", "logN", "logD")``.

    Returns:
        ``{name: (...)}`` float64; NaN where rows < 2 or all rows are zero.
    """
    rows = _real_mask(x, mask).sum(-1)
    return spectrum_matrix_entropy(gram_spectrum(x, mask, compat), rows, x.shape[-1], alpha,
                                   compat, normalizations)


def prompt_entropy(
    h: Tensor,
    mask: Tensor | None,
    alpha: float = 1.0,
    compat: str = "paper",
    normalizations: Sequence[str] = NORMALIZATIONS,
) -> dict[str, Tensor]:
    """Prompt (token-level) entropy ``S_alpha(prep(H))``, one value per prompt.

    Args:
        h: ``(..., T, D)`` token states, e.g. layers x prompts x tokens x hidden.
        mask: ``(..., T)`` attention mask (True / 1 = real token, padding on either side).

    Returns:
        ``{name: (...)}``, see :func:`matrix_entropy`; rows = the prompt's real tokens.
    """
    if mask is not None:
        mask = mask.to(device=h.device, dtype=torch.bool)
    return matrix_entropy(prep(h, mask), mask, alpha, compat, normalizations)


def dataset_entropy(
    pooled: Tensor,
    alpha: float = 1.0,
    compat: str = "paper",
    normalizations: Sequence[str] = NORMALIZATIONS,
) -> dict[str, Tensor]:
    """Dataset entropy ``S_alpha(prep(P))`` over the whole set of pooled vectors.

    Args:
        pooled: ``(..., N, D)``, row i = mean of prompt i's real token states.

    Returns:
        ``{name: (...)}``, see :func:`matrix_entropy`; rows = N.
    """
    return matrix_entropy(prep(pooled), None, alpha, compat, normalizations)
