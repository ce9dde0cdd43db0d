"""Curvature kernels: the mean turning angle of a prepped token trajectory (METRICS.md,
"Curvature")."""


from __future__ import annotations

import math

import torch
from torch import Tensor

from lw.metrics.functional.entropy import check_compat, compact, prep

# Rows are unit vectors (or 0): a step this short is two equal rows up to float64 rounding,
# and its direction is noise, so it counts as |v| = 0.
ZERO_STEP = 1e-12


def curvature(h: Tensor, mask: Tensor | None, compat: str = "paper") -> Tensor:
    """Mean turning angle between successive steps of the prepped token trajectory.

    On the real rows ``z_1..z_T`` of ``prep(H)``: ``v_k = z_{k+1} - z_k`` and
    ``C = mean_k arccos(clip(v_{k+1} . v_k / (|v_{k+1}| |v_k|), -1, 1))`` over k = 1..T-2,
    radians in [0, pi]. Pairs where either ``|v| = 0`` (<= 1e-12, i.e. up to rounding) are
    skipped. ``compat="official"`` takes ``arccos(|cos|)`` as the authors' code did, so values
    lie in [0, pi/2].

    Args:
        h: ``(..., T, D)`` token states (e.g. layers x prompts x tokens x hidden).
        mask: ``(..., T)`` bool/0-1, True = real token; padding on either side (or None).
        compat: ``"paper"`` or ``"official"``.

    Returns:
        ``(...)`` float64; NaN when fewer than 3 real tokens or no valid pair.
    """
    if mask is not None:
        mask = mask.to(device=h.device, dtype=torch.bool)
    return prepped_curvature(prep(h, mask), mask, compat)


def prepped_curvature(z: Tensor, mask: Tensor | None, compat: str = "paper") -> Tensor:
    """:func:`curvature` of already prepped rows ``z = prep(h, mask)`` (``mask`` bool), for
    callers that share one prep between metrics."""
    check_compat(compat)
    return _mean_angle(*_turning_cosines(z, mask), compat)


def prepped_curvatures(z: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
    """``{"paper": C, "official": C}`` of prepped rows, sharing the costly part (the step
    cosines), so that both modes can be kept (the activation cache serves either)."""
    cos, valid = _turning_cosines(z, mask)
    return {compat: _mean_angle(cos, valid, compat) for compat in ("paper", "official")}


def _turning_cosines(z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Cosines between successive steps ``(..., T-2)`` and which of them are valid."""
    # Real rows first, in order, so consecutive rows are consecutive tokens for every prompt.
    z, rows = compact(z, mask)
    steps = z[..., 1:, :] - z[..., :-1, :]                       # (..., T-1, D)
    lengths = steps.norm(dim=-1)
    k = torch.arange(steps.shape[-2], device=z.device)
    real_step = (k < (rows - 1).unsqueeze(-1)) & (lengths > ZERO_STEP)  # both rows real, |v| > 0
    dots = (steps[..., 1:, :] * steps[..., :-1, :]).sum(-1)      # (..., T-2)
    norms = lengths[..., 1:] * lengths[..., :-1]
    valid = real_step[..., 1:] & real_step[..., :-1]
    return (dots / torch.where(valid, norms, 1.0)).clamp(-1.0, 1.0), valid


def _mean_angle(cos: Tensor, valid: Tensor, compat: str) -> Tensor:
    if compat == "official":
        cos = cos.abs()
    angles = torch.where(valid, torch.arccos(cos), 0.0)
    count = valid.sum(-1)
    mean = angles.sum(-1) / count.clamp(min=1)
    return torch.where(count > 0, mean, math.nan)
