"""Sub-layer states (``extraction.sublayers=true``): the residual stream inside each block, after
its attention addition and after its MLP addition, where the architecture declares them
(``Architecture.residual`` in lw/loading/architectures.py).

For block l (1..L), with h_in its input (state l-1) and h_out its output:

- ``sequential`` (pre-norm Llama, and GPT-NeoX with ``use_parallel_residual=False``):
  after attention = h_in + attn(ln1(h_in)), the input of the norm before the MLP
  (``Architecture.mlp_norm``, read by a forward pre-hook); after MLP = h_out.
- ``parallel`` (GPT-NeoX / Pythia): h_out = h_in + attn(ln1(h_in)) + mlp(ln2(h_in)). No state of
  the model holds attention's addition alone; "after attention" is h_in + attn_out (the block's
  input, by a pre-hook on the block, plus its attention module's output, by a hook on it:
  a state the MLP never reads), "after MLP" is h_out, the stream after both additions.
- ``post-norm`` (BERT): after attention = LayerNorm(h_in + attn(h_in)), the attention module's
  output; after MLP = h_out = LayerNorm(that + mlp(that)).
- ``""`` (Mamba, Mamba2): no attention / MLP split: one line, nothing logged.

"After MLP" of blocks 1..L-1 is lw's state l itself. For block L it is the block's raw output:
lw's state L is after the final norm where the architecture has one (decoders), so the ``/mlp``
series differs from the plain one at layer L only, by the final norm. Layer 0 (the embeddings)
is NaN in both series.

Products (per prompt, the shared token products ``spectrum/<compat>`` and ``curvature/<compat>``
computed on these states): ``sublayer/attn/<product>`` (N, L+1, ...), row l after block l's
attention addition (row 0 empty), and ``sublayer/last/<product>`` (N, 1, ...), block L's raw
output. The metrics (prompt_entropy, curvature) turn them into ``<series>/attn`` and
``<series>/mlp`` (lw.metrics.functional.sublayers, which names them).

In the same forward pass: the hooks write into one (L+1, B, T, D) float32 buffer per batch
(rows 0..L-1 after the attention additions, row L block L's raw output), freed once the
batch's products are computed; they are removed after the pass, the model left as it was.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

from lw.errors import LwError
from lw.loading.architectures import architecture, block_list, residual_of
from lw.metrics import registry
from lw.metrics.functional.products import token_products
from lw.metrics.functional.sublayers import KINDS, PREFIX


def supported(model_type: str) -> bool:
    return bool(architecture(model_type).residual)


def unsupported_line(info) -> str:
    return (f"extraction.sublayers: {info.name} has no attention / MLP split "
            f"({info.architecture}): no sub-layer series")


def announce(job, info, needed: list[str]) -> None:
    """One line on stderr when ``extraction.sublayers=true`` gives nothing: an architecture
    without the split, or a job none of whose metrics is measured at the points."""
    if not job.extraction.sublayers:
        return
    if not supported(info.architecture):
        print(f"[lw] {unsupported_line(info)}", file=sys.stderr)
    elif not any(name.startswith(PREFIX) for name in needed):
        print("[lw] extraction.sublayers: none of the job's metrics is measured at the "
              "sub-layer points (prompt_entropy and curvature are)", file=sys.stderr)


def token_functions(job, loaded, wanted: list[str]) -> dict:
    """The registry's token functions for ``wanted`` (lw.metrics.registry.token_functions),
    plus the one of the sub-layer products among them (``sublayer/...``)."""
    fns = registry.token_functions(job, loaded, wanted)
    inside = [name for name in wanted if name.startswith(PREFIX)]
    if inside:
        fns["sublayers"] = token_fn(loaded, inside)
    return fns


def _submodule(block: torch.nn.Module, path: str, arch, field: str) -> torch.nn.Module:
    module = block
    for name in path.split("."):
        module = getattr(module, name, None) if name else None
    if not isinstance(module, torch.nn.Module):
        raise LwError(f"architecture {arch.model_type}: declared {field} {path!r} is not a "
                      f"module of {type(block).__name__}; fix lw/loading/architectures.py")
    return module


def _first(output) -> Tensor:
    return output[0] if isinstance(output, tuple | list) else output


class SublayerPass:
    """The token function of the sub-layer products: a context manager holding hooks on every
    block for the whole pass; per batch, the shared token products of the captured states."""

    def __init__(self, loaded, wanted: list[str], reduce=None):
        """``wanted``: shared token products (``spectrum/paper``, ...); ``reduce``: what to make
        of each batch's states instead, ``fn(states (L+1, B, T, D), kept, ids) -> {name:
        (L+1, B, ...)}`` (default: the shared token products of ``wanted``)."""
        self.model = loaded.model
        self.arch = architecture(loaded.info.architecture)
        self.kind = residual_of(self.arch, self.model.config)
        if not self.kind:
            raise LwError(unsupported_line(loaded.info))
        self.blocks = block_list(self.model, self.arch)
        self.reduce = reduce or token_products(wanted)["token"]
        self.device = self.model.get_input_embeddings().weight.device
        self.buffer: Tensor | None = None
        self.written: set[int] = set()
        self.inputs: dict[int, Tensor] = {}
        self.hooks: list = []

    # -- the hooks -------------------------------------------------------------------------

    def _put(self, row: int, state: Tensor) -> None:
        if self.buffer is None:
            batch, width, size = state.shape
            self.buffer = torch.empty((len(self.blocks) + 1, batch, width, size),
                                      dtype=torch.float32, device=self.device)
        self.buffer[row].copy_(state)
        self.written.add(row)

    def _reset(self, module, args, kwargs) -> None:
        self.buffer, self.written = None, set()
        self.inputs.clear()

    def _norm_input(self, layer: int):                    # sequential: ln2's input
        def hook(module, args, kwargs) -> None:
            self._put(layer, args[0] if args else kwargs["hidden_states"])
        return hook

    def _block_input(self, layer: int):                   # parallel: h_in
        def hook(module, args, kwargs) -> None:
            self.inputs[layer] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _attention_added(self, layer: int):               # parallel: h_in + attn_out
        def hook(module, args, output) -> None:
            self._put(layer, self.inputs.pop(layer).float() + _first(output).float())
        return hook

    def _attention_output(self, layer: int):              # post-norm: LN(h_in + attn)
        def hook(module, args, output) -> None:
            self._put(layer, _first(output))
        return hook

    def _last_output(self, module, args, output) -> None:  # block L, before any final norm
        self._put(len(self.blocks), _first(output))

    def __enter__(self) -> SublayerPass:
        try:
            self.hooks.append(self.model.register_forward_pre_hook(self._reset,
                                                                   with_kwargs=True))
            for layer, block in enumerate(self.blocks):
                if self.kind == "sequential":
                    norm = _submodule(block, self.arch.mlp_norm, self.arch, "mlp_norm")
                    self.hooks.append(norm.register_forward_pre_hook(self._norm_input(layer),
                                                                     with_kwargs=True))
                    continue
                attention = _submodule(block, self.arch.attention, self.arch, "attention")
                if self.kind == "parallel":
                    self.hooks.append(block.register_forward_pre_hook(self._block_input(layer),
                                                                      with_kwargs=True))
                    self.hooks.append(attention.register_forward_hook(
                        self._attention_added(layer)))
                else:
                    self.hooks.append(attention.register_forward_hook(
                        self._attention_output(layer)))
            self.hooks.append(self.blocks[-1].register_forward_hook(self._last_output))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self._reset(None, (), {})

    # -- per batch -------------------------------------------------------------------------

    def __call__(self, hidden: Tensor, kept: Tensor, ids: Tensor) -> dict[str, Tensor]:
        if not self.hooks:
            raise LwError("extraction.sublayers: its token function was called outside its "
                          "pass (extract enters it as a context manager)")
        n_blocks = len(self.blocks)
        if len(self.written) != n_blocks + 1:
            raise LwError(f"extraction.sublayers: the hooks saw {len(self.written)} of the "
                          f"{n_blocks + 1} sub-layer states of this batch "
                          f"({self.arch.model_type}, {self.kind})")
        states, self.buffer = self.buffer, None
        self.written = set()
        values = self.reduce(states.to(hidden.device), kept, ids)
        del states
        out = {}
        for name, value in values.items():
            empty = torch.full_like(value[:1], math.nan if value.dim() == 2 else 0.0)
            out[f"{PREFIX}attn/{name}"] = torch.cat([empty, value[:n_blocks]])
            out[f"{PREFIX}last/{name}"] = value[n_blocks:]
        return out


def token_fn(loaded, wanted: list[str]):
    """The pass's token function for the sub-layer products ``wanted`` (``sublayer/...``
    names); for an architecture without the split, one that gives empty products (so that an
    activation-cache entry holds them)."""
    shared = []
    for name in wanted:
        rest = name.removeprefix(PREFIX).split("/", 1)[1]
        if not rest.startswith(KINDS):
            raise LwError(f"extraction.sublayers: no sub-layer version of product {rest!r} "
                          f"(only {', '.join(k + '*' for k in KINDS)})")
        if rest not in shared:
            shared.append(rest)
    if supported(loaded.info.architecture):
        return SublayerPass(loaded, shared)
    # (the job's measure stage says so, once, also on an activation-cache hit)

    def nothing(hidden: Tensor, kept: Tensor, ids: Tensor) -> dict[str, Tensor]:
        out = {}
        for name in shared:
            for where, rows in (("attn", hidden.shape[0]), ("last", 1)):
                shape = (rows, hidden.shape[1], *((0,) if name.startswith("spectrum/") else ()))
                out[f"{PREFIX}{where}/{name}"] = hidden.new_full(shape, math.nan,
                                                                 dtype=torch.float64)
        return out

    return nothing
