"""The metric registry: which metrics exist, and how a job's config binds their knobs.

Token metrics run per batch inside the forward pass (see ``lw.extract``); data-set metrics run
once on the pooled vectors of all prompts; view metrics on the pooled vectors of augmented
copies of every prompt; downstream metrics (probe, cluster) on the pooled vectors and the
data's labels; ``dip`` runs on the per-prompt prompt entropies.
The functions themselves live in the sibling modules and know nothing of configs.
"""

from __future__ import annotations

import torch

from lw.config import LwConfig
from lw.metrics.curvature import prepped_curvature
from lw.metrics.downstream import cluster, probe
from lw.metrics.entropy import dataset_entropy, matrix_entropy, prep
from lw.metrics.views import dime, infonce, lidar

TOKEN_METRICS = ("prompt_entropy", "curvature")
POOLED_METRICS = ("dataset_entropy",)
VIEW_METRICS = ("infonce", "dime", "lidar")
DOWNSTREAM_METRICS = ("probe", "cluster")


def _prefixed(prefix: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{key}": value for key, value in values.items()}


def needs_prompt_entropy(cfg: LwConfig) -> bool:
    return "prompt_entropy" in cfg.metrics or "dip" in cfg.metrics


def token_metrics(cfg: LwConfig) -> dict:
    """{"token": fn(hidden (L+1, B, T, D), mask (B, T)) -> {logged name: (L+1, B)}}, or {}.

    One function for all token metrics, so that the prep they share (centering and
    normalizing every token state, the largest tensor of the batch) runs once per batch.
    """
    m = cfg.metric
    entropy, curve = needs_prompt_entropy(cfg), "curvature" in cfg.metrics
    if not (entropy or curve):
        return {}

    def batch_values(h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = mask.to(device=h.device, dtype=torch.bool)
        z = prep(h, mask)
        values = {}
        if entropy:
            values.update(_prefixed("prompt_entropy", matrix_entropy(
                z, mask, alpha=m.prompt_entropy.alpha, compat=m.compat,
                normalizations=tuple(m.normalizations))))
        if curve:
            values["curvature"] = prepped_curvature(z, mask, compat=m.compat)
        return values

    return {"token": batch_values}


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


def views_needed(cfg: LwConfig) -> int:
    """Augmented copies per prompt the view metrics need: 2 (InfoNCE, DiME), J (LiDAR), or 0."""
    needed = [2 for name in ("infonce", "dime") if name in cfg.metrics]
    if "lidar" in cfg.metrics:
        needed.append(cfg.metric.lidar.J)
    return max(needed, default=0)


def view_metrics(cfg: LwConfig, views: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """View metrics from pooled vectors of augmented copies (N, L+1, J, D): {name: (L+1,)}.

    InfoNCE and DiME compare views 0 and 1; LiDAR takes the first ``metric.lidar.J`` views.
    """
    m = cfg.metric
    by_layer = views.transpose(0, 1)                                        # (L+1, N, J, D)
    values: dict[str, torch.Tensor] = {}
    if "infonce" in cfg.metrics:
        values.update(_prefixed("infonce", infonce(by_layer[:, :, 0], by_layer[:, :, 1],
                                                   tau=m.infonce.tau)))
    if "dime" in cfg.metrics:
        values["dime"] = dime(by_layer[:, :, 0], by_layer[:, :, 1], alpha=m.dime.alpha,
                              r=m.dime.r, generator=generator, compat=m.compat)
    if "lidar" in cfg.metrics:
        values.update(_prefixed("lidar", lidar(by_layer[:, :, :m.lidar.J], delta=m.lidar.delta,
                                               normalizations=tuple(m.normalizations))))
    return values


def downstream_metrics(cfg: LwConfig, pooled: torch.Tensor,
                       labels: list[str]) -> dict[str, torch.Tensor]:
    """Per-layer downstream scores from pooled vectors (N, L+1, D) and labels: {name: (L+1,)}."""
    by_layer = pooled.transpose(0, 1)
    values: dict[str, torch.Tensor] = {}
    if "probe" in cfg.metrics:
        p = cfg.metric.probe
        values.update(_prefixed("probe", probe(by_layer, labels, folds=p.folds, seed=cfg.seed,
                                               max_iter=p.max_iter, C=p.C)))
    if "cluster" in cfg.metrics:
        values.update(_prefixed("cluster", cluster(by_layer, labels, seed=cfg.seed)))
    return values
