"""Run names: a job's run after its model and what the sweep varies, a sweep's parent run after
the values it sweeps."""


from __future__ import annotations

from pathlib import Path

from lw.config.schema import LwConfig


def short_value(key: str, value: str) -> str:
    """How a run name shows one varied override: a group's choice, a revision or a file as its
    value (a file's name), a knob as its last name and value (perturbation.p=0.5 -> p=0.5)."""
    value = Path(value).name if "/" in value else value  # a file: its name
    if "." not in key or key in ("model.revision", "data.revision", "data.path"):
        return value
    return f"{key.rsplit('.', 1)[-1]}={value}"


def sweep_name(varied: dict[str, list[str]], folder: str) -> str:
    """A parent run named after what the sweep varies: "sweep smollm2,minilm x wiki-vital"."""
    parts = []
    for key, values in varied.items():
        shown = [short_value(key, v) for v in values]
        if "=" in shown[0]:  # a knob: its name once, "p=0,0.5"
            shown = [shown[0]] + [v.split("=", 1)[1] for v in shown[1:]]
        parts.append(",".join(shown))
    return "sweep " + (" x ".join(parts)[:80] or folder)


RUN_NAME_MAX = 250  # runs.name is VARCHAR(250) in MLflow's SQL stores (PostgreSQL enforces it)


def run_name(job: LwConfig, overrides: list[str]) -> str:
    """Short enough for the MLflow table's default width: the model, then what the sweep
    varies ("smollm2 wiki-vital p=0.5", "pythia-70m step1000"); outside a sweep, the model,
    the data and a perturbation."""
    from lw.tracking.sweep_state import current

    varies = current().varies
    if varies is None:
        parts = [job.data.name] + ([] if job.perturbation.name == "none"
                                   else [job.perturbation.name])
        return " ".join([job.model.name, *parts])
    keys = [k for k in varies if k != "model"]
    values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return " ".join([job.model.name] + [short_value(k, values[k]) for k in keys if k in values])
