"""A real MLflow tracking server on 127.0.0.1: a job logs to it, credentials from the environment
never reach params or artifacts, and an unreachable server fails fast and clearly."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON, ROOT, cli_env, free_port, lw_cli, wiki_records

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

SECRET = "s3cret-password-for-test"


def run_lw(tmp: Path, *overrides: str, in_process: bool = True, **env: str):
    """``python -m lw.run`` from ``tmp`` (conftest.lw_cli); a new process where a secret in
    its environment is what the test is about."""
    return lw_cli(tmp, *overrides, f"hydra.run.dir={tmp}/out", f"hydra.sweep.dir={tmp}/multirun",
                  env=env, in_process=in_process, timeout=300)


def serve(command: list[str], port: int) -> subprocess.Popen:
    """An MLflow server started by ``command`` on ``port``, once it answers."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=cli_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # a guard, not a measurement
    while time.monotonic() < deadline:
        assert process.poll() is None, command
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            MlflowClient(uri).search_experiments()
            return process
        except Exception:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"{command[0]} did not answer in 120 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A plain `mlflow server` (no GenAI job runners), as a team might run one."""
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    process = serve([str(PYTHON.parent / "mlflow"), "server", "--host", "127.0.0.1",
                     "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp}/server.db",
                     "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"], port)
    yield f"http://127.0.0.1:{port}", tmp
    process.terminate()
    process.wait(timeout=30)


def test_make_ui_serves_the_page_that_opens_on_the_runs(tmp_path):
    """`make ui`'s command (lw.server_app's lw-ui app on the local store): MLflow's page with
    lw's default view (the runs), and MLflow's API."""
    from lw.server_app import DEFAULT_VIEW

    port = free_port()
    recipe = subprocess.run(["make", "-n", "ui"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    assert "-m lw.server_app server --app-name lw-ui" in recipe
    process = serve([str(PYTHON), "-m", "lw.server_app", "server", "--app-name", "lw-ui",
                     "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                     "--default-artifact-root", str(tmp_path / "artifacts"),
                     "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], port)
    try:
        import urllib.request

        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).read().decode()
        assert DEFAULT_VIEW in page and "<head>" + DEFAULT_VIEW in page
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_job_logs_to_the_server_and_keeps_credentials_out(server, tmp_path):
    uri, _ = server
    data = tmp_path / "prompts.txt"
    data.write_text("".join(r["extract"] + "\n" for r in wiki_records()[:3]))
    done = run_lw(tmp_path, "model=tiny-pythia", "data=local", f"data.path={data}",
                  "data.n_prompts=3", "data.max_tokens=24", "metrics=[prompt_entropy]",
                  "tracking=server", MLFLOW_TRACKING_URI=uri, in_process=False,
                  MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=SECRET)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["tracking.uri"] == uri
    history = client.get_metric_history(run.info.run_id, "prompt_entropy/max")
    assert sorted(m.step for m in history) == list(range(7))
    # Nothing the job wrote or logged holds the password.
    logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
    folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    files = [p for p in folder.rglob("*") if p.is_file()]
    files += [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    assert SECRET not in logged
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]


def tiny_job(tmp: Path) -> list[str]:
    data = tmp / "prompts.txt"
    data.write_text("".join(r["extract"] + "\n" for r in wiki_records()[:3]))
    return ["data=local", f"data.path={data}", "data.n_prompts=3", "data.max_tokens=24",
            "metrics=[prompt_entropy]"]


def test_a_job_without_its_server_computes_and_says_where_its_results_are_kept(tmp_path):
    """Nothing listens at the server's address: the job computes all the same (its folder
    holds every file, lw_run.json without a run id), its last line names the server, the
    folder and `python -m lw.sync`, and it exits 1."""
    uri = f"http://127.0.0.1:{free_port()}"                      # nothing listens there
    done = run_lw(tmp_path, "model=tiny-pythia", *tiny_job(tmp_path), "tracking=server",
                  MLFLOW_TRACKING_URI=uri)
    assert done.returncode == 1
    out = tmp_path / "out"
    assert done.stderr.splitlines()[-1] == (
        f"[lw] job: tracking server {uri} is unreachable (Connection refused): the job's "
        f"results are kept in {out}; `python -m lw.sync {out}` logs them once the server is "
        "back"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    record = json.loads((out / "lw_run.json").read_text())
    assert "run_id" not in record and record["result_tags"] and record["params"]
    for name in ("results/table.csv", "figures/metrics_vs_depth.png", "config/config.yaml"):
        assert (out / name).stat().st_size > 0, name


def test_credentials_in_the_uri_are_refused_without_echoing_them(tmp_path):
    done = run_lw(tmp_path, "model=tiny-pythia", "tracking=server", in_process=False,
                  MLFLOW_TRACKING_URI=f"http://alice:{SECRET}@127.0.0.1:5000")
    assert done.returncode == 1
    assert "MLFLOW_TRACKING_PASSWORD" in done.stderr
    assert SECRET not in done.stderr + done.stdout


def test_a_sweep_without_its_server_computes_every_job_and_lw_sync_logs_them(server, tmp_path):
    """The server is down from the sweep's start (no parent run): both jobs compute into their
    folders, the sweep exits 1 with one last line saying 2 jobs wait for lw.sync; lw.sync
    then logs both, once, as FINISHED plain runs."""
    uri = f"http://127.0.0.1:{free_port()}"
    done = run_lw(tmp_path, "-m", "model=tiny-pythia", "seed=0,1", *tiny_job(tmp_path),
                  "tracking=server", "tracking.experiment=lw-offline", MLFLOW_TRACKING_URI=uri)
    assert done.returncode == 1, done.stderr[-3000:]
    sweep_dir = tmp_path / "multirun"
    assert done.stdout.splitlines()[-1] == (
        f"[lw] 2 jobs of {sweep_dir} computed without their tracking server: results kept in "
        f"{sweep_dir}/<job #>/; `python -m lw.sync {sweep_dir}` logs them once the server is "
        "back"), done.stdout[-3000:]
    assert "FAILED" not in done.stdout and "Traceback" not in done.stderr
    for job in ("0", "1"):
        assert (sweep_dir / job / "results" / "table.csv").exists()
    live, _ = server
    synced = subprocess.run([str(PYTHON), "-m", "lw.sync", str(sweep_dir), "--uri", live],
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert synced.stdout.splitlines()[-1] == "[lw] sync: 2 of 2 job folders in the store"
    client = MlflowClient(live)
    runs = client.search_runs([client.get_experiment_by_name("lw-offline").experiment_id])
    assert sorted(r.data.tags["lw.seed"] for r in runs) == ["0", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert not [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "prompt_entropy/max")) == 7


def local_store(tmp: Path) -> list[str]:
    data = tmp / "prompts.txt"
    data.write_text("".join(r["extract"] + "\n" for r in wiki_records()[:3]))
    return ["model=tiny-pythia", "data=local", f"data.path={data}", "data.n_prompts=3",
            "data.max_tokens=24", "metrics=[prompt_entropy]",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db"]


def test_a_run_whose_config_upload_and_error_file_fail_is_failed_not_running(tmp_path):
    """The artifact store cannot be written (its folder is under a file: fails even as root):
    start_job_run's config upload fails after the run exists, and so does error.txt's; the
    run is still FAILED with lw.error."""
    (tmp_path / "blocker").write_text("a file, not a folder")
    done = run_lw(tmp_path, *local_store(tmp_path),
                  f"tracking.artifact_location=file://{tmp_path}/blocker/art")
    assert done.returncode == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"], done.stderr[-3000:]
    assert "NotADirectoryError" in runs[0].data.tags["lw.error"]
    assert "NotADirectoryError" in (tmp_path / "out" / "error.txt").read_text()


def test_a_sweep_stopped_before_its_end_leaves_its_parent_failed(tmp_path):
    """Hydra cannot make job #0's folder (a file has its name): the sweep stops before
    on_multirun_end; its parent run is FAILED, not RUNNING."""
    (tmp_path / "multirun").mkdir()
    (tmp_path / "multirun" / "0").write_text("in the way")
    # a process of its own: the parent is closed as the interpreter exits (atexit)
    done = run_lw(tmp_path, "-m", *local_store(tmp_path), in_process=False)
    assert done.returncode == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"], done.stderr[-3000:]
    assert "stopped before" in runs[0].data.tags["lw.error"]


def test_run_colours_are_stable_per_model_and_differ_within_a_sweep():
    from lw.tracking.runs import PALETTE, run_colors

    models = ["smollm2", "minilm", "tiny-pythia", "tiny-mamba", "tiny-mamba2", "pythia-70m",
              "pythia-160m", "mamba", "bert", "llama3"]
    colors = run_colors(models)
    assert len(set(colors.values())) == len(PALETTE) == len(models)
    import hashlib

    def slot(model: str) -> str:
        return PALETTE[int(hashlib.sha256(model.encode()).hexdigest(), 16) % len(PALETTE)]

    # a model keeps its hash's colour from sweep to sweep, unless a model of the same sweep
    # earlier in name order took that slot
    for a in models:
        assert run_colors([a])[a] == slot(a)
        for b in models:
            if slot(a) != slot(b):
                assert run_colors([a, b]) == {a: slot(a), b: slot(b)}
            elif a < b:
                pair = run_colors([a, b])
                assert pair[a] == slot(a) and pair[b] != slot(b)
    assert run_colors(models) == run_colors(list(reversed(models)))  # order does not matter
    eleven = run_colors([*models, "pythia-1b"])
    assert len(set(eleven.values())) == len(PALETTE)  # beyond the palette: reuse


def test_sweep_names_say_what_varies():
    from omegaconf import OmegaConf

    from lw.sweep.callback import sweep_values
    from lw.sweep.names import short_value, sweep_name

    config = OmegaConf.create({"hydra": {
        "overrides": {"task": ["model=smollm2,minilm", "data=wiki-vital", "data.n_prompts=16",
                               "perturbation=repetition", "perturbation.p=0,0.5"]},
        "sweeper": {"params": {"model.revision": "step1000,step143000"}}}})
    varied = sweep_values(config)
    assert varied == {"model": ["smollm2", "minilm"], "perturbation.p": ["0", "0.5"],
                      "model.revision": ["step1000", "step143000"]}
    assert sweep_name(varied, "12-00-00") == \
        "sweep smollm2,minilm x p=0,0.5 x step1000,step143000"
    assert short_value("perturbation.p", "0.5") == "p=0.5"
    assert short_value("data", "wiki-vital") == "wiki-vital"
    assert short_value("model.revision", "step1000") == "step1000"
    assert short_value("data.path", "/data/set/prompts.jsonl") == "prompts.jsonl"


def test_a_new_sqlite_store_is_a_copy_of_mlflows_own_empty_store(tmp_path, monkeypatch):
    """lw makes a new SQLite store by copying an empty one it keeps per MLflow version: the
    copy has MLflow's schema at its latest migration, the Default experiment MLflow would have
    made (artifacts under ./mlruns where it is opened), and takes runs."""
    import sqlite3

    import mlflow

    from lw.config.tracking import TrackingConfig
    from lw.tracking.store import client_for

    monkeypatch.setenv("LW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    client_for(TrackingConfig(uri=f"sqlite:///{tmp_path}/first.db"))  # makes the empty one
    empty = tmp_path / "cache" / "mlflow-stores" / f"empty-{mlflow.__version__}.db"
    assert empty.exists()
    ours = client_for(TrackingConfig(uri=f"sqlite:///{tmp_path}/ours.db"))
    MlflowClient(f"sqlite:///{tmp_path}/theirs.db").search_experiments()

    def contents(name: str) -> dict:
        with sqlite3.connect(tmp_path / name) as db:
            tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = "
                                               "'table' ORDER BY name")]
            # each statement's clauses as a set: MLflow's migrations order a table's
            # constraints differently from run to run
            return {"schema": {(kind, name, frozenset((sql or "").replace(",", "\n").split("\n")))
                               for kind, name, sql in db.execute("SELECT type, name, sql FROM "
                                                                 "sqlite_master")},
                    "rows": {t: db.execute(f"SELECT * FROM {t}").fetchall() for t in tables
                             if t != "experiments"},
                    "default": db.execute("SELECT experiment_id, name, artifact_location, "
                                          "lifecycle_stage FROM experiments").fetchall()}

    assert contents("ours.db") == contents("theirs.db")
    assert contents("ours.db")["default"] == [(0, "Default", str(tmp_path / "mlruns" / "0"),
                                               "active")]
    run = ours.create_run(ours.create_experiment("x"))
    ours.log_metric(run.info.run_id, "m", 1.0)
    ours.set_terminated(run.info.run_id)
    assert ours.get_run(run.info.run_id).info.status == "FINISHED"
