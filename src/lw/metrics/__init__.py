"""lw's metrics: pure tensor functions (entropy, curvature, views, downstream, ...) and, one
module per metric, their declarations (a module-level ``METRIC``, see ``lw.metrics.registry``),
from which the config schema, the forward pass's products and ``lw.job.measure`` are derived.

Nothing here imports lw.config: lw.config builds its schema from the declarations.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lw.metrics import registry
from lw.metrics.functional.products import token_products
from lw.metrics.registry import token_products_needed, views_needed


def token_values(cfg, per_prompt: dict[str, torch.Tensor], rows: torch.Tensor,
                 hidden_size: int) -> dict[str, torch.Tensor]:
    """Per-prompt values (N, L+1) of the job's token metrics (those computed from the forward
    pass's token products alone), from those products ``{product: (N, L+1, ...)}``.

    ``rows``: ``(N,)`` real token rows each prompt's metrics saw; ``hidden_size``: D.
    """
    inputs = registry.Inputs(job=cfg, knobs=None, info=SimpleNamespace(hidden_size=hidden_size),
                             pooled=torch.empty(0), products=per_prompt, rows=rows, values={},
                             per_layer={})
    values: dict[str, torch.Tensor] = {}
    for metric in registry.running(cfg):
        if metric.products is not None and set(metric.needs) == {"tokens"}:
            inputs.knobs = registry.knobs_of(cfg, metric)
            out = metric.compute(inputs)
            values.update(out.per_prompt if isinstance(out, registry.Output) else {})
    return values


__all__ = ["token_products", "token_products_needed", "token_values", "views_needed"]
