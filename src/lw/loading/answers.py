"""What answer-letter scoring needs beside the hidden states: the model's output embedding (its
LM head) and the token ids of the answer letters.

lw loads base models (no LM head). A tied model's head is its input embedding matrix; an untied
one's (Pythia's ``embed_out``, Llama 3's ``lm_head``) is read from its checkpoint files alone,
without loading the causal-LM model a second time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lw.errors import LwError

HEAD_KEYS = ("lm_head.weight", "embed_out.weight", "output.weight")


def _checkpoint_file(source: str, name: str, revision: str | None) -> Path | None:
    """``name`` in a local model folder, or the hub's (cached) copy; None when there is none."""
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.exists() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from lw.loading.hub import hub_reachable

    try:
        return Path(hf_hub_download(source, name, revision=revision,
                                    local_files_only=not hub_reachable()))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _head_from_checkpoint(source: str, revision: str | None) -> torch.Tensor:
    from safetensors import safe_open

    index = _checkpoint_file(source, "model.safetensors.index.json", revision)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        key = next((k for k in HEAD_KEYS if k in weight_map), None)
        files = [weight_map[key]] if key else []
    else:
        files = ["model.safetensors"]
    for name in files:
        path = _checkpoint_file(source, name, revision)
        if path is None:
            continue
        with safe_open(str(path), "pt") as weights:
            key = next((k for k in HEAD_KEYS if k in weights.keys()), None)
            if key is not None:
                return weights.get_tensor(key)
    raise LwError(f"model {source!r}: no output embedding ({', '.join(HEAD_KEYS)}) in its "
                  "safetensors checkpoint; mc_accuracy needs the LM head")


def output_embedding(model: torch.nn.Module) -> torch.Tensor:
    """``(V, D)`` the LM head's weight for a base model: the input embeddings when the model
    ties them (SmolLM2, Mamba), else the head read from the checkpoint the model came from."""
    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        return model.get_input_embeddings().weight.detach()
    source = getattr(config, "_name_or_path", "") or ""
    if not source:
        raise LwError(f"model ({config.model_type}) has untied, randomly initialised "
                      "embeddings and no checkpoint: there is no trained LM head to score "
                      "answers with")
    revision = getattr(config, "_commit_hash", None)
    return _head_from_checkpoint(source, revision)
