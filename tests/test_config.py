"""conf/ composed with Hydra's compose API against the structured schema (lw.config): every
option of every group composes and validates, bad values fail naming the field, unknown
options list the available ones (in-process and through the CLI)."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from conftest import ROOT, compose, compose_job, group_options, lw_cli, option_yaml
from lw.config.schema import (
    DATA_SOURCES,
    METRIC_NAMES,
    MODEL_FAMILIES,
    MODEL_SOURCES,
    PERTURBATIONS,
    LwConfig,
    ModelConfig,
    validate,
)
from lw.errors import ConfigError
from lw.loading.architectures import ARCHITECTURES

GROUPS = ("model", "data", "perturbation", "tracking")


def _all_options() -> list:
    options = [(group, name) for group in GROUPS for name in group_options(group)]
    # Experiments are optional global presets: +experiment=<name> (there may be none).
    options += [("experiment", name) for name in group_options("experiment")]
    return [pytest.param(group, name, id=f"{group}={name}") for group, name in options]


def _overrides(group: str, name: str, tmp_path) -> list[str]:
    if group == "experiment":
        return [f"+experiment={name}"]
    overrides = [f"{group}={name}"]
    if group == "data" and option_yaml("data", name).get("path") == "???":
        text = tmp_path / "prompts.txt"
        text.write_text("one prompt per line\nanother prompt here\n")
        overrides.append(f"data.path={text}")
    return overrides


def _sweep(experiment: str) -> list[tuple[str, str]]:
    """Every (key, value) of the experiment's sweep, one parameter at a time."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = (option_yaml("experiment", experiment).get("hydra") or {}).get("sweeper") or {}
    parser = OverridesParser.create()
    return [(key, value) for key, values in (sweeper.get("params") or {}).items()
            for value in parser.parse_overrides([f"{key}={values}"])[0].sweep_string_iterator()]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ has no options"
    assert {"smollm2", "minilm", "pythia", "mamba", "tiny-pythia", "tiny-mamba"} <= set(
        group_options("model"))


@pytest.mark.parametrize(("group", "name"), _all_options())
def test_option_composes_and_validates(group, name, tmp_path):
    cfg = compose(_overrides(group, name, tmp_path))
    job = validate(cfg)
    assert isinstance(job, LwConfig)
    if group == "experiment":
        return
    chosen = getattr(job, group)
    if group != "perturbation":  # perturbation names are kinds; several files may share one
        assert chosen.name == name, f"conf/{group}/{name}.yaml names itself {chosen.name!r}"
    if group == "model":
        assert chosen.source in MODEL_SOURCES and chosen.family in MODEL_FAMILIES
        assert chosen.id, f"model={name} names no model id"
    if group == "data":
        assert chosen.source in DATA_SOURCES
        assert job.data.seed == job.seed == cfg.seed  # data.seed follows the job's seed
    if group == "perturbation":
        assert chosen.name in PERTURBATIONS


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiment_sweep_points_validate(experiment):
    """A bad sweep value fails job by job at run time; every value is checked here instead:
    group choices by composing, plain values by setting them on the composed experiment."""
    base = compose([f"+experiment={experiment}"])
    for key, value in _sweep(experiment):
        if key in GROUPS:
            job = compose_job([f"+experiment={experiment}", f"{key}={value}"])
            assert getattr(job, key).name == value, (experiment, key, value)
            continue
        cfg = copy.deepcopy(base)
        OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
        node = validate(cfg)
        for part in key.split("."):
            node = getattr(node, part)
        assert node == yaml.safe_load(value), (experiment, key, value)


def test_defaults_are_the_offline_sweep():
    job = compose_job()
    assert (job.model.name, job.data.name, job.perturbation.name) == ("smollm2", "wiki-vital",
                                                                       "none")
    assert set(job.metrics) <= set(METRIC_NAMES)
    assert compose_job(["seed=7"]).data.seed == 7


def test_offline_model_options_are_pinned_and_self_contained():
    """Offline options read packages pinned in offline-assets.txt; random-init ones borrow the
    tokenizer of an offline option, so `make install` is all they need."""
    lines = [line.strip() for line in (ROOT / "offline-assets.txt").read_text().splitlines()]
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    offline = [name for name in group_options("model")
               if option_yaml("model", name).get("source", "hub") != "hub"]
    assert {"smollm2", "minilm", "tiny-pythia", "tiny-mamba"} <= set(offline)
    for name in offline:
        model = ModelConfig(**option_yaml("model", name))
        if model.source in ("package", "gguf-package"):
            assert model.package in pins, f"model={name}: {model.package} not in offline-assets"
            assert model.module and model.file
        else:
            assert model.source == "random"
            assert model.tokenizer in offline and model.tokenizer != name
            assert model.arch in ARCHITECTURES
    minilm = compose_job(["model=minilm"]).model
    assert minilm.revision == f"{minilm.package}=={pins[minilm.package]}"


def test_pythia_revision_is_sweepable():
    model = compose_job(["model=pythia-70m", "model.revision=step143000"]).model
    assert (model.id, model.revision) == ("EleutherAI/pythia-70m", "step143000")
    pythia = compose_job(["model=pythia"]).model  # alias of pythia-410m via its defaults list
    assert (pythia.name, pythia.id) == ("pythia", "EleutherAI/pythia-410m")
    assert compose_job(["model=pythia", "model.revision=step0"]).model.revision == "step0"


@pytest.mark.parametrize(("override", "field"), [
    ("data.n_prompts=-5", "data.n_prompts"),
    ("data.max_tokens=1", "data.max_tokens"),
    ("metric.prompt_entropy.alpha=0", "metric.prompt_entropy.alpha"),
    ("metric.dataset_entropy.alpha=-1", "metric.dataset_entropy.alpha"),
    ("metric.compat=authors", "metric.compat"),
    ("perturbation.p=1.5", "perturbation.p"),
    ("perturbation.p=-0.1", "perturbation.p"),
    ("perturbation.T=2", "perturbation.T"),
    ("perturbation.views=1", "perturbation.views"),
    ("metric.probe.folds=1", "metric.probe.folds"),
    ("metric.lidar.J=1", "metric.lidar.J"),
    ("metric.dime.r=0", "metric.dime.r"),
    ("metric.logit_lens.tokens=1.5", "metric.logit_lens.tokens"),
    ("extraction.skip_first=-1", "extraction.skip_first"),
    ("extraction.batch_size=0", "extraction.batch_size"),
    ("model.family=rnn", "model.family"),
])
def test_bad_value_fails_naming_the_field(override, field):
    cfg = compose([override])  # composes: the type is right, the value is not
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert field in str(error.value)


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(ConfigError) as error:
        compose_job(["metrics=[prompt_entropy,foo]"])
    message = str(error.value)
    assert "foo" in message and "metrics" in message
    assert all(name in message for name in METRIC_NAMES)
    with pytest.raises(ConfigError, match="prompt_entropy"):
        compose_job(["metrics=[]"])


def test_local_data_needs_a_path():
    with pytest.raises(ConfigError, match="data.path"):
        compose_job(["data=local"])


def test_wrong_type_fails_at_compose_naming_the_field():
    with pytest.raises(ConfigCompositionException) as error:
        compose(["data.n_prompts=abc"])
    full = f"{error.value} {error.value.__cause__}"
    assert "data.n_prompts" in full and "abc" in full


def test_unknown_option_lists_the_options():
    with pytest.raises(MissingConfigException) as error:
        compose(["model=pythai"])
    message = str(error.value)
    assert "model/pythai" in message
    for name in group_options("model"):
        assert re.search(rf"^\s+{re.escape(name)}$", message, re.M), name


def test_cli_unknown_option_is_short_and_lists_the_options(tmp_path):
    proc = lw_cli(tmp_path, "model=pythai")
    assert proc.returncode != 0
    err = proc.stderr
    assert "Could not find 'model/pythai'" in err
    assert "smollm2" in err and "pythia" in err and "tiny-mamba" in err
    assert "Traceback" not in err
    # Hydra's short error: the option list (one line per option) and a few lines around it.
    n_options = len(group_options("model"))
    assert len(err.strip().splitlines()) < n_options + 12, err
    assert not (tmp_path / "outputs").exists()  # failed before any job started
