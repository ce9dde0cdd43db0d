"""Resume (lw.resume): real sweeps into temporary MLflow stores, killed with SIGKILL and run
again; the rule that tells a dead run from a live one; sweeps racing to create a new store."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import test_tracking
from conftest import PYTHON, cache_gate, cli_env, compose_job, lw_cli
from lw.config.tracking import TrackingConfig
from lw.job.identity import job_hash
from lw.tracking.resume import (
    HASH_TAG,
    HEARTBEAT_TAG,
    STALE_AFTER_S,
    Heartbeat,
    is_dead,
    owner_tags,
    reap,
)
from lw.tracking.store import client_for

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

server = test_tracking.server  # a real `mlflow server` on 127.0.0.1 (module fixture)

JOB = ["model=tiny-pythia", "data=wiki-vital", "data.n_prompts=8", "data.max_tokens=32",
       "metrics=[prompt_entropy]"]


def store_args(tmp: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/art",
            f"hydra.run.dir={tmp}/run", f"hydra.sweep.dir={tmp}/multirun"]


def lw_run(tmp: Path, *overrides: str, wait: bool = True, **env: str):
    command = [str(PYTHON), "-m", "lw.run", *overrides]
    if not wait:
        return subprocess.Popen(command, cwd=tmp, env=cli_env(**env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=tmp, env=cli_env(**env), capture_output=True,
                          text=True, timeout=600)


def runs_of(client) -> list:
    return client.search_runs([client.get_experiment_by_name("lw").experiment_id])


def test_a_sweep_killed_mid_job_resumes_without_redoing_finished_jobs(tmp_path, lw_cache):
    """Seed 0 finished by an earlier sweep; a sweep of seeds 0-2 skips it and is killed (-9)
    while job #1's run is open (held at the cache gate, so it cannot end first); the same
    command again computes jobs #1 and #2 only, and marks the killed runs KILLED."""
    sweep = ["-m", *JOB, "extraction.cache=true", *store_args(tmp_path)]  # (not identity)
    env = {"LW_CACHE_DIR": str(lw_cache)}
    first = lw_cli(tmp_path, *sweep, "seed=0", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    client = client_for(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    (finished,) = [r for r in runs_of(client) if r.data.params.get("seed") == "0"]
    with cache_gate(lw_cache) as gated:
        running = lw_run(tmp_path, *sweep, "seed=0,1,2", wait=False, **gated)
        try:
            deadline = time.monotonic() + 300  # a guard, not a measurement
            while True:  # job #1's run open, the job held at the gate
                assert running.poll() is None, running.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "job #1 never started"
                if [r for r in runs_of(client) if r.data.params.get("seed") == "1"]:
                    break
                time.sleep(0.05)
            running.send_signal(signal.SIGKILL)
            running.communicate(timeout=60)
        finally:
            running.kill()
    before = runs_of(client)
    stale = {r.info.run_id for r in before if r.info.status == "RUNNING"}
    status = sorted((r.data.params.get("seed", "parent"), r.info.status) for r in before)
    assert status == [("0", "FINISHED"), ("1", "RUNNING"), ("parent", "FINISHED"),
                      ("parent", "RUNNING")]

    again = lw_cli(tmp_path, *sweep, "seed=0,1,2", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    # the job that had finished is said skipped, naming the run it found
    assert any("job #0 (" in line and "skipped" in line and finished.info.run_id in line
               for line in again.stderr.splitlines()), again.stderr[-3000:]
    after = runs_of(client)
    assert not [r for r in after if r.info.status == "RUNNING"]
    jobs = [r for r in after if "seed" in r.data.params]
    for seed in "012":
        done = [r for r in jobs if r.data.params["seed"] == seed and r.info.status == "FINISHED"]
        assert len(done) == 1, seed
    assert [r.info.run_id for r in jobs if r.data.params["seed"] == "0"] == [
        finished.info.run_id]  # not run again
    killed = {r.info.run_id for r in after if r.info.status == "KILLED"}
    assert killed == stale
    assert all(r.data.tags["lw.killed_by"].startswith("sweep ") for r in after
               if r.info.run_id in killed)
    (new_parent,) = [r for r in after if "seed" not in r.data.params
                     and r.info.start_time > max(s.info.start_time for s in before)]
    assert new_parent.info.status == "FINISHED"
    assert new_parent.data.tags["lw.skipped_jobs"] == "1" and new_parent.data.tags["lw.jobs"] == "2"
    # every job run carries the hash of its config
    for run in jobs:
        expected = job_hash(compose_job([*JOB, f"seed={run.data.params['seed']}"]))
        assert run.data.tags[HASH_TAG] == expected


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_dead_and_live_runs_are_told_apart(tmp_path):
    client = client_for(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    experiment = client.create_experiment("lw", artifact_location=str(tmp_path / "art"))
    here, long_ago = owner_tags(), int(time.time() - STALE_AFTER_S - 60)
    elsewhere = {**here, "lw.host": "node-17", "lw.pid": "1"}
    cases = {  # name: (tags, started long ago?, dead?)
        "this process": (here, True, False),
        "exited process here": ({**here, "lw.pid": str(_exited_pid())}, False, True),
        "reused pid here": ({**here, "lw.pid_started": "12.0"}, False, True),
        "elsewhere, beating": ({**elsewhere, "lw.heartbeat": str(int(time.time()))}, True,
                               False),
        "elsewhere, silent": ({**elsewhere, "lw.heartbeat": str(long_ago)}, True, True),
        # runs from before owner tags: only their start time tells
        "untagged, old": ({}, True, True),
        "untagged, new": ({}, False, False),
    }
    made = {name: client.create_run(experiment, run_name=name, tags=tags,
                                    start_time=long_ago * 1000 if old else None)
            for name, (tags, old, _) in cases.items()}
    expected = {name: dead for name, (_, _, dead) in cases.items()}
    for name, run in made.items():
        assert is_dead(client.get_run(run.info.run_id)) == expected[name], name
    reaped = {r.info.run_name for r in reap(client, experiment, "test")}
    assert reaped == {n for n, dead in expected.items() if dead}
    status = {r.info.run_name: r.info.status for r in client.search_runs([experiment])}
    assert status == {n: "KILLED" if dead else "RUNNING" for n, dead in expected.items()}


def test_a_live_run_keeps_beating_and_stops_when_told(tmp_path):
    client = client_for(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    experiment = client.create_experiment("lw", artifact_location=str(tmp_path / "art"))
    run = client.create_run(experiment, tags={HEARTBEAT_TAG: "0"})
    with Heartbeat(client, run.info.run_id, every=0.05):
        deadline = time.monotonic() + 60
        while client.get_run(run.info.run_id).data.tags[HEARTBEAT_TAG] == "0":
            assert time.monotonic() < deadline, "no beat"
            time.sleep(0.05)
    beat = client.get_run(run.info.run_id).data.tags[HEARTBEAT_TAG]
    assert abs(int(beat) - time.time()) < 60
    client.set_tag(run.info.run_id, HEARTBEAT_TAG, "stopped")
    time.sleep(0.3)  # 6 periods: a beat still going would have overwritten it
    assert client.get_run(run.info.run_id).data.tags[HEARTBEAT_TAG] == "stopped"


def test_resume_and_rerun_on_a_tracking_server(server, tmp_path):
    uri, _ = server
    client = MlflowClient(uri)
    experiment = client.create_experiment("lw-resume")
    # a run its process left RUNNING on this host, with the job's hash
    job = [*JOB, "tracking=server", "tracking.experiment=lw-resume"]
    dead = client.create_run(experiment, run_name="killed", tags={
        **owner_tags(), "lw.pid": str(_exited_pid()),
        HASH_TAG: job_hash(compose_job(job))})
    args = [*job, f"hydra.run.dir={tmp_path}/run"]
    first = lw_cli(tmp_path, *args, env={"MLFLOW_TRACKING_URI": uri})
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"run {dead.info.run_id} (killed) was left RUNNING" in first.stderr
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    second = lw_cli(tmp_path, *args, env={"MLFLOW_TRACKING_URI": uri})
    assert second.returncode == 0 and "skipped, already FINISHED" in second.stderr
    runs = client.search_runs([experiment])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    assert socket.gethostname() == runs[0].data.tags["lw.host"]
    forced = lw_cli(tmp_path, *args, "tracking.rerun=true", env={"MLFLOW_TRACKING_URI": uri})
    assert forced.returncode == 0 and "skipped" not in forced.stderr
    runs = client.search_runs([experiment])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED"]
    assert len({r.data.tags[HASH_TAG] for r in runs}) == 1



@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_two_launches_of_one_sweep_compute_each_job_once(tmp_path, store, request):
    """Two launches started together: on SQLite one lock orders them (and the store is new:
    they race to create it, which once broke it with `table _alembic_tmp_latest_metrics
    already exists`); on a server both may create a run for a job, and the oldest live one
    goes on while the other steps aside."""
    if store == "sqlite":
        where, env = store_args(tmp_path)[:2], {}
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    else:
        uri, _ = request.getfixturevalue("server")
        where, env = ["tracking=server", "tracking.experiment=lw-two-launches"], {
            "MLFLOW_TRACKING_URI": uri}
        client = MlflowClient(uri)
    sweep = ["-m", *JOB, "seed=0,1", *where]
    started = [lw_run(tmp_path, *sweep, f"hydra.sweep.dir={tmp_path}/launch{i}", wait=False,
                      **env) for i in range(2)]
    done = [(p.communicate(timeout=600)[1], p.returncode) for p in started]
    assert [rc for _, rc in done] == [0, 0], [err[-2000:] for err, _ in done]
    experiment = client.get_experiment_by_name("lw" if store == "sqlite" else "lw-two-launches")
    found = client.search_runs([experiment.experiment_id])
    assert len([r for r in found if "seed" not in r.data.params]) == 2  # a parent per launch
    jobs = [r for r in found if "seed" in r.data.params]
    # one run per job, FINISHED: the other launch skipped it, RUNNING or already FINISHED
    assert sorted((r.data.params["seed"], r.info.status) for r in jobs) == [
        ("0", "FINISHED"), ("1", "FINISHED")]
    skipped = [line for err, _ in done for line in err.splitlines() if "skipped, " in line]
    assert len(skipped) == 2 and {("job #0 (" in s, "job #1 (" in s) for s in skipped} == {
        (True, False), (False, True)}, skipped
    assert all(r.info.run_id in "".join(skipped) for r in jobs)


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_killing_a_sweep_ends_its_workers(tmp_path, launcher, lw_cache):
    """Both jobs held at the cache gate with their runs open, each in a process of its own;
    the sweep killed with -9: its workers end too."""
    import psutil

    sweep = ["-m", *JOB, "extraction.cache=true", "seed=0,1", *store_args(tmp_path),
             f"hydra/launcher={launcher}",
             "hydra.launcher.n_jobs=2" if launcher == "joblib" else "hydra.launcher.timeout_min=20"]
    with cache_gate(lw_cache) as gated:
        running = lw_run(tmp_path, *sweep, wait=False, **gated)
        client = None
        try:
            deadline = time.monotonic() + 300  # a guard, not a measurement
            while True:  # both jobs' runs open, the sweep running
                assert running.poll() is None, running.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the jobs never started"
                if (tmp_path / "multirun").is_dir():
                    client = client or client_for(TrackingConfig(uri=f"sqlite:///{tmp_path}/"
                                                                 "mlflow.db"))
                    # the sweep makes its folder before its experiment: wait for both
                    made = client.get_experiment_by_name("lw") is not None
                    jobs = [r for r in runs_of(client) if "seed" in r.data.params] if made \
                        else []
                    if len(jobs) == 2:
                        break
                time.sleep(0.1)
            workers = [psutil.Process(int(r.data.tags["lw.pid"])) for r in jobs]
            running.send_signal(signal.SIGKILL)
            running.communicate(timeout=60)
        finally:
            running.kill()
        # still at the gate: a worker that ends now ends because its sweep did
        deadline = time.monotonic() + 60
        while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
            assert time.monotonic() < deadline, [w.pid for w in workers if w.is_running()]
            time.sleep(0.1)
