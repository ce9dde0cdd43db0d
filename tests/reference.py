"""Plain float64 numpy references for lw.metrics, written from METRICS.md one matrix at a time.

Deliberately unbatched and independent of the torch code: loops, np.linalg, scipy.
Each function takes ONE prompt's real rows (no padding) or one data set.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import fractional_matrix_power
from scipy.special import logsumexp

NORMS = ("raw", "max", "logN", "logD")


def prep(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    z = x - x.mean(axis=0)
    out = np.zeros_like(z)
    for i in range(len(z)):
        norm = np.linalg.norm(z[i])
        if norm > 0:
            out[i] = z[i] / norm
    return out


def spectrum_entropy(eigs: np.ndarray, alpha: float) -> float:
    eigs = np.asarray(eigs, dtype=np.float64)
    top = eigs.max()
    lam = np.array([e for e in eigs if e > 1e-12 * max(top, 0.0)])
    if lam.size == 0 or lam.sum() <= 0:
        return math.nan
    lam = lam / lam.sum()
    if alpha == 1:
        return float(-np.sum(lam * np.log(lam)))
    return float(np.log(np.sum(lam**alpha)) / (1 - alpha))


def entropy(z: np.ndarray, alpha: float, compat: str = "paper") -> float:
    """S_alpha of prepped rows z (rows x D)."""
    rows, dim = z.shape
    if rows < 2 or not np.any(z):
        return math.nan
    if compat == "paper":
        return spectrum_entropy(np.linalg.eigvalsh(z @ z.T), alpha)
    # The authors' code: X X^T unless rows > D, clamp at 0, trace-normalize, repitl alpha=2.
    k = z.T @ z if rows > dim else z @ z.T
    k = np.maximum(k, 0.0)
    k = k / np.trace(k)
    if alpha == 2:
        return float(-np.log(np.sum(k**2) / k.shape[0] ** 2))
    return spectrum_entropy(np.linalg.eigvalsh(k), alpha)


def normalized(s: float, rows: int, dim: int) -> dict[str, float]:
    return {
        "raw": s,
        "max": s / math.log(min(rows, dim)) if min(rows, dim) > 1 else math.nan,
        "logN": s / math.log(rows) if rows > 1 else math.nan,
        "logD": s / math.log(dim),
    }


def curvature(z: np.ndarray, compat: str = "paper") -> float:
    """Mean turning angle on prepped rows z (real tokens in order)."""
    steps = [z[k + 1] - z[k] for k in range(len(z) - 1)]
    angles = []
    for k in range(len(steps) - 1):
        u, v = steps[k + 1], steps[k]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        if nu <= 1e-12 or nv <= 1e-12:  # |v| = 0 up to float64 rounding (unit rows)
            continue
        cos = min(1.0, max(-1.0, float(u @ v) / (nu * nv)))
        angles.append(math.acos(abs(cos) if compat == "official" else cos))
    return float(np.mean(angles)) if angles else math.nan


def infonce(a: np.ndarray, b: np.ndarray, tau: float) -> dict[str, float]:
    a, b = prep(a), prep(b)
    n = len(a)
    logits = a @ b.T / tau
    loss = float(np.mean([logsumexp(logits[i]) - logits[i, i] for i in range(n)]))
    return {"loss": loss, "mi_bound": math.log(n) - loss, "normalized": 1 - loss / math.log(n)}


def dime(a, b, alpha: float, perms, compat: str = "paper") -> float:
    a, b = prep(a), prep(b)
    ka, kb = a @ a.T, b @ b.T
    n = len(a)

    def s(m):
        if compat == "official" and alpha == 2:
            return float(-np.log(np.sum(m**2) / n**2))
        return spectrum_entropy(np.linalg.eigvalsh(m), alpha)

    base = s(ka * kb)
    return float(np.mean([s(ka * kb[np.ix_(p, p)]) for p in perms]) - base)


def lidar(x: np.ndarray, delta: float) -> tuple[float, float]:
    """(S_1, exp(S_1)) of the LiDAR LDA matrix; x is (N, J, D)."""
    n, j, d = x.shape
    z = prep(x.reshape(n * j, d)).reshape(n, j, d)
    mu = z.reshape(n * j, d).mean(axis=0)
    sb = np.zeros((d, d))
    sw = np.zeros((d, d))
    for i in range(n):
        mu_i = z[i].mean(axis=0)
        sb += np.outer(mu_i - mu, mu_i - mu)
        for k in range(j):
            sw += np.outer(z[i, k] - mu_i, z[i, k] - mu_i)
    sb /= n
    sw = sw / (n * j) + delta * np.eye(d)
    root = np.real(fractional_matrix_power(sw, -0.5))
    lda = root @ sb @ root
    s = spectrum_entropy(np.linalg.eigvalsh((lda + lda.T) / 2), 1.0)
    return s, math.exp(s)
