"""The batched forward pass: every layer's hidden states, reduced on the device batch by batch.

Token states never outlive their batch: token-level metrics turn them into per-prompt values
and mean pooling into one vector per prompt and layer. What a job keeps is O(N x layers x D).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lw.config.schema import POOLINGS
from lw.loading.architectures import architecture, layer_states
from lw.loading.models import LoadedModel

# A per-batch token function: (hidden (L+1, B, T, D), kept (B, T) bool, ids (B, T)) -> products.
# One that is also a context manager is entered around the whole pass (extract). One with a
# ``flush()`` may hold its products back and hand them over after the last batch, one dict
# per batch in order (work that runs better over many batches at once: the logit lens).
TokenMetric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class Extraction:
    """What one pass over N prompts leaves: pooled vectors and per-prompt metric values."""

    pooled: torch.Tensor                               # (N, L+1, D) float32, CPU
    per_prompt: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N, L+1, ...)
    n_tokens: torch.Tensor | None = None               # (N,) real tokens per prompt


def length_batches(lengths: list[int], batch_size: int, equal_lengths: bool) -> list[list[int]]:
    """Prompt indices grouped into batches, longest first so padding stays small.

    With ``equal_lengths`` (SSMs, which have no attention mask: padding would flow into the
    recurrent state) a batch only holds prompts of one length, so nothing is ever padded.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not equal_lengths:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches, current = [], []
    for i in order:
        if current and (len(current) == batch_size or lengths[current[0]] != lengths[i]):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def pad_batch(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the attention mask (B, T), True on real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        mask[row, :len(prompt)] = True
    return ids, mask


def all_layers(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states (L+1, B, T, D) float32: index 0 the embedding output, index L the last block
    (the convention and each architecture's facts: lw.architectures)."""
    return layer_states(loaded.model, architecture(loaded.info.architecture), ids, mask)


def skip_leading(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The mask with each prompt's first ``k`` real positions turned off (padding-side agnostic)."""
    if k == 0:
        return mask
    return mask & (mask.long().cumsum(dim=-1) > k)


def token_norm_diagnostic(hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per prompt and layer: max token norm / median token norm, and the position of the max.

    A ratio in the hundreds flags a massive activation (attention sink), which dominates the
    Gram matrix of the token states and so every token-level metric.
    """
    norms = hidden.norm(dim=-1)                                      # (L+1, B, T)
    real = mask.unsqueeze(0).expand_as(norms)
    largest = norms.masked_fill(~real, float("-inf"))
    top, position = largest.max(dim=-1)
    median = norms.masked_fill(~real, float("nan")).nanmedian(dim=-1).values
    # Position counted from the first real token, whichever side the padding is on.
    first_real = mask.long().argmax(dim=-1)
    return {"token_norm/max_over_median": top / median,
            "token_norm/argmax_position": (position - first_real).double()}


def pool(hidden: torch.Tensor, kept: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """One vector per prompt and layer from token states.

    Args:
        hidden: ``(L+1, B, T, D)`` token states.
        kept: ``(B, T)`` bool, the positions pooling may use (real, after skip_first).
        how: ``mean`` over kept positions; ``last`` / ``first`` kept position (decoders'
            sentence embedding is often the last token's state).

    Returns:
        ``(L+1, B, D)``.
    """
    if how == "mean":
        weights = kept.unsqueeze(0).unsqueeze(-1).to(hidden.dtype)          # (1, B, T, 1)
        return (hidden * weights).sum(dim=2) / weights.sum(dim=2)
    positions = torch.arange(kept.shape[1], device=kept.device).expand_as(kept)
    if how == "last":
        index = torch.where(kept, positions, -1).amax(dim=1)
    elif how == "first":
        index = torch.where(kept, positions, kept.shape[1]).amin(dim=1)
    else:
        raise ValueError(f"pooling={how!r}: use one of {', '.join(POOLINGS)}")
    index = index.view(1, -1, 1, 1).expand(hidden.shape[0], -1, 1, hidden.shape[-1])
    return hidden.gather(2, index).squeeze(2)


def _store(per_prompt: dict[str, torch.Tensor], name: str, index: list[int],
           value: torch.Tensor, n: int) -> None:
    """Scatter a batch's ``(L+1, B, ...)`` values into ``per_prompt[name]`` ``(N, L+1, ...)``.

    Trailing sizes (a spectrum's width) may differ between batches: the store is widened with
    zeros, which no spectrum-based metric counts. Scalars start as NaN (never measured)."""
    value = value.transpose(0, 1).double().cpu()
    if name not in per_prompt:
        fill = float("nan") if value.dim() == 2 else 0.0
        per_prompt[name] = torch.full((n, *value.shape[1:]), fill, dtype=torch.float64)
    stored = per_prompt[name]
    if value.dim() > 2 and value.shape[-1] != stored.shape[-1]:
        width = max(value.shape[-1], stored.shape[-1])
        if stored.shape[-1] < width:
            stored = per_prompt[name] = torch.nn.functional.pad(stored,
                                                                (0, width - stored.shape[-1]))
        value = torch.nn.functional.pad(value, (0, width - value.shape[-1]))
    stored[index] = value


@torch.inference_mode()
def extract(loaded: LoadedModel, prompts: list[list[int]], *, batch_size: int,
            skip_first: int = 0, token_metrics: dict[str, TokenMetric] | None = None,
            device: torch.device | None = None, pooling: str = "mean",
            desc: str = "prompts", progress: bool = True) -> Extraction:
    """One forward pass over ``prompts`` (token id lists), batch by batch.

    Returns pooled vectors (``pooling`` over the real tokens after skipping the first
    ``skip_first``) and, for every token function, its per-prompt values ``(N, L+1, ...)``;
    always includes the token-norm diagnostic. A token function that is a context manager
    (sink_rate's: attention hooks, eager attention) is entered before the first batch and
    left after the last, also when the pass fails; one with ``flush()`` hands its products
    over after the last batch (the logit lens's projection, in chunks across batches).
    """
    device = device or loaded.model.get_input_embeddings().weight.device
    token_metrics = dict(token_metrics or {})
    n, n_states, width = len(prompts), loaded.info.n_layers + 1, loaded.info.hidden_size
    pooled = torch.empty((n, n_states, width), dtype=torch.float32)
    per_prompt: dict[str, torch.Tensor] = {}
    pad_id = _pad_id(loaded.tokenizer)
    batches = length_batches([len(p) for p in prompts], batch_size,
                             equal_lengths=loaded.info.family == "ssm")
    bar = tqdm(total=n, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True,
               disable=not progress)
    with contextlib.ExitStack() as during:
        # token functions that are context managers hold something for the whole pass (hooks,
        # an attention implementation): entered before the first batch, left after the last
        for metric in token_metrics.values():
            if hasattr(metric, "__enter__"):
                during.enter_context(metric)
        for index in batches:
            ids, mask = pad_batch([prompts[i] for i in index], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            hidden = all_layers(loaded, ids, mask)
            mask = mask.to(hidden.device)  # a model spread over GPUs ends on another device
            kept = skip_leading(mask, skip_first)
            ids = ids.to(hidden.device)
            values = token_norm_diagnostic(hidden, mask)
            for metric in token_metrics.values():
                values.update(metric(hidden, kept, ids))
            pooled[index] = pool(hidden, kept, pooling).transpose(0, 1).float().cpu()
            for name, value in values.items():
                _store(per_prompt, name, index, value, n)
            bar.update(len(index))
        for metric in token_metrics.values():
            if hasattr(metric, "flush"):
                for index, values in zip(batches, metric.flush(), strict=True):
                    for name, value in values.items():
                        _store(per_prompt, name, index, value, n)
    bar.close()
    n_tokens = torch.tensor([len(p) for p in prompts])
    return Extraction(pooled=pooled, per_prompt=per_prompt, n_tokens=n_tokens)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
