"""lw in a notebook: a sweep's values as a tidy DataFrame, and one job measured in this process.

    import lw
    frame = lw.load_sweep()                       # the latest sweep of experiment "lw"
    runs = lw.load_runs()                         # one row per run: tags and summaries
    table = lw.measure("smollm2", "wiki-vital", metrics=["prompt_entropy"], data__n_prompts=32)

`load_sweep` reads what `lw.report` reads (one paginated search, each run's results/table.csv);
`measure` runs the job's stages (lw.job: plan, forward, measure) on the config a
``python -m lw.run`` command line would compose.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from lw.loading.paths import CONF_DIR

TIDY = ["run_id", "run_name", "model", "data", "perturbation", "level", "revision", "layer",
        "depth", "metric", "value"]
LEVEL_TAGS = ("lw.perturbation.p", "lw.perturbation.T", "lw.perturbation.views")


def _sweep_of(parent: str | None, experiment: str, uri: str | None):
    from lw.tracking.read import latest_parent, open_store

    client = open_store(uri)
    return client, parent or latest_parent(client, experiment)


def load_sweep(parent: str | None = None, experiment: str = "lw",
               uri: str | None = None) -> pd.DataFrame:
    """Every per-layer value of a sweep's finished runs, one row per run x metric x layer:
    run_id, run_name, model, data, perturbation, level (its p, T or views as a number; NaN for
    none), revision, layer, depth (0 = embeddings, 1 = last layer), metric, value.

    parent: the sweep's parent run id (default: the latest sweep of ``experiment``); uri: the
    tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db). Runs whose
    results cannot be read are left out with a warning naming them."""
    from lw.tracking.read import read_sweep

    client, parent = _sweep_of(parent, experiment, uri)
    sweep = read_sweep(client, parent, per_prompt=False)
    for line in sweep.missing:
        warnings.warn(f"left out: {line}", stacklevel=2)
    curves = sweep.curves
    levels = pd.Series(float("nan"), index=curves.index)
    for tag in LEVEL_TAGS:
        if tag in curves:
            levels = levels.fillna(pd.to_numeric(curves[tag], errors="coerce"))

    def tag(name: str) -> pd.Series:
        return curves[name] if name in curves else pd.Series(None, index=curves.index)

    frame = pd.DataFrame({
        "run_id": curves["run_id"], "run_name": curves["run_name"], "model": tag("lw.model"),
        "data": tag("lw.data"), "perturbation": tag("lw.perturbation"), "level": levels,
        "revision": tag("lw.model.revision"), "layer": curves["layer"].astype(int),
        "depth": curves["depth"], "metric": curves["metric"],
        "value": curves["value"]})
    frame.attrs["parent"] = parent
    return frame.sort_values(["model", "data", "level", "run_id", "metric", "layer"],
                             na_position="first").reset_index(drop=True)


def load_runs(parent: str | None = None, experiment: str = "lw",
              uri: str | None = None) -> pd.DataFrame:
    """One row per child run of a sweep (any status): run_id, run_name, status, its ``lw.*``
    tags (model, data, perturbation and level, revision, ...) and its single-valued metrics
    (``summary/...``, n_prompts, prompts_per_second, ...), as logged. One paginated search."""
    from lw.tracking.read import children

    client, parent = _sweep_of(parent, experiment, uri)
    rows = []
    for run in children(client, parent):
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name,
               "status": run.info.status}
        row.update({k: v for k, v in run.data.tags.items() if k.startswith("lw.")})
        row.update({k: v for k, v in sorted(run.data.metrics.items())
                    if not k.startswith("depth/")})
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["parent"] = parent
    return frame


def _override(key: str, value: Any) -> str:
    """A Hydra override from a Python value (strings quoted, lists as lists)."""
    def text(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return "null"
        if isinstance(v, str):
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
        if isinstance(v, list | tuple):
            return "[" + ",".join(text(x) for x in v) + "]"
        return str(v)
    return f"{key}={text(value)}"


def compose_overrides(overrides: list[str]):
    """conf/ composed with ``overrides`` as ``python -m lw.run`` would (no Hydra folders)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lw.config.schema import register_configs

    register_configs()
    # inside a running Hydra app (a Hydra callback training with lw.LayerwiseCallback) its
    # global state is set aside for this composition and given back after
    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().hydra = outer


def measure(model: Any, texts: Any, metrics: list[str] | tuple[str, ...] = ("prompt_entropy",),
            log: bool = False, **knobs: Any) -> pd.DataFrame:
    """One job in this process; returns its per-layer table (layer; depth, relative: 0 =
    embeddings, 1 = last layer; a column per metric value), with the run's summaries in
    ``table.attrs["summary"]``.

    model: a model option (``"smollm2"``, ``"pythia-70m"``: conf/model/), a hub id or a local
    folder (loaded with transformers' AutoModel), or an already loaded ``(model, tokenizer)``.
    texts: a data option (``"wiki-vital"``: conf/data/) or a list of prompts.
    knobs: any config field, dots written ``__``: ``data__n_prompts=32``,
    ``metric__prompt_entropy__alpha=2``, ``extraction__skip_first=1``, ``seed=3``.
    log: also log the job to MLflow as ``python -m lw.run`` does (``tracking__uri=...``);
    by default nothing is logged or written."""
    from lw.job.stages import compute

    loaded = model if isinstance(model, tuple | list) else None
    with tempfile.TemporaryDirectory() as tmp:
        cfg, job, overrides = composed_job(None if loaded is not None else model, texts,
                                           metrics, knobs, tmp, log)
        if loaded is not None:
            job, work = _loaded_job(job, *loaded, cfg=cfg)
        else:
            def work():
                return compute(job)
        if not log:
            result = work()
        else:
            result, run_id, logged = _log(cfg, job, work, overrides, loaded is not None)
            if result is None:  # the job's FINISHED run has it: its values, not a duplicate
                return logged
    table = result.table.copy()
    table.attrs["summary"] = dict(result.summary)
    table.attrs["model"] = result.info.as_dict()
    if log:
        table.attrs["run_id"] = run_id
    return table


def composed_job(model: str | None, texts: Any, metrics: list[str] | tuple[str, ...] | None,
                 knobs: dict[str, Any], tmp: str, log: bool):
    """The job ``measure`` runs: (the composed config, its validated dataclasses, the
    overrides). ``model`` None: a model in memory (:func:`_loaded_job` fills it in);
    ``metrics`` None: conf/config.yaml's list; prompts given as a list are written to ``tmp``
    (to lw's cache when ``log``). A bad knob is a ConfigError naming it."""
    from lw.config.schema import validate

    overrides = [] if metrics is None else [f"metrics=[{','.join(metrics)}]"]
    if model is None:
        overrides.append("model=tiny-pythia")  # replaced by the model in memory
    elif (CONF_DIR / "model" / f"{model}.yaml").exists():
        overrides.append(f"model={model}")
    else:  # a hub id or a folder
        overrides += ["model=pythia-70m", _override("model.name", Path(str(model)).name),
                      _override("model.id", str(model)), "model.revision=main"]
    if isinstance(texts, str):
        overrides.append(f"data={texts}")
    else:
        prompts = [" ".join(str(t).split()) for t in texts]
        overrides += ["data=local", _override("data.path", _prompts_file(prompts, tmp, log)),
                      f"data.n_prompts={len(prompts)}"]
    overrides += [_override(k.replace("__", "."), v) for k, v in knobs.items()]
    from hydra.errors import HydraException

    try:
        cfg = compose_overrides(overrides)
    except HydraException as error:
        raise _one_line(error) from None
    return cfg, validate(cfg), overrides


def _one_line(error: Exception):
    """Hydra's composition error as lw's one line: the knob and what is wrong with it, or the
    option that does not exist and the ones that do."""
    from lw.errors import ConfigError

    text = str(error).split("Config search path:")[0]
    found = re.match(r"Could not override '([^']+)'", text)
    if found:
        cause = str(error.__cause__ or "").splitlines()
        return ConfigError(f"{found[1]}: {cause[0] if cause else 'not an lw config field'} "
                           "(knobs are lw's config fields, dots written __: "
                           "data__n_prompts=32)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 2:  # a missing option: Hydra lists the ones there are, one a line
        return ConfigError(f"{lines[0]}; {lines[1]} {', '.join(lines[2:])}")
    cause = str(error.__cause__ or "").splitlines()
    return ConfigError(" ".join(lines) + (f": {cause[0]}" if cause else ""))


def _prompts_file(prompts: list[str], tmp: str, log: bool) -> str:
    """The prompts as a file: a temporary one; when the job is logged, one named by its
    content in lw's cache, so that the same prompts are the same job (its identity names the
    file's path) and the run's config points to a file that stays."""
    import hashlib

    text = "".join(p + "\n" for p in prompts)
    if not log:
        path = Path(tmp) / "prompts.txt"
    else:
        from lw.loading.paths import cache_dir

        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = cache_dir() / "prompts" / f"{digest}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _loaded_job(job, model, tokenizer, cfg=None):
    """The job on a model already in memory (its description from the model itself), and the
    job's stages (lw.job: plan, forward, measure) to run on it. ``cfg``, the composed config
    a logged job records, is made to describe the same model."""
    from omegaconf import open_dict

    from lw.job.stages import forward_stage, measure, plan_job
    from lw.loading.models import wrap_model

    name = str(getattr(model.config, "name_or_path", "") or model.config.model_type)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    # source "random": the plan then takes the vocabulary size from arch_config, not the hub
    described = dict(name=Path(name).name, id=name, source="random", revision="in memory",
                     arch=model.config.model_type, tokenizer="", adapters=[],
                     arch_config={"vocab_size": vocab})
    job.model = dataclasses.replace(job.model, **described)
    if cfg is not None:  # its params and tags (lw.model, ...) name this model, not the stand-in
        with open_dict(cfg):
            cfg.model.update(described)

    # a model with its LM head (one that trains): lw measures its base model, and metrics that
    # read the head (logit lens) get the head in memory, not a checkpoint's
    base = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if base is not model else None

    def work():
        device = next(model.parameters()).device
        loaded = wrap_model(base.eval(), tokenizer, job.model, revision="in memory")
        loaded.info = dataclasses.replace(loaded.info, source="in-memory")
        if head is not None:
            loaded.head = head.weight.detach()
        plan = plan_job(job, tokenizer)
        return measure(job, forward_stage(job, loaded, plan, device), plan, loaded, device)
    return job, work


def _log(cfg, job, work, overrides: list[str], in_memory: bool, folder: Path | None = None):
    """The job as ``python -m lw.run`` logs it (lw.sweep.logged: claim, compute, save, upload,
    finish) from ``folder`` (default: a new temporary one): (its result, its run id, None), or
    (None, the run id, the values of the FINISHED run that has the job already)."""
    from lw.sweep.logged import logged_job
    from lw.sweep.names import run_name
    from lw.tracking.read import run_results
    from lw.tracking.store import client_for, tracking_uri

    if in_memory:  # its weights are not in the identity: never taken for another's run
        job.tracking = dataclasses.replace(job.tracking, rerun=True)
    name = job.run_name or run_name(job, overrides)
    folder = Path(folder or tempfile.mkdtemp(prefix="lw-job-"))
    result, claimed = logged_job(cfg, job, name, overrides, f"job ({name})", folder, work)
    if result is not None:
        print(f"[lw] logged run {claimed.run_id} ({name}) to {tracking_uri(job.tracking)}")
        return result, claimed.run_id, None
    table, summary, model = run_results(client_for(job.tracking), claimed.done)
    table.attrs.update(summary=summary, model=model, run_id=claimed.done)
    return None, claimed.done, table
