"""lw as a user installs it: a wheel built from this checkout, pip-installed (not editable) into
a new virtual environment, run from folders outside the repository: the packaged assets, and
the user's own model, data set and experiment beside it (Hydra's search path, --config-dir).

The new environment gets lw from the wheel only; its dependencies (torch, transformers, ...:
gigabytes) and the offline asset packages are read from the project's environment through a
path file, not installed again."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON, ROOT, cli_env, wiki_records

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

# What a build needs; the rest of the checkout (its venv, git, results) stays out.
SKIPPED = (".venv", ".git", "mlruns", "multirun", "outputs", "mlserver", "build", "dist",
           "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "bench", "docs",
           "tests")


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=cli_env(PYTHONPATH=""),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """The new environment's python, lw installed there from a wheel of this checkout."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "lw-source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*SKIPPED))
    run([PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", tmp / "dist", source], tmp)
    (wheel,) = (tmp / "dist").glob("lw-*.whl")
    run([PYTHON, "-m", "venv", "--without-pip", tmp / "venv"], tmp)
    python = tmp / "venv" / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    tmp).stdout.strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([PYTHON, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         "--no-index", wheel], tmp)
    return python


def test_the_installed_lw_is_the_wheels_with_its_own_conf_and_assets(venv, tmp_path):
    where = run([venv, "-c", "import lw, lw.loading.paths as p; print(lw.__file__); "
                 "print(p.CONF_DIR); print(p.checkout())"], tmp_path).stdout.split()
    assert all(Path(w).is_relative_to(venv.parents[1]) for w in where[:2]), where
    assert where[2] == "None"  # not lw's checkout: no git commit of some other project
    assert (Path(where[1]) / "model" / "minilm.yaml").is_file()  # the wheel's own conf
    printed = run([venv, "-m", "lw.offline", "--print"], tmp_path).stdout
    assert "--no-deps" in printed and str(Path(where[0]).parent / "offline-assets.txt") in printed


USER_MODEL = """\
# a model of this project's own: a local folder in transformers' format
name: my-neox
source: hub
id: {folder}
revision: main
family: decoder
"""
USER_DATA = """\
name: my-notes
source: local
path: notes.txt   # relative to the folder lw runs in
text_field: text
n_prompts: 6
min_tokens: 8
max_tokens: 32
"""
USER_EXPERIMENT = """\
# @package _global_
# this project's study: its own model beside a packaged one, on its own notes
defaults:
  - override /data: my-notes
metrics: [prompt_entropy, curvature]
hydra:
  sweeper:
    params:
      model: minilm,my-neox
"""


def test_a_users_own_model_data_and_experiment_extend_lws_configs_run_in_their_folder(
        venv, tmp_path):
    """The installed lw, run from a project folder that holds only the user's configs and
    notes: it composes them with its own (a packaged model beside the user's), writes only
    there, and records no git commit (the folder is not lw's checkout)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from lw.loading.model_sources import load_tokenizer_of

    folder = tmp_path / "models" / "my-neox"
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=128,
                                     vocab_size=49152)).save_pretrained(folder)
    load_tokenizer_of("smollm2").save_pretrained(folder)
    project = tmp_path / "project"
    for group, text in (("model/my-neox", USER_MODEL.format(folder=folder)),
                        ("data/my-notes", USER_DATA), ("experiment/my-study", USER_EXPERIMENT)):
        (project / "conf" / group).parent.mkdir(parents=True, exist_ok=True)
        (project / "conf" / f"{group}.yaml").write_text(text)
    (project / "notes.txt").write_text("".join(r["extract"] + "\n" for r in wiki_records()[:6]))
    done = run([venv, "-m", "lw.run", "-m", "--config-dir", "conf", "+experiment=my-study"],
               project)
    assert "2 of 2 jobs finished" in done.stdout, done.stdout[-2000:]
    assert sorted(p.name for p in project.iterdir()) == ["conf", "mlruns", "multirun",
                                                         "notes.txt"]
    client = MlflowClient(f"sqlite:///{project}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    jobs = {r.data.tags["lw.model"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert sorted(jobs) == ["minilm", "my-neox"]
    assert {r.info.status for r in jobs.values()} == {"FINISHED"}
    assert {r.data.params["data.name"] for r in jobs.values()} == {"my-notes"}
    assert {r.data.tags.get("lw.git_commit", "unknown") for r in jobs.values()} == {"unknown"}
    history = client.get_metric_history(jobs["my-neox"].info.run_id, "prompt_entropy/max")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # its embeddings and 3 layers
