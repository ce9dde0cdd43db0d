"""Hartigan's dip test of unimodality across prompts, per layer (METRICS.md, "Dip test")."""

from __future__ import annotations

import diptest
import numpy as np
import torch

from lw.metrics.registry import Metric, Output


def dip_test(values: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer Hartigan dip statistic and p-value of per-prompt values.

    Args:
        values: ``(N, L)`` prompts x layers (numpy or tensor). NaNs are dropped per column.

    Returns:
        ``(dip, pval)``, each ``(L,)`` float64 from ``diptest.diptest`` (p-value interpolated
        from its tabulated critical values); NaN for a column with fewer than 4 finite values.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"dip_test expects (prompts, layers), got shape {values.shape}")
    n_layers = values.shape[1]
    dips = np.full(n_layers, np.nan)
    pvals = np.full(n_layers, np.nan)
    # diptest is a scalar C routine with no batched form: a loop over layers is the only way.
    for layer in range(n_layers):
        column = values[:, layer]
        column = column[np.isfinite(column)]
        if column.size >= 4:
            dips[layer], pvals[layer] = diptest.diptest(column)
    return dips, pvals


def _compute(inputs) -> Output:
    from lw.metrics.prompt_entropy import headline

    stat, pvalue = dip_test(inputs.values[headline(inputs.job)])
    return Output(per_layer={"dip/stat": torch.from_numpy(stat),
                             "dip/pvalue": torch.from_numpy(pvalue)})


METRIC = Metric(
    name="dip", definition="Dip test (bimodality across prompts)",
    compute=_compute, default=True, needs=("tokens",), uses=("prompt_entropy",),
    logs={"dip/stat": None, "dip/pvalue": None}, summaries={"dip/stat": "max"},
    spread=True,
    description="Hartigan's dip test over the per-prompt prompt entropies, per layer")
