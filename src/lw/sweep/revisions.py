"""A sweep over revisions of a model (checkpoints): are they what their names say? Revisions
that hold identical weights draw the same curves (EleutherAI/pythia#205: 86 of 154 pythia-2.8b
step branches serve the final weights). Checked once at the sweep's start, from file hashes,
without loading a weight (lw.loading.checkpoints.same_weights): one warning line per group,
and a tag on their jobs' runs (``lw.model.same_weights``) that the report shows."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lw.config.schema import ModelConfig
from lw.loading.checkpoints import same_weights

REVISION_KEY = "model.revision"


def job_key(model_id: str, revision: str) -> str:
    """How the sweep's state names one model's revision (its jobs look themselves up)."""
    return f"{model_id}@{revision}"


def swept_models(config: DictConfig, varied: dict[str, list[str]]) -> list[ModelConfig]:
    """The model options the sweep runs, composed as its jobs will be (the sweep's other
    overrides applied, e.g. ``model.id=<folder>``)."""
    names = varied.get("model")
    if not names:
        return [_model_config(config.model)]
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    fixed = [line for line in config.hydra.overrides.task
             if not parser.parse_override(line).is_sweep_override()]
    loader = GlobalHydra.instance().config_loader()
    return [_model_config(loader.load_sweep_config(config, [*fixed, f"model={name}"]).model)
            for name in names]


def _model_config(node) -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(node, resolve=True))


def note_same_weights(config: DictConfig, varied: dict[str, list[str]]) -> dict[str, str]:
    """Revisions of one model holding identical weights, said once as a warning line; returns
    ``job_key(id, revision)`` -> the revisions of its group (what its run's tag says).
    Revisions nobody can check (the hub out of reach, not cached, not local): said once."""
    revisions = varied.get(REVISION_KEY, [])
    if len(revisions) < 2:
        return {}
    marked: dict[str, str] = {}
    checked: set[str] = set()
    for model in swept_models(config, varied):
        if model.source != "hub" or model.id in checked:  # packaged, random: no revisions
            continue
        checked.add(model.id)
        check = same_weights(model, revisions)
        for group in check.groups():
            sha = check.fingerprints[group[0]].split(",")[0]
            print(f"[lw] warning: model {model.id} revisions {', '.join(group)} hold identical "
                  f"weights (same sha256 {sha[:12]}..., from {check.source}): their curves "
                  "will coincide", flush=True)
            marked.update({job_key(model.id, r): ", ".join(group) for r in group})
        if check.unchecked:
            why = sorted(set(check.unchecked.values()))
            print(f"[lw] model {model.id}: could not check whether revisions "
                  f"{', '.join(check.unchecked)} hold identical weights ({'; '.join(why[:2])})",
                  flush=True)
    return marked
