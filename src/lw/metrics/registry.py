"""The metric registry: every metric is declared once, in its own module, as a :class:`Metric`.

A built-in metric is a module of ``lw.metrics`` with a module-level ``METRIC``; a third-party
one is an entry point of the group ``lw.metrics`` (a :class:`Metric`, or a plain function of
the pooled vectors ``(pooled: Tensor[N, L+1, D]) -> Tensor[L+1]`` whose keyword arguments with
defaults become its knobs). Everything that used to list metric names is derived from the
declarations: the config's name list and knob schema (``metric.<name>.<knob>``), the checks,
which token products the forward pass keeps, how many augmented views it runs, what
``lw.job.measure`` computes, the layer summaries and the downstream agreement, and the
metrics part of the job identity (:func:`identity`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

from lw.errors import ConfigError, LwError, check, one_of
from lw.metrics.functional.entropy import COMPAT_MODES, NORMALIZATIONS

# What a metric can need beside the job's config. "tokens": per-prompt products computed from
# the token states inside the forward pass (its ``products``); "pooled": one vector per prompt
# and layer; "views": pooled vectors of augmented copies; "labels": data.label_field;
# "output_embedding": the LM head; "corpus": a reference corpus; "answers": multiple-choice
# answers; "model": the loaded model itself (MTEB runs its own passes).
NEEDS = ("tokens", "pooled", "views", "labels", "output_embedding", "corpus", "answers", "model")
SHARED_KNOBS = ("compat", "normalizations")  # metric.compat, metric.normalizations
ENTRY_POINT_GROUP = "lw.metrics"


@dataclass
class Output:
    """What one metric adds to the job's results."""

    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)   # name -> (L+1,)
    per_prompt: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N, L+1)
    columns: dict[str, Any] = field(default_factory=dict)   # per-prompt, layer-free: (N,)
    summary: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)    # name -> DataFrame (results/<name>.csv)
    # name -> fn(result, title) -> {figure name: matplotlib Figure}
    figures: dict[str, Callable] = field(default_factory=dict)


@dataclass
class Inputs:
    """What a metric's ``compute`` gets: the forward products and the job's plan."""

    job: Any                          # the validated LwConfig
    knobs: Any                        # this metric's knob dataclass (None if it has none)
    info: Any                         # lw.models.ModelInfo
    pooled: torch.Tensor              # (N, L+1, D) float32
    products: dict[str, torch.Tensor]  # per-prompt token products (N, L+1, ...)
    rows: torch.Tensor                # (N,) token rows each prompt's token metrics saw
    values: dict[str, torch.Tensor]   # per-prompt values (N, L+1) of the metrics run before
    per_layer: dict[str, torch.Tensor]  # per-layer values of the metrics run before
    views: torch.Tensor | None = None  # (N, L+1, J, D) pooled augmented copies
    labels: list[str] | None = None
    texts: list[str] | None = None
    questions: list | None = None     # lw.data.Question per prompt (multiple-choice data)
    generator: torch.Generator | None = None
    device: torch.device | None = None
    load_model: Callable[[], Any] | None = None  # -> lw.loading.models.LoadedModel (once)
    # "corpus": (corpus option, text field) -> its texts (lw.loading.prompts.corpus_texts)
    corpus: Callable[[str, str], list[str]] | None = None
    # "model" for MTEB: (tasks, output folder or None) -> a frame of layer, task, main_score
    mteb: Callable[[list[str], str | None], Any] | None = None
    # the products hold the sub-layer points (extraction.sublayers, on an architecture that
    # has them: lw.job.sublayers); the metrics measured there add <series>/attn, <series>/mlp
    sublayers: bool = False

    def model(self):
        """The loaded model (loaded now on an activation-cache hit)."""
        return self.load_model()

    def output_embedding(self) -> torch.Tensor:
        """``(V, D)`` the model's LM head (lw.loading.answers)."""
        return self.model().output_embedding()


@dataclass(frozen=True)
class Metric:
    """A metric, declared once.

    ``compute(inputs) -> Output | {series: (L+1,)}``; ``logs`` maps each logged series (or a
    prefix ending in "/") to whether higher is better (None: neither); ``summaries`` maps a
    series to "min" or "max" (the layer where it takes that extreme is logged as a summary);
    ``scores``: downstream scores (their best layer, and how every ``agreement`` series tracks
    them); ``uses``: metrics whose values this one reads (run first, and logged too).
    """

    name: str
    compute: Callable[[Inputs], Output | dict]
    version: int = 1
    needs: tuple[str, ...] = ("pooled",)
    knobs: type | None = None
    logs: dict[str, bool | None] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)
    scores: tuple[str, ...] = ()
    agreement: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    shared_knobs: tuple[str, ...] = ()
    # the per-prompt token products the forward pass must keep for this job
    products: Callable[[Any], list[str]] | None = None
    # its own in-pass products (names starting with "<name>/"): fn(job, loaded, wanted) ->
    # fn(hidden (L+1, B, T, D), mask (B, T)) -> {product: (L+1, B, ...)}
    token_fn: Callable | None = None
    n_views: Callable[[Any], int] | None = None
    # compared across the models of a sweep, on the prompts both measured: fn(pooled_a
    # (N, La+1, Da), pooled_b (N, Lb+1, Db), **options) -> (La+1, Lb+1). The sweep layer runs
    # it at the sweep's end for the jobs that ran this metric (lw.sweep.crossmodel).
    across_models: Callable[..., torch.Tensor] | None = None
    check: Callable[[Any], None] | None = None           # the job's config, before any load
    check_plan: Callable[[Any, Any, Any], None] | None = None  # (job, tokenizer, plan)
    min_prompts: int = 1              # the fewest prompts it can be computed on
    spread: bool = False              # measures how prompts differ: NaN on identical prompts
    description: str = ""
    # the docs/METRICS.md section that defines it ("## " title, or "<title>/<bold term>")
    definition: str = ""
    default: bool = False             # in the metrics a job runs when none are named
    source: str = "built-in"          # or the installed distribution that declared it

    def __post_init__(self) -> None:
        unknown = [n for n in self.needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"metric {self.name}: needs {unknown}; known: {', '.join(NEEDS)}")


@cache
def builtin() -> dict[str, Metric]:
    """Every ``METRIC`` of the modules of lw.metrics, by name."""
    import lw.metrics as package

    found: dict[str, Metric] = {}
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        declared = getattr(importlib.import_module(f"lw.metrics.{module.name}"), "METRIC", None)
        if declared is not None:
            found[declared.name] = declared
    return found


def _from_function(name: str, fn: Callable, source: str) -> Metric:
    """A plain function ``fn(pooled (N, L+1, D), **knobs) -> (L+1,)`` as a Metric; its keyword
    parameters with defaults become its knobs (``metric.<name>.<parameter>``)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    fields = [(p.name, p.annotation if p.annotation is not inspect.Parameter.empty
               else type(p.default), field(default=p.default))
              for p in params if p.default is not inspect.Parameter.empty]
    knobs = dataclasses.make_dataclass(f"{name}_knobs", fields) if fields else None

    def compute(inputs: Inputs) -> dict[str, torch.Tensor]:
        kwargs = dataclasses.asdict(inputs.knobs) if inputs.knobs is not None else {}
        return {name: torch.as_tensor(fn(inputs.pooled, **kwargs))}

    return Metric(name=name, compute=compute, knobs=knobs, logs={name: None},
                  description=(fn.__doc__ or "").strip().split("\n")[0], source=source)


@cache
def installed() -> dict[str, Metric]:
    """Metrics of installed packages (entry-point group ``lw.metrics``), by name."""
    from importlib.metadata import entry_points

    found: dict[str, Metric] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        source = point.dist.name if point.dist is not None else point.value
        try:
            declared = point.load()
        except Exception as error:  # a broken plugin must not break lw: say so, skip it
            print(f"[lw] metric {point.name!r} ({point.value}) does not load: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
            continue
        if isinstance(declared, Metric):
            declared = dataclasses.replace(declared, name=point.name, source=source)
        elif callable(declared):
            declared = _from_function(point.name, declared, source)
        else:
            print(f"[lw] metric {point.name!r} ({point.value}) is neither an lw Metric nor a "
                  "function of the pooled vectors: skipped", file=sys.stderr)
            continue
        found[point.name] = declared
    return found


@cache
def every() -> dict[str, Metric]:
    """Built-in metrics, then installed ones (a built-in name cannot be taken)."""
    metrics = dict(builtin())
    for name, metric in installed().items():
        if name in metrics:
            print(f"[lw] installed metric {name!r} ({metric.source}) has a built-in metric's "
                  "name: the built-in one is used", file=sys.stderr)
            continue
        metrics[name] = metric
    return metrics


def names() -> tuple[str, ...]:
    return tuple(every())


def defaults() -> list[str]:
    return [name for name, metric in builtin().items() if metric.default]


def unknown_message(name: str) -> str:
    extra = [n for n, m in every().items() if m.source != "built-in"]
    return (f"metrics={name!r} is not a metric; built-in: {', '.join(builtin())}; installed "
            f"(entry-point group {ENTRY_POINT_GROUP}): {', '.join(extra) or 'none'}")


def get(name: str) -> Metric:
    if name not in every():
        raise ConfigError(unknown_message(name))
    return every()[name]


def running(job) -> list[Metric]:
    """The job's metrics and those they use, each after what it uses, in the order asked."""
    order: list[Metric] = []

    def visit(name: str) -> None:
        if any(m.name == name for m in order):
            return
        metric = get(name)
        for used in metric.uses:
            visit(used)
        order.append(metric)

    for name in job.metrics:
        visit(name)
    return order


def knobs_of(job, metric: Metric):
    return getattr(job.metric, metric.name, None) if metric.knobs is not None else None


def metric_config_class() -> type:
    """``MetricConfig``: the shared knobs plus one knob dataclass per declared metric."""
    fields: list[tuple] = [
        ("compat", str, field(default="paper")),
        ("normalizations", list[str], field(default_factory=lambda: list(NORMALIZATIONS))),
    ]
    fields += [(m.name, m.knobs, field(default_factory=m.knobs))
               for m in every().values() if m.knobs is not None]

    def __post_init__(self) -> None:  # noqa: N807
        one_of("metric.compat", self.compat, COMPAT_MODES)
        check(len(self.normalizations) > 0,
              "metric.normalizations=[]: choose at least one of " + ", ".join(NORMALIZATIONS))
        for norm in self.normalizations:
            one_of("metric.normalizations", norm, NORMALIZATIONS)

    return dataclasses.make_dataclass("MetricConfig", fields,
                                      namespace={"__post_init__": __post_init__,
                                                 "__module__": "lw.config"})


def check_job(job) -> None:
    """Names known, and each metric's own checks (labels present, data fit for it...)."""
    check(len(job.metrics) > 0, "metrics=[]: choose at least one of " + ", ".join(names()))
    for name in job.metrics:
        get(name)
    metrics = running(job)
    labelled = [m.name for m in metrics if "labels" in m.needs]
    check(not labelled or job.data.label_field is not None,
          f"metrics {', '.join(labelled)} need labels: set data.label_field "
          "(e.g. data=wiki-vital data.label_field=topic)")
    for metric in metrics:
        if metric.check is not None:
            metric.check(job)


def check_plan(job, tokenizer, plan) -> None:
    """What the prompts allow, known before the model loads: too few prompts for a metric
    fail, each metric's own plan checks run (labels a probe cannot be cross-validated on...),
    and a set without spread (one prompt, or all identical) warns that some will be NaN."""
    metrics = running(job)
    for metric in metrics:
        check(len(plan.ids) >= metric.min_prompts,
              f"metrics {metric.name} needs at least {metric.min_prompts} prompts; data "
              f"{job.data.name!r} gives {len(plan.ids)} (data.n_prompts={job.data.n_prompts}):"
              f" raise data.n_prompts or drop {metric.name}")
        if metric.check_plan is not None:
            metric.check_plan(job, tokenizer, plan)
    blind = [metric.name for metric in metrics if metric.spread]
    if blind and (len(plan.ids) < 2 or all(prompt == plan.ids[0] for prompt in plan.ids)):
        why = ("only 1 prompt" if len(plan.ids) < 2
               else f"all {len(plan.ids)} prompts are the same tokens")
        warnings.warn(f"data {job.data.name!r}: {why}, so {', '.join(blind)} will be NaN "
                      "(they measure how prompts differ); use more, distinct prompts",
                      stacklevel=2)


def token_products_needed(job) -> list[str]:
    """Names of the per-prompt products the forward pass keeps for the job's metrics."""
    wanted: list[str] = []
    for metric in running(job):
        if metric.products is not None:
            wanted += [p for p in metric.products(job) if p not in wanted]
    return wanted


def token_functions(job, loaded, wanted: list[str]) -> dict:
    """The functions the forward pass runs on every batch to compute ``wanted``: the shared
    ones (lw.metrics.products) and those of metrics with in-pass products of their own. The
    products at the sub-layer points (``sublayer/...``, extraction.sublayers) are left to
    lw.job.sublayers.token_functions, which hooks the model."""
    from lw.metrics.functional.products import token_products
    from lw.metrics.functional.sublayers import PREFIX

    wanted = [w for w in wanted if not w.startswith(PREFIX)]
    own = {m.name: m for m in every().values() if m.token_fn is not None}
    mine = {name: [w for w in wanted if w.split("/")[0] == name] for name in own}
    fns = token_products([w for w in wanted if w.split("/")[0] not in own])
    for name, products in mine.items():
        if products:
            fns[name] = own[name].token_fn(job, loaded, products)
    return fns


def views_needed(job) -> int:
    """Augmented copies per prompt the job's metrics need (0: no views)."""
    return max((m.n_views(job) for m in running(job) if m.n_views is not None), default=0)


def needs(job, what: str) -> bool:
    return any(what in m.needs for m in running(job))


def measure(job, inputs: Inputs) -> list[Output]:
    """Every metric of the job, in order; each sees the values of those before it."""
    outputs = []
    for metric in running(job):
        inputs.knobs = knobs_of(job, metric)
        out = metric.compute(inputs)
        if not isinstance(out, Output):
            out = Output(per_layer=dict(out))
        inputs.values.update(out.per_prompt)
        inputs.per_layer.update(out.per_layer)
        outputs.append(out)
    return outputs


def summaries_of(job) -> dict[str, str]:
    picks: dict[str, str] = {}
    for metric in running(job):
        picks.update(metric.summaries)
    return picks


def scores_of(job) -> tuple[str, ...]:
    return tuple(s for m in running(job) for s in m.scores)


def agreement_of(job) -> tuple[str, ...]:
    return tuple(s for m in running(job) for s in m.agreement)


def higher_is_better(job) -> dict[str, bool | None]:
    """Each logged series (or prefix) of the job's metrics: is higher better?"""
    out: dict[str, bool | None] = {}
    for metric in running(job):
        out.update(metric.logs)
    return out


def identity(job) -> dict:
    """The metrics part of a job's identity: ``{name: version}`` of the metrics it runs, and
    the knobs of those metrics only (plus the shared knobs they read)."""
    metrics = running(job)
    knobs: dict[str, Any] = {}
    for metric in metrics:
        value = knobs_of(job, metric)
        if value is not None:
            knobs[metric.name] = dataclasses.asdict(value)
        for shared in metric.shared_knobs:
            knobs[shared] = getattr(job.metric, shared)
    return {"metrics": {m.name: m.version for m in metrics}, "metric": knobs}


def describe() -> str:
    """One line per metric: name, version, source, what it needs."""
    return "\n".join(f"{m.name} v{m.version} ({m.source}; needs {', '.join(m.needs)})"
                     f"{': ' + m.description if m.description else ''}"
                     for m in every().values())


__all__ = ["ConfigError", "Inputs", "LwError", "Metric", "Output", "every", "get", "identity"]
