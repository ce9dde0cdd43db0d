"""The metric registry: which metrics exist, and how a job's config binds their knobs.

Token metrics run per batch inside the forward pass (see ``lw.extract``); data-set metrics run
once on the pooled vectors of all prompts; ``dip`` runs on the per-prompt prompt entropies.
The functions themselves live in the sibling modules and know nothing of configs.
"""

from __future__ import annotations

from functools import partial

import torch

from lw.config import LwConfig
from lw.metrics.curvature import curvature
from lw.metrics.entropy import dataset_entropy, prompt_entropy

TOKEN_METRICS = ("prompt_entropy", "curvature")
POOLED_METRICS = ("dataset_entropy",)


def _prefixed(prefix: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{key}": value for key, value in values.items()}


def needs_prompt_entropy(cfg: LwConfig) -> bool:
    return "prompt_entropy" in cfg.metrics or "dip" in cfg.metrics


def token_metrics(cfg: LwConfig) -> dict:
    """name -> fn(hidden (L+1, B, T, D), mask (B, T)) -> {logged name: (L+1, B)}."""
    m = cfg.metric
    fns = {}
    if needs_prompt_entropy(cfg):
        entropy = partial(prompt_entropy, alpha=m.prompt_entropy.alpha, compat=m.compat,
                          normalizations=tuple(m.normalizations))
        fns["prompt_entropy"] = lambda h, mask: _prefixed("prompt_entropy", entropy(h, mask))
    if "curvature" in cfg.metrics:
        fns["curvature"] = lambda h, mask: {"curvature": curvature(h, mask, compat=m.compat)}
    return fns


def pooled_metrics(cfg: LwConfig, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """Data-set metrics from pooled vectors (N, L+1, D): {logged name: (L+1,)}."""
    m = cfg.metric
    values: dict[str, torch.Tensor] = {}
    if "dataset_entropy" in cfg.metrics:
        by_layer = pooled.transpose(0, 1)                                   # (L+1, N, D)
        values.update(_prefixed("dataset_entropy", dataset_entropy(
            by_layer, alpha=m.dataset_entropy.alpha, compat=m.compat,
            normalizations=tuple(m.normalizations))))
    return values
