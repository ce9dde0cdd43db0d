"""Hydra launchers on real sweeps: joblib (jobs in parallel processes into one SQLite store)
and submitit_local (the submitit code path a SLURM sweep takes); the SLURM config as a SLURM
user adapts it from the environment."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONF, free_port, lw_cli, wiki_records
from lw.config.schema import register_configs

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast


def sweep(tmp: Path, *overrides: str, **env: str):
    """The sweep in this process (conftest.lw_cli); its launcher runs the jobs in processes
    of their own."""
    good = tmp / "good.txt"
    good.write_text("".join(r["extract"] + "\n" for r in wiki_records()[:6]))
    return lw_cli(tmp, "-m", "model=tiny-pythia", "data=local",
                  f"data.path={good},{tmp / 'missing.txt'}", "data.n_prompts=6",
                  "data.max_tokens=32", "metrics=[prompt_entropy,curvature,dataset_entropy,dip]",
                  f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                  f"tracking.artifact_location={tmp}/art", f"hydra.sweep.dir={tmp}/multirun",
                  *overrides, env=env)


def store(tmp: Path):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def assert_one_parent_and_failures_listed(done, parents, children, n_jobs: int) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "database is locked" not in done.stdout + done.stderr
    assert len(parents) == 1 and len(children) == n_jobs
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == n_jobs // 2
    assert all("missing.txt" in r.data.tags["lw.error"] for r in failed)
    listed = [line for line in done.stdout.splitlines() if line.startswith("[lw] FAILED")]
    assert len(listed) == len(failed) and all("missing.txt" in line for line in listed)
    assert parents[0].data.tags["lw.failed_jobs"] == str(len(failed))
    # the jobs ran in processes of their own, not in the sweep's
    assert parents[0].data.tags["lw.pid"] not in {r.data.tags["lw.pid"] for r in children}


def test_joblib_runs_jobs_in_parallel_into_one_store_losing_no_point(tmp_path):
    done = sweep(tmp_path, "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    client, parents, children = store(tmp_path)
    assert_one_parent_and_failures_listed(done, parents, children, 4)
    assert parents[0].data.tags["lw.sweep_dir"] == str(tmp_path / "multirun")
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert any(later[0] < earlier[1] for earlier, later in pairwise(spans)), spans  # overlap
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == 2
    expected_points = logged_points = 0
    for run in finished:  # every point the job wrote to its folder is in the store
        results = Path(run.data.tags["lw.output_dir"]) / "results"
        table = pd.read_csv(results / "table.csv")
        summary = json.loads((results / "summary.json").read_text())
        layers = table["layer"].tolist()
        per_mille = [round(1000 * layer / layers[-1]) for layer in layers]
        curves = {c: (layers, table[c]) for c in table.columns if c not in ("layer", "depth")}
        curves |= {f"depth/{c}": (per_mille, values) for c, (_, values) in list(curves.items())}
        curves |= {k: ([0], [v]) for k, v in summary.items()}
        for key, (steps, values) in curves.items():
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == sorted(steps), key
            logged = {m.step: m.value for m in history}
            np.testing.assert_array_equal([logged[step] for step in steps],
                                          np.asarray(values, dtype=float), err_msg=key)
            expected_points += len(steps)
            logged_points += len(history)
    assert logged_points == expected_points > 200


def test_joblib_workers_in_the_default_folder_keep_results_and_count_every_failure(tmp_path):
    """No tracking server, the default sweep folder (multirun/${lw_now:...}): the good job still
    computes in its worker and keeps its results for lw.sync (lw_kept.txt); data.n_prompts=-5
    fails before any run is opened, so only its failure file tells. Workers started seconds
    after the sweep write their job folders into its folder, not one of their own clock; the
    sweep lists the failure, counts the kept job in its last line, and exits 1."""
    good = tmp_path / "good.txt"
    good.write_text("".join(r["extract"] + "\n" for r in wiki_records()[:6]))
    uri = f"http://127.0.0.1:{free_port()}"  # no server there: every job fails to track
    done = lw_cli(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                  "model=tiny-pythia", "data=local", f"data.path={good}", "data.n_prompts=6,-5",
                  "data.max_tokens=32", "tracking=server", f"tracking.uri={uri}")
    assert done.returncode == 1, done.stderr[-3000:]
    (listed,) = [line for line in done.stdout.splitlines() if line.startswith("[lw] FAILED")]
    assert "#1" in listed and "data.n_prompts=-5: must be >= 1" in listed, done.stdout
    last = done.stdout.splitlines()[-1]
    assert last.startswith("[lw] 1 job of ") and "`python -m lw.sync " in last, done.stdout
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")  # one sweep folder, both jobs in it
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml"]
    assert (sweep_dir / "1" / "lw_failed.txt").exists()
    assert [p.parent for p in tmp_path.rglob("lw_kept.txt")] == [sweep_dir / "0"]


def test_submitit_local_runs_the_sweep_through_submitit(tmp_path):
    done = sweep(tmp_path, "seed=0", "hydra/launcher=submitit_local",
                 "hydra.launcher.timeout_min=20")
    assert "sweep done" in done.stdout, done.stderr[-3000:]
    client, parents, children = store(tmp_path)
    assert_one_parent_and_failures_listed(done, parents, children, 2)
    run = next(r for r in children if r.info.status == "FINISHED")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "curvature")) \
        == list(range(7))
    # submitit ran each job from its own submission folder (what sbatch would run)
    logs = list((tmp_path / "multirun" / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2


def compose_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_the_slurm_launcher_takes_partition_gpus_and_time_from_the_environment(monkeypatch):
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    for name in ("LW_SLURM_PARTITION", "LW_SLURM_GPUS", "LW_SLURM_TIME_MIN"):
        monkeypatch.delenv(name, raising=False)
    default = compose_hydra(["hydra/launcher=submitit_slurm"]).hydra.launcher
    assert default.partition is None and default.gpus_per_node == 1
    monkeypatch.setenv("LW_SLURM_PARTITION", "gpu-a100")
    monkeypatch.setenv("LW_SLURM_GPUS", "4")
    monkeypatch.setenv("LW_SLURM_TIME_MIN", "720")
    cfg = compose_hydra(["hydra/launcher=submitit_slurm", "tracking=server",
                         "hydra.sweep.dir=/shared/sweeps/x"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__qualname__ == SlurmLauncher.__qualname__
    assert launcher.params["partition"] == "gpu-a100"
    assert launcher.params["gpus_per_node"] == 4 and launcher.params["timeout_min"] == 720
    assert launcher.params["submitit_folder"] == "/shared/sweeps/x/.submitit/%j"
