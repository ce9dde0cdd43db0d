"""The shared token products: what the forward pass keeps of every batch's token states for
the token metrics, computed together so that the prep they share runs once per batch."""

from __future__ import annotations

import torch

from lw.metrics.functional.curvature import prepped_curvatures
from lw.metrics.functional.entropy import gram_spectrum, prep


def token_products(wanted: list[str]) -> dict:
    """{"token": fn(hidden (L+1, B, T, D), mask (B, T)) -> {product: (L+1, B, ...)}}, or {}.

    ``wanted``: ``spectrum/<compat>`` (N, L+1, m) Gram spectra (prompt entropy for any alpha
    and normalization), ``curvature/paper`` and ``curvature/official`` (N, L+1),
    ``final_state/last`` (N, 1, D) the last real token's state in the last layer (what the LM
    head reads).

    One function for all of them, so that the prep they share (centering and normalizing every
    token state, the largest tensor of the batch) runs once per batch. It keeps raw products,
    not metrics, which is what the activation cache relies on.
    """
    if not wanted:
        return {}

    def batch_products(h: torch.Tensor, mask: torch.Tensor, _ids: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        mask = mask.to(device=h.device, dtype=torch.bool)
        values = {}
        if "final_state/last" in wanted:
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = torch.where(mask, positions, -1).amax(dim=1)                 # (B,)
            rows = torch.arange(len(last), device=h.device)
            values["final_state/last"] = h[-1, rows, last.to(h.device)].unsqueeze(0)
        if not any(name.startswith(("spectrum/", "curvature/")) for name in wanted):
            return values
        z = prep(h, mask)
        for name in wanted:
            if name.startswith("spectrum/"):
                values[name] = gram_spectrum(z, mask, compat=name.split("/")[1])
        if "curvature/paper" in wanted:
            values.update({f"curvature/{k}": v for k, v in prepped_curvatures(z, mask).items()})
        return values

    return {"token": batch_products}
