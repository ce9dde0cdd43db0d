"""sink_rate: how many attention heads of each layer are attention sinks, heads that put most of
their attention on the first token (Gu et al., ICLR 2025, "When Attention Sink Emerges in
Language Models"; docs/METRICS.md, "Sink rate").

For layer l (block l's attention: state l is block l's output; layer 0, the embeddings, is NaN)
and head h,

    a_{l,h} = mean over prompts of ( mean over the query positions t counted of A_{l,h}[t, first] )

with A the attention probabilities, "first" the prompt's first real token (whichever side the
padding is on) and the query positions counted the real ones after ``extraction.skip_first``
(with skip_first = 0 the first token's query counts too, and its weight on itself is 1 in a
causal model). Each prompt weighs the same, as Gu et al. average over sequences. Logged:

    sink_rate/rate        share of the layer's heads with a_{l,h} >= eps (metric.sink_rate.eps)
    sink_rate/first_mass  mean over the layer's heads of a_{l,h}

the table ``results/sink_rate_heads.csv`` (a_{l,h}, one row per layer, one column per head) and
the summary ``summary/sink_rate/all_layers`` (the mean rate over layers 1..L: Gu et al.'s
model-level Sink_eps).

How the weights are obtained: in the same forward pass as every other metric, by forward hooks
on each block's attention module (its path per architecture: ``Architecture.attention`` in
lw/loading/architectures.py), which in transformers returns ``(output, weights)``. lw's models
run with SDPA attention, which computes no weights: while a job's forward pass runs sink_rate,
the model is switched to eager attention (``model.set_attn_implementation("eager")``) and back
to its own implementation afterwards (the pass's token function is a context manager that
extract enters around the pass).

Cost: eager attention, not the hooks (they add nothing measurable). It materialises each
layer's (B, H, T, T) probabilities in float32 (smollm2, batch 8, 2048 tokens: 1.2 GB per layer)
and grows with T^2. Measured on the CPU (1 thread, float32, batches of 8, the whole pass):
tiny-pythia 2.5x the SDPA pass's time at 512-token prompts, smollm2 1.4x; at 128 tokens within
the noise of SDPA's time. Not measured on a GPU, where SDPA runs fused kernels and the ratio is
expected to be larger. The states every other metric of the job sees come from that eager pass
(equal to SDPA's up to float rounding: 4e-7 relative on tiny-pythia, 2e-8 on smollm2; an
activation-cache entry does not record which attention computed it). The hooks keep only each
query's weight on the first token, (B, H, T) per layer, reduced in the batch to one value per
prompt and head: the cached product ``sink_rate/first_mass``, (N, L+1, H).

Architectures without attention (mamba, mamba2): one line on stderr, nothing logged; their
product has no heads (width 0).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from lw.errors import LwError, check
from lw.metrics.registry import Metric, Output

PRODUCT = "sink_rate/first_mass"   # per prompt, layer and head: (N, L+1, H)


@dataclass
class SinkRateKnobs:
    eps: float = 0.3                 # a head is a sink when a_{l,h} >= eps

    def __post_init__(self) -> None:
        check(0 < self.eps <= 1, f"metric.sink_rate.eps={self.eps}: must be in (0, 1]")


def first_columns(weights: Tensor, mask: Tensor | None) -> Tensor:
    """Each query's attention weight on its prompt's first real token.

    Args:
        weights: ``(B, H, T, T)`` attention probabilities (query, key) of one layer.
        mask: ``(B, T)`` True (or 1) on real tokens, padding on either side; None: no padding.

    Returns:
        ``(B, H, T)``, in the weights' dtype.
    """
    batch, heads, queries, _ = weights.shape
    first = (torch.zeros(batch, dtype=torch.long, device=weights.device) if mask is None
             else mask.to(weights.device).long().argmax(dim=-1))
    index = first.view(batch, 1, 1, 1).expand(batch, heads, queries, 1)
    return weights.gather(-1, index).squeeze(-1)


def first_mass(columns: Tensor, kept: Tensor) -> Tensor:
    """Per prompt and head, the mean over the counted queries of their weight on the first token.

    Args:
        columns: ``(L, B, H, T)`` :func:`first_columns` of layers 1..L.
        kept: ``(B, T)`` bool, the query positions counted (real, after skip_first).

    Returns:
        ``(L+1, B, H)`` float64: row 0 (the embeddings) NaN; NaN for a prompt with no query.
    """
    counted = kept.to(columns.device).view(1, kept.shape[0], 1, kept.shape[1])
    sums = torch.where(counted, columns.double(), 0.0).sum(dim=-1)          # (L, B, H)
    means = sums / counted.sum(dim=-1).double()
    return torch.cat([torch.full_like(means[:1], math.nan), means])


class SinkPass:
    """sink_rate's token function: a context manager that holds the model in eager attention
    with hooks on its attention modules for the whole pass, and per batch turns what the hooks
    kept into the product ``{sink_rate/first_mass: (L+1, B, H)}``."""

    def __init__(self, loaded):
        self.model = loaded.model
        self.modules = loaded.attention_modules()
        self.mask: Tensor | None = None
        self.columns: dict[int, Tensor] = {}
        self.hooks: list = []
        self.previous: str | None = None

    def __enter__(self) -> SinkPass:
        config = self.model.config
        self.previous = config._attn_implementation
        if self.previous != "eager":
            self.model.set_attn_implementation("eager")
            if config._attn_implementation != "eager":
                self.previous = None
                raise LwError(f"sink_rate: {type(self.model).__name__} cannot be switched to "
                              "eager attention (set_attn_implementation), so its attention "
                              "weights cannot be read; drop sink_rate for this model")
        try:
            self.hooks.append(self.model.register_forward_pre_hook(self._inputs,
                                                                   with_kwargs=True))
            for layer, module in enumerate(self.modules):
                self.hooks.append(module.register_forward_hook(self._weights(layer)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.columns.clear()
        self.mask = None
        if self.previous is not None and self.previous != "eager":
            self.model.set_attn_implementation(self.previous)
        self.previous = None

    def _inputs(self, module, args, kwargs) -> None:
        self.mask = kwargs.get("attention_mask")
        self.columns.clear()

    def _weights(self, layer: int):
        def hook(module, args, output) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise LwError(f"sink_rate: the attention module of block {layer + 1} "
                              f"({type(module).__name__}) returned no weights (attention "
                              f"implementation {self.model.config._attn_implementation!r})")
            self.columns[layer] = first_columns(weights, self.mask)

        return hook

    def __call__(self, hidden: Tensor, kept: Tensor, ids: Tensor) -> dict[str, Tensor]:
        if not self.hooks:
            raise LwError("sink_rate: its token function was called outside its pass "
                          "(extract enters it as a context manager)")
        if len(self.columns) != len(self.modules):
            raise LwError(f"sink_rate: the hooks saw {len(self.columns)} of "
                          f"{len(self.modules)} attention modules in this batch")
        columns = torch.stack([self.columns[i].to(kept.device)
                               for i in range(len(self.modules))])         # (L, B, H, T)
        self.columns.clear()
        return {PRODUCT: first_mass(columns, kept)}


def _token_fn(job, loaded, wanted: list[str]):
    if not loaded.attention_modules():
        # nothing to hook: a product without heads, so that the cache entry holds it
        def no_heads(hidden: Tensor, kept: Tensor, ids: Tensor) -> dict[str, Tensor]:
            return {PRODUCT: hidden.new_zeros((*hidden.shape[:2], 0), dtype=torch.float64)}

        return no_heads
    return SinkPass(loaded)


def _compute(inputs) -> Output:
    info = inputs.info
    if inputs.products[PRODUCT].shape[-1] == 0:  # no heads: an architecture without attention
        print(f"[lw] sink_rate: {info.name} has no attention ({info.architecture}): "
              "not measured", file=sys.stderr)
        return Output()
    heads = inputs.products[PRODUCT].mean(dim=0)                            # (L+1, H)
    rate = (heads >= inputs.knobs.eps).double().mean(dim=-1)
    rate[heads.isnan().any(dim=-1)] = math.nan
    table = pd.DataFrame(heads.numpy(), columns=[str(h) for h in range(heads.shape[1])])
    table.insert(0, "layer", range(heads.shape[0]))
    return Output(per_layer={"sink_rate/rate": rate, "sink_rate/first_mass": heads.mean(dim=-1)},
                  summary={"summary/sink_rate/all_layers": float(rate[1:].nanmean())},
                  tables={"sink_rate_heads": table})


METRIC = Metric(
    name="sink_rate",
    definition="Similarity family, sinks and Seq-VCR (beyond the papers)/Sink rate",
    compute=_compute, needs=("tokens",), knobs=SinkRateKnobs,
    logs={"sink_rate/rate": None, "sink_rate/first_mass": None},
    products=lambda job: [PRODUCT], token_fn=_token_fn,
    description="share of each layer's attention heads whose mean attention on the first token "
                "is >= eps (attention sinks), and that mean attention averaged over the heads; "
                "the forward pass runs with eager attention for it, not SDPA (CPU: 1.4-2.5x the "
                "pass's time at 512 tokens, more memory: (B, H, T, T) weights per layer); "
                "nothing for models without attention")
