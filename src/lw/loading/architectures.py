"""What lw must know about each architecture, declared in one place, keyed by ``config.model_type``.

The layer convention, for every architecture: ``L + 1`` states, index 0 the embedding output (what
block 1 receives), index ``l`` the output of block ``l``, index ``L`` the last block's output, after
the final norm where the architecture has one. Hugging Face returns that as-is for transformers;
its Mamba and Mamba2 return block outputs plus the final-norm output and no embedding output
(``layout="blocks+norm"``), rearranged here. ``check_layer_convention`` runs on every load: a
2-token forward pass with hooks on block 1, so an architecture declared with the wrong layout
fails loudly instead of shifting every layer by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lw.errors import LwError

LAYOUTS = ("embeddings-first", "blocks+norm")
# How a block adds attention and MLP to the residual stream (extraction.sublayers: where the
# states after each addition are, lw.job.sublayers): "sequential" pre-norm, h + attn(ln1(h)),
# then + mlp(ln2(.)); "parallel", h + attn(ln1(h)) + mlp(ln2(h)); "post-norm", LayerNorm after
# each addition; "": no attention / MLP split (SSMs).
RESIDUALS = ("sequential", "parallel", "post-norm", "")


@dataclass(frozen=True)
class Architecture:
    """Facts about one ``model_type``."""

    model_type: str
    config_class: str          # transformers config class, for random init
    blocks: str                # attribute path of the block list (the check hooks its first)
    layout: str                # how output_hidden_states comes back (LAYOUTS)
    padding_safe: bool         # False: no attention mask, batches must hold equal lengths
    last_state_after_final_norm: bool  # BERT-style encoders have no final norm
    attention: str = ""        # attribute path of the attention module inside a block, which
                               # returns (output, weights) in eager mode; "" for none
    residual: str = ""         # how a block adds attention and MLP (RESIDUALS): where the
                               # sub-layer states are (extraction.sublayers)
    mlp_norm: str = ""         # sequential: the norm before the MLP, whose input is the stream
                               # after the attention addition
    parallel_switch: str = ""  # parallel: the config flag that, False, makes the block
                               # sequential (GPT-NeoX's use_parallel_residual)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise LwError(f"architecture {self.model_type}: layout={self.layout!r} is not one of "
                          f"{', '.join(LAYOUTS)}")
        if self.residual not in RESIDUALS:
            raise LwError(f"architecture {self.model_type}: residual={self.residual!r} is not "
                          f"one of {', '.join(map(repr, RESIDUALS))}")


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("gpt_neox", "GPTNeoXConfig", "layers", "embeddings-first", True, True,
                 attention="attention", residual="parallel", mlp_norm="post_attention_layernorm",
                 parallel_switch="use_parallel_residual"),
    Architecture("mamba", "MambaConfig", "layers", "blocks+norm", False, True),
    Architecture("mamba2", "Mamba2Config", "layers", "blocks+norm", False, True),
    Architecture("llama", "LlamaConfig", "layers", "embeddings-first", True, True,
                 attention="self_attn", residual="sequential",
                 mlp_norm="post_attention_layernorm"),
    Architecture("bert", "BertConfig", "encoder.layer", "embeddings-first", True, False,
                 attention="attention", residual="post-norm"),
)}


def architecture(model_type: str) -> Architecture:
    """The registered facts for ``model_type``; LwError naming it and the registered ones."""
    if model_type not in ARCHITECTURES:
        raise LwError(f"architecture {model_type!r} is not registered in "
                      f"lw/loading/architectures.py (registered: {', '.join(ARCHITECTURES)}); "
                      "its layer convention must be "
                      "declared there before lw can measure it")
    return ARCHITECTURES[model_type]


def residual_of(arch: Architecture, config) -> str:
    """How the blocks of a model with this ``config`` add attention and MLP: the declared
    ``residual``, but "sequential" for a "parallel" one whose ``parallel_switch`` is off."""
    if arch.residual == "parallel" and arch.parallel_switch and not getattr(
            config, arch.parallel_switch, True):
        return "sequential"
    return arch.residual


def config_class(model_type: str):
    """The transformers config class that random-initialises ``model_type``."""
    import transformers

    return getattr(transformers, architecture(model_type).config_class)


def layer_states(model: torch.nn.Module, arch: Architecture, ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Every layer's token states in lw's convention.

    Args:
        model: a Hugging Face base model (no LM head) of architecture ``arch``.
        ids: ``(B, T)`` token ids. mask: ``(B, T)`` bool, True on real tokens (not passed to
            ``blocks+norm`` models, which get equal-length batches).

    Returns:
        ``(L+1, B, T, D)`` float32: 0 the embedding output, ``l`` block ``l``'s output.
    """
    # use_cache=False: in eval mode decoders and SSMs would otherwise build a KV / SSM cache of
    # every layer for the batch (about as large as the states), used for nothing.
    if arch.layout == "blocks+norm":
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        # (block 1 .. block L, norm(block L)) -> (embeddings, block 1 .. block L-1, norm(block L))
        states = (model.get_input_embeddings()(ids), *out.hidden_states[:-2],
                  out.hidden_states[-1])
    else:
        out = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True,
                    use_cache=False)
        states = out.hidden_states
    # A model spread over GPUs (model.device_map=auto) leaves each layer's states on its own
    # device: the metrics take them on one, the inputs' (a no-op on one device).
    return torch.stack([state.to(ids.device) for state in states]).float()


def block_list(model: torch.nn.Module, arch: Architecture) -> torch.nn.ModuleList:
    """The model's blocks, found at ``arch.blocks``; LwError when the declaration is wrong."""
    found = model
    for name in arch.blocks.split("."):
        found = getattr(found, name, None)
    if not isinstance(found, torch.nn.ModuleList):
        raise LwError(f"architecture {arch.model_type}: declared blocks {arch.blocks!r} are not "
                      f"a module list of {type(model).__name__}; fix lw/loading/architectures.py")
    return found


@torch.inference_mode()
def check_layer_convention(model: torch.nn.Module, arch: Architecture) -> None:
    """Raise LwError unless ``layer_states`` gives L+1 states, state 0 equal to what block 1
    receives (the embedding output) and state 1 equal to what block 1 returns (when L > 1:
    with one block, state 1 may be after the final norm).

    Cost: one forward pass over 2 tokens.
    """
    blocks = block_list(model, arch)
    seen: dict[str, torch.Tensor] = {}

    def block_input(module, args, kwargs):
        seen.setdefault("input", args[0] if args else kwargs["hidden_states"])

    def block_output(module, args, kwargs, output):
        seen.setdefault("output", output[0] if isinstance(output, tuple) else output)

    hooks = [blocks[0].register_forward_pre_hook(block_input, with_kwargs=True),
             blocks[0].register_forward_hook(block_output, with_kwargs=True)]
    embeddings = model.get_input_embeddings()
    ids = torch.tensor([[1, 2]], device=embeddings.weight.device) % embeddings.num_embeddings
    try:
        states = layer_states(model, arch, ids, torch.ones_like(ids, dtype=torch.bool))
    finally:
        for hook in hooks:
            hook.remove()
    n_layers = len(blocks)
    where = (f"architecture {arch.model_type} (declared layout {arch.layout!r} in "
             "lw/loading/architectures.py)")
    if states.shape[0] != n_layers + 1:
        raise LwError(f"{where}: {states.shape[0]} hidden states for {n_layers} blocks, "
                      f"expected {n_layers + 1}")
    expected = [("0", "the embedding output (block 1's input)", seen["input"])]
    if n_layers > 1:
        expected.append(("1", "block 1's output", seen["output"]))
    for index, what, tensor in expected:
        state = states[int(index)]
        if not torch.allclose(state, tensor.float().to(state.device), rtol=1e-4, atol=1e-5):
            raise LwError(f"{where}: state {index} is not {what}; every layer would be shifted. "
                          "Declare the architecture's layout correctly.")


def make_bidirectional(model: torch.nn.Module) -> torch.nn.Module:
    """Every attention layer attends both ways, as LLM2Vec trains its encoders: transformers
    builds a bidirectional mask when ``config.is_causal`` is False, and attention modules whose
    ``is_causal`` is False never fall back to a causal kernel when that mask is skipped."""
    causal = [m for m in model.modules() if getattr(m, "is_causal", None) is True]
    if not causal:
        raise LwError(f"model.bidirectional=true: {model.config.model_type} has no causal "
                      "attention layers to make bidirectional")
    model.config.is_causal = False
    for module in causal:
        module.is_causal = False
    return model
