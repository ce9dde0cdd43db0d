"""Declared metrics (lw.metrics.registry): every built-in metric declared once, the metrics part
of the job identity, and a third-party metric package installed with pip and run by lw.run
into a real MLflow store, resumed after its version is bumped."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON, cli_env, compose_job
from lw.config.schema import METRIC_NAMES
from lw.errors import ConfigError
from lw.job.identity import job_hash
from lw.metrics import registry
from lw.tracking.resume import HASH_TAG

SRC = Path(__file__).resolve().parents[1] / "src" / "lw" / "metrics"


def test_every_metric_module_declares_one_metric_and_nothing_else_lists_them():
    declared = registry.builtin()
    assert set(declared) <= set(METRIC_NAMES) and len(declared) >= 13
    for name, metric in declared.items():
        assert metric.name == name and isinstance(metric.version, int) and metric.version >= 1
        assert set(metric.needs) <= set(registry.NEEDS) and metric.logs, name
        assert all(v in (True, False, None) for v in metric.logs.values())
        if metric.knobs is not None:  # knob defaults pass their own checks
            assert dataclasses.is_dataclass(metric.knobs())
    # the module of a metric is named after it: a metric is found by its file
    assert {p.stem for p in SRC.glob("*.py")} >= set(declared)
    for path in (SRC.parents[0] / "config" / "schema.py", SRC.parents[0] / "job" / "results.py",
                 SRC.parents[0] / "job" / "stages.py"):
        text = path.read_text()
        assert not [n for n in declared if f'"{n}"' in text], path


def test_unknown_metric_lists_built_in_and_installed_ones():
    with pytest.raises(ConfigError) as error:
        compose_job(["metrics=[prompt_entropy,nope]"])
    message = str(error.value)
    assert "'nope'" in message and "installed (entry-point group lw.metrics)" in message
    assert all(name in message for name in registry.builtin())


def test_knob_checks_name_the_field():
    with pytest.raises(ConfigError, match=r"metric\.dataset_entropy\.alpha=0"):
        compose_job(["metric.dataset_entropy.alpha=0"])
    with pytest.raises(ConfigError, match=r"metric\.lidar\.J=1"):
        compose_job(["metric.lidar.J=1"])


def test_job_hash_holds_the_versions_and_knobs_of_the_metrics_it_runs_only(monkeypatch):
    base = ["model=tiny-pythia", "metrics=[curvature]"]
    job = compose_job(base)
    assert registry.identity(job) == {"metrics": {"curvature": 1},
                                      "metric": {"compat": "paper"}}
    # dip runs prompt_entropy too: both versions, prompt_entropy's knobs
    dip = registry.identity(compose_job(["metrics=[dip]"]))
    assert dip["metrics"] == {"prompt_entropy": 1, "dip": 1}
    assert dip["metric"]["prompt_entropy"] == {"alpha": 1.0}
    same = job_hash(job)
    assert job_hash(compose_job([*base, "metric.dime.r=3", "metric.normalizations=[raw]",
                                 "metric.prompt_entropy.alpha=2"])) == same
    assert job_hash(compose_job([*base, "metric.compat=official"])) != same
    before_pe = job_hash(compose_job(["metrics=[prompt_entropy]"]))
    assert job_hash(compose_job(["metrics=[prompt_entropy]",
                                 "metric.prompt_entropy.alpha=2"])) != before_pe
    bumped = dataclasses.replace(registry.every()["prompt_entropy"], version=2)
    monkeypatch.setitem(registry.every(), "prompt_entropy", bumped)
    assert job_hash(compose_job(["metrics=[prompt_entropy]"])) != before_pe
    assert job_hash(job) == same


# --- a third-party metric package -------------------------------------------------------------

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "lw-toy"
version = "0.1.0"

[project.entry-points."lw.metrics"]
mean_norm = "lw_toy:mean_norm"
spread = "lw_toy:SPREAD"
"""

MODULE = '''\
"""Two lw metrics: the smallest form (a function of the pooled vectors) and a declaration."""

import torch

from lw.metrics.registry import Metric


def mean_norm(pooled: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mean norm of the pooled vectors (N, L+1, D) per layer, times scale: (L+1,)."""
    return scale * pooled.double().norm(dim=-1).mean(dim=0)


def _spread(inputs) -> dict:
    return {"spread": inputs.pooled.double().std(dim=0).mean(dim=-1)}


SPREAD = Metric(name="spread", compute=_spread, version=1, logs={"spread": True})
'''

JOB = ["model=tiny-pythia", "data=wiki-vital", "data.n_prompts=8", "data.max_tokens=32"]


def install_toy(tmp: Path) -> Path:
    """The package folder (its own pyproject.toml) pip-installed into a folder of its own."""
    package = tmp / "lw-toy"
    (package / "lw_toy").mkdir(parents=True)
    (package / "pyproject.toml").write_text(PYPROJECT)
    (package / "lw_toy" / "__init__.py").write_text(MODULE)
    site = tmp / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--no-index", "--target", str(site),
                           str(package)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "spread = lw_toy:SPREAD" in next(site.glob("lw_toy-*.dist-info/entry_points.txt"))\
        .read_text()
    return site


def sweep(tmp: Path, site: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [str(PYTHON), "-m", "lw.run", "-m", *JOB,
               "metrics=[prompt_entropy],[mean_norm,spread]", "metric.mean_norm.scale=2",
               f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/art",
               f"hydra.sweep.dir={tmp}/multirun", *extra]
    env = cli_env()
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{site}"
    return subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_installed_metric_runs_and_a_version_bump_reruns_only_its_jobs(tmp_path):
    import torch

    from lw.job.stages import forward_stage, plan_job
    from lw.loading.models import load_model, load_tokenizer

    site = install_toy(tmp_path)
    first = sweep(tmp_path, site)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("lw").experiment_id
    jobs = [r for r in client.search_runs([experiment]) if "metrics" in r.data.params]
    toy = next(r for r in jobs if "mean_norm" in r.data.params["metrics"])
    # logged like a built-in metric: a curve over the layers, its knob from the command line
    job = compose_job([*JOB, "metrics=[dataset_entropy]"])
    plan = plan_job(job, load_tokenizer(job.model))
    loaded = load_model(job.model, torch.device("cpu"), seed=job.seed)
    pooled = forward_stage(job, loaded, plan, torch.device("cpu")).prompts.pooled.double()
    expected = {"mean_norm": 2 * np.linalg.norm(pooled.numpy(), axis=-1).mean(axis=0),
                "spread": pooled.numpy().std(axis=0, ddof=1).mean(axis=-1)}
    for name, values in expected.items():
        history = sorted(client.get_metric_history(toy.info.run_id, name),
                         key=lambda m: m.step)
        assert [m.step for m in history] == list(range(len(values)))
        np.testing.assert_allclose([m.value for m in history], values, rtol=1e-4)
    assert toy.data.params["metric.mean_norm.scale"] == "2.0"

    # a new release of the package bumps spread's version; an unused knob changes too
    module = site / "lw_toy" / "__init__.py"
    module.write_text(module.read_text().replace("version=1", "version=2"))
    second = sweep(tmp_path, site, "metric.dime.r=3")
    assert second.returncode == 0, second.stderr[-3000:]
    skipped = [line for line in second.stderr.splitlines() if "skipped, already FINISHED" in line]
    assert len(skipped) == 1 and "job #0 (" in skipped[0], second.stderr[-3000:]
    after = [r for r in client.search_runs([experiment]) if "metrics" in r.data.params]
    by_metrics = {}
    for run in after:
        by_metrics.setdefault(run.data.params["metrics"], []).append(run)
    plain = next(runs for key, runs in by_metrics.items() if "mean_norm" not in key)
    bumped = next(runs for key, runs in by_metrics.items() if "mean_norm" in key)
    assert len(plain) == 1 and len(bumped) == 2
    assert len({r.data.tags[HASH_TAG] for r in bumped}) == 2


def test_the_docs_example_package_is_the_tested_one():
    """The how-to's example package is this file's (so that the documented example is run)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "how-to" / "metrics.md").read_text()
    assert textwrap.dedent(PYPROJECT).strip() in page
    assert MODULE.strip() in page
