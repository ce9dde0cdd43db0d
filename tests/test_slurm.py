"""`hydra/launcher=submitit_slurm` on a real one-node SLURM cluster (tests/slurm_cluster.py):
a sweep with a failing job and a task cancelled with scancel, its re-run, a re-run that
submits nothing, GPUs asked of a node without any; with and without SLURM accounting.
Lean on purpose: one sweep serves several assertions (each SLURM task is a python start)."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import PYTHON, cache_gate, cli_env, lw_cli, wiki_records
from lw.config.tracking import TrackingConfig
from lw.tracking.store import client_for
from slurm_cluster import SlurmCluster, why_not

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast


def _cluster(accounting: bool):
    reason = why_not(accounting)
    if reason:
        pytest.skip(f"no SLURM test cluster here: {reason}")
    # squeue forgets an ended task after 2 s: what tells its end is sacct, or nothing
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="lw-slurm-")), accounting=accounting,
                           min_job_age_s=2)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm():
    yield from _cluster(accounting=False)


@pytest.fixture(scope="module")
def slurm_with_accounting():
    yield from _cluster(accounting=True)


def sweep(cluster: SlurmCluster, tmp: Path, *overrides: str, wait: bool = True, **env: str):
    good = tmp / "good.txt"
    if not good.exists():
        good.write_text("".join(r["extract"] + "\n" for r in wiki_records()[:48]))
    command = [str(PYTHON), "-m", "lw.run", "-m", "hydra/launcher=submitit_slurm",
               "model=tiny-pythia", "data=local", "data.max_tokens=32",
               "metrics=[prompt_entropy]", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
               f"tracking.artifact_location={tmp}/art", f"hydra.sweep.dir={tmp}/multirun",
               *overrides]
    env = dict(SLURM_CONF=cluster.env["SLURM_CONF"], PATH=cluster.env["PATH"],
               LW_SLURM_CPUS="1", LW_SLURM_MEM_GB="1", LW_SLURM_TIME_MIN="20",
               OMP_NUM_THREADS="1", **env)
    if wait:  # the sweep in this process (conftest.lw_cli); SLURM runs its jobs
        return lw_cli(tmp, *command[3:], env=env)
    # a process of its own: the tests stop and continue it (SIGSTOP, SIGCONT)
    return subprocess.Popen(command, cwd=tmp, env=cli_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def runs(tmp: Path) -> list:
    # through lw's lock: the sweep may be creating the store's tables at this moment
    client = client_for(TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db"))
    experiment = client.get_experiment_by_name("lw")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def jobs_of(tmp: Path) -> list:
    return [r for r in runs(tmp) if "mlflow.parentRunId" in r.data.tags]


def arrays_submitted(tmp: Path) -> int:
    folder = tmp / "multirun" / ".submitit"
    return len([p for p in folder.iterdir() if p.is_dir()]) if folder.exists() else 0


def cancel_when_running(cluster, tmp: Path, process, n_prompts: str) -> tuple[str, int]:
    """scancel the array task of the job with ``data.n_prompts=n_prompts`` once its run is
    open (RUNNING) and it waits at the sweep's cache gate; returns the task id and the job's
    pid."""
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the job never started"
        mine = [r for r in jobs_of(tmp) if r.data.params.get("data.n_prompts") == n_prompts
                and r.info.status == "RUNNING"] if (tmp / "mlflow.db").exists() else []
        if mine:
            break
        time.sleep(0.2)
    tasks = {i: s for i, s in cluster.jobs().items() if s == "RUNNING"}
    # job #0 is the array's task 0 (submitit submits the jobs in order)
    task = next(i for i in tasks if i.endswith("_0"))
    cluster.run("scancel", task)
    return task, int(mine[0].data.tags["lw.pid"])


def wait_gone(pid: int) -> None:
    """Until the process ``pid`` has ended (a cancelled job: SLURM's SIGTERM, then SIGKILL)."""
    deadline = time.monotonic() + 300
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"the cancelled job (pid {pid}) never ended"
        time.sleep(0.2)


def test_a_sweep_with_a_failing_job_and_a_cancelled_task_then_its_rerun(slurm, tmp_path,
                                                                       lw_cache):
    # jobs: #0 6 prompts (cancelled), #1 48 prompts, #2 a bad value (fails in its task)
    grid = [f"data.path={tmp_path / 'good.txt'}", "data.n_prompts=6,48,-5",
            "extraction.cache=true"]  # (not part of a job's identity)
    with cache_gate(lw_cache) as gated:
        running = sweep(slurm, tmp_path, *grid, wait=False, LW_SLURM_GPUS="0",
                        LW_SLURM_LOST_AFTER_S="5", **gated)
        try:
            task, pid = cancel_when_running(slurm, tmp_path, running, "6")
            # the sweep looks again only once the controller has forgotten the cancelled
            # task (MinJobAge): with no sacct, nothing can tell how it ended: it is lost
            running.send_signal(signal.SIGSTOP)
            deadline = time.monotonic() + 300
            while task in slurm.jobs():
                assert time.monotonic() < deadline, "squeue never forgot the cancelled task"
                time.sleep(0.5)
            wait_gone(pid)
        except BaseException:
            running.kill()
            raise
    try:  # the gate open: the other job finishes
        running.send_signal(signal.SIGCONT)
        out, err = running.communicate(timeout=600)
    finally:
        running.kill()
    assert running.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "UncompletedJobError" not in err, err[-3000:]
    # the sweep returned once every task of its array had ended (none left RUNNING)
    status = {r.data.params["data.n_prompts"]: r.info.status for r in jobs_of(tmp_path)}
    assert status == {"6": "KILLED", "48": "FINISHED"}, status
    failed = [line for line in out.splitlines() if line.startswith("[lw] FAILED")]
    assert len(failed) == 2 and any("n_prompts" in line for line in failed), out
    # no sacct and squeue forgot it: lost after LW_SLURM_LOST_AFTER_S, not waited on for good
    assert any(task in line and "LOST" in line for line in failed), out
    killed = next(r for r in jobs_of(tmp_path) if r.info.status == "KILLED")
    assert task in killed.data.tags["lw.error"]
    parent = next(r for r in runs(tmp_path) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED" and parent.data.tags["lw.failed_jobs"] == "1"

    again = sweep(slurm, tmp_path, *grid, LW_SLURM_GPUS="0", **gated)  # the gate open
    assert again.returncode == 1, again.stderr[-3000:]
    assert "job #1 (" in again.stderr and "not submitted" in again.stderr, again.stderr[-3000:]
    finished = [r for r in jobs_of(tmp_path) if r.info.status == "FINISHED"]
    assert sorted(r.data.params["data.n_prompts"] for r in finished) == ["48", "6"]
    assert len({r.data.tags["lw.job_hash"] for r in finished}) == 2
    assert not [r for r in runs(tmp_path) if r.info.status == "RUNNING"]
    # the re-run's array held the 2 jobs left, not the skipped one
    logs = sorted((tmp_path / "multirun" / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 3 + 2, logs

    # both good jobs done: a re-run submits nothing at all
    arrays = arrays_submitted(tmp_path)
    done = sweep(slurm, tmp_path, grid[0], "data.n_prompts=6,48", LW_SLURM_GPUS="0", **gated)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("not submitted") == 2
    assert arrays_submitted(tmp_path) == arrays


def test_gpus_asked_of_a_node_without_gpus_fail_before_submission(slurm, tmp_path,
                                                                   monkeypatch):
    monkeypatch.delenv("LW_SLURM_GPUS", raising=False)  # the default: 1 GPU per job
    done = sweep(slurm, tmp_path, f"data.path={tmp_path / 'good.txt'}", "seed=0,1")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("[lw] error")]
    assert len(errors) == 1 and "LW_SLURM_GPUS=1" in errors[0] and "no GPUs" in errors[0]
    assert "Traceback" not in done.stderr
    assert arrays_submitted(tmp_path) == 0
    assert [r.info.status for r in runs(tmp_path)] == ["FAILED"]  # the parent, closed


def test_with_accounting_a_cancelled_task_is_reported_with_its_state(slurm_with_accounting,
                                                                     tmp_path, lw_cache):
    cluster = slurm_with_accounting
    with cache_gate(lw_cache) as gated:
        running = sweep(cluster, tmp_path, f"data.path={tmp_path / 'good.txt'}",
                        "data.n_prompts=6,48", "extraction.cache=true", wait=False,
                        LW_SLURM_GPUS="0", **gated)
        try:
            task, pid = cancel_when_running(cluster, tmp_path, running, "6")
            wait_gone(pid)
        except BaseException:
            running.kill()
            raise
    try:  # the gate open: the other job finishes
        out, err = running.communicate(timeout=600)
    finally:
        running.kill()
    assert running.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "CANCELLED" in cluster.run("sacct", "-X", "-n", "-j", task, "-o", "State").stdout
    failed = [line for line in out.splitlines() if line.startswith("[lw] FAILED")]
    assert len(failed) == 1 and task in failed[0] and "CANCELLED" in failed[0], out
    status = sorted((r.data.params["data.n_prompts"], r.info.status) for r in jobs_of(tmp_path))
    assert status == [("48", "FINISHED"), ("6", "KILLED")]
