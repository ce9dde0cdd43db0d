"""The team's tracking server (`python -m lw.server`) on real parts: a throwaway PostgreSQL 15
cluster made here (run as an unprivileged user: PostgreSQL refuses root), MLflow's server with
the basic-auth app and served artifacts, real HTTP, real sweeps of tiny models."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests

from conftest import PYTHON, cli_env, free_port, wiki_records

ADMIN_PW = "admin-Secret-4711-xyz"
ALICE_PW = "alice-Secret-0815-abc"
BOB_PW = "bob-Secret-2342-qrs"
SECRETS = (ADMIN_PW, ALICE_PW, BOB_PW)
INITDB = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
NOBODY = 65534  # the unprivileged uid PostgreSQL (and the teammate's reader) run as under root


def as_unprivileged(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def private_folder(prefix: str, owner: int | None = None) -> Path:
    """A temp folder outside pytest's (root-only) tree, so that the unprivileged user can own
    one of its own."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if owner is not None and os.geteuid() == 0:
        os.chown(folder, owner, owner)
    return folder


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster on a free port, its socket in a temp folder, no TCP listener;
    yields a function making a database and returning its SQLAlchemy URI."""
    if not INITDB:
        pytest.skip("no PostgreSQL installed (no /usr/lib/postgresql/*/bin/initdb)")
    bin_dir = INITDB[-1].parent
    folder = private_folder("lw-pg-", owner=NOBODY)
    port = free_port()

    def pg(tool: str, *args: str) -> None:
        subprocess.run(as_unprivileged([str(bin_dir / tool), *args]), check=True,
                       capture_output=True, timeout=120)

    pg("initdb", "-D", str(folder / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
       "--no-sync")
    pg("pg_ctl", "-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "-o",
       f"-k {folder} -p {port} -c listen_addresses='' -c fsync=off", "start")

    def database(name: str) -> str:
        pg("createdb", "-h", str(folder), "-p", str(port), "-U", "postgres", name)
        return f"postgresql+psycopg://postgres@/{name}?host={folder}&port={port}"

    yield database
    subprocess.run(as_unprivileged([str(bin_dir / "pg_ctl"), "-D", str(folder / "data"),
                                    "-m", "immediate", "stop"]), capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


class Server:
    """`python -m lw.server` in its own process group, its output in a log file."""

    def __init__(self, db: str, folder: Path, *args: str):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.folder = folder
        self.log = folder / "server.log"
        env = cli_env(LW_SERVER_DB=db, LW_SERVER_ARTIFACTS=str(folder / "artifacts"),
                      LW_SERVER_ADMIN_PASSWORD=ADMIN_PW)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(PYTHON), "-m", "lw.server", "--port", str(self.port), "--workers", "1",
                 *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"lw.server did not answer in 120 s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)

    def api(self, method: str, path: str, auth=None, **kwargs) -> requests.Response:
        return requests.request(method, f"{self.uri}/api/{path}", auth=auth, timeout=30,
                                **kwargs)

    def add_user(self, name: str, password: str) -> None:
        reply = self.api("POST", "2.0/mlflow/users/create", auth=("admin", ADMIN_PW),
                         json={"username": name, "password": password})
        assert reply.status_code == 200, reply.text

    def grant(self, name: str, experiment_id: str, permission: str) -> None:
        reply = self.api("POST", "3.0/mlflow/users/permissions/grant", auth=("admin", ADMIN_PW),
                         json={"username": name, "resource_type": "experiment",
                               "resource_id": experiment_id, "permission": permission})
        assert reply.status_code == 200, reply.text


def sweep(tmp: Path, uri: str, *overrides: str, user=("alice", ALICE_PW),
          wait: bool = True, **extra_env: str):
    """``python -m lw.run`` on tiny models and real text, logging to ``uri`` as ``user``."""
    data = tmp / "prompts.txt"
    if not data.exists():
        data.write_text("".join(r["extract"] + "\n" for r in wiki_records()[:8]))
    multirun = [o for o in overrides if o == "-m"]
    command = [str(PYTHON), "-m", "lw.run", *multirun, "data=local", f"data.path={data}",
               "data.n_prompts=8", "data.max_tokens=24",
               "metrics=[prompt_entropy,dataset_entropy,dip]", "tracking=server",
               *[o for o in overrides if o != "-m"],
               f"hydra.run.dir={tmp}/out", f"hydra.sweep.dir={tmp}/multirun"]
    env = cli_env(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME=user[0],
                  MLFLOW_TRACKING_PASSWORD=user[1], **extra_env)
    if not wait:
        return subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=400)


@pytest.fixture(scope="module")
def team(postgres, tmp_path_factory):
    """A team server on PostgreSQL (users see only what they are granted), admin-made users
    alice and bob, and a 2-job sweep logged by alice; bob is then granted READ on it."""
    folder = private_folder("lw-server-")  # root-only: a teammate cannot read its artifacts
    server = Server(postgres("team"), folder, "--default-permission", "NO_PERMISSIONS")
    server.add_user("alice", ALICE_PW)
    server.add_user("bob", BOB_PW)
    tmp = tmp_path_factory.mktemp("team-sweep")
    done = sweep(tmp, server.uri, "-m", "model=tiny-pythia,tiny-mamba")
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = server.api("GET", "2.0/mlflow/experiments/get-by-name", auth=("alice", ALICE_PW),
                            params={"experiment_name": "lw"}).json()["experiment"]
    server.grant("bob", experiment["experiment_id"], "READ")
    yield {"server": server, "tmp": tmp, "sweep": done, "experiment": experiment}
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


READER = """
import json, sys, tempfile
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name("lw")
out = {"experiment": dict(experiment.tags), "runs": []}
for run in client.search_runs([experiment.experiment_id]):
    keys = list(run.data.metrics)
    histories = {k: [[m.step, m.value] for m in client.get_metric_history(run.info.run_id, k)]
                 for k in keys}
    folder = tempfile.mkdtemp()
    local = client.download_artifacts(run.info.run_id, "", folder)
    out["runs"].append({"id": run.info.run_id, "status": run.info.status,
                        "artifact_uri": run.info.artifact_uri, "tags": run.data.tags,
                        "params": run.data.params, "histories": histories, "artifacts": local})
print(json.dumps(out))
"""


def read_as_teammate(uri: str) -> dict:
    """Everything in experiment `lw`, read over HTTP as bob, in a process of another user
    (under root: uid nobody, who cannot open the server's artifact folder)."""
    env = cli_env(MLFLOW_TRACKING_USERNAME="bob", MLFLOW_TRACKING_PASSWORD=BOB_PW,
                  HOME=str(private_folder("lw-bob-", owner=NOBODY)))
    done = subprocess.run(as_unprivileged([str(PYTHON), "-c", READER, uri]), env=env,
                          capture_output=True, text=True, timeout=300, cwd=env["HOME"])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def teammate_view(team) -> dict:
    return read_as_teammate(team["server"].uri)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


def test_the_server_refuses_to_start_without_a_safe_admin_password(tmp_path):
    for password, says in [(None, "LW_SERVER_ADMIN_PASSWORD is not set"),
                           ("password1234", "old published default"),
                           ("short", "at least 12")]:
        env = cli_env(LW_SERVER_DB=f"sqlite:///{tmp_path}/m.db",
                      LW_SERVER_ARTIFACTS=str(tmp_path / "a"))
        env.pop("LW_SERVER_ADMIN_PASSWORD", None)
        if password:
            env["LW_SERVER_ADMIN_PASSWORD"] = password
        done = subprocess.run([str(PYTHON), "-m", "lw.server", "--port", str(free_port())],
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and says in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr


def test_a_teammate_reads_every_run_point_and_artifact_over_http(teammate_view):
    read = teammate_view
    assert read["experiment"]["mlflow.experimentKind"] == "custom_model_development"
    children = [r for r in read["runs"] if "mlflow.parentRunId" in r["tags"]]
    assert len(read["runs"]) == 3 and len(children) == 2
    assert {r["tags"]["lw.model"] for r in children} == {"tiny-pythia", "tiny-mamba"}
    for run in read["runs"]:
        assert run["status"] == "FINISHED"
        assert run["artifact_uri"].startswith("mlflow-artifacts:/")  # served, not a path
    for run in children:
        # the job's own results folder, written before anything was logged
        on_disk = Path(run["tags"]["lw.output_dir"]) / "results"
        table = pd.read_csv(on_disk / "table.csv")
        n_layers = int(run["tags"]["lw.model.n_layers"])
        columns = [c for c in table.columns if c not in ("layer", "depth_pct")]
        assert "prompt_entropy/max" in columns and "dip/stat" in columns
        for column in columns:
            by_layer = dict(run["histories"][column])
            by_depth = dict(run["histories"][f"depth/{column}"])
            assert sorted(by_layer) == table["layer"].tolist()
            assert sorted(by_depth) == [round(1000 * layer / n_layers)
                                        for layer in table["layer"]]
            for layer, depth, value in zip(sorted(by_layer), sorted(by_depth), table[column],
                                           strict=True):
                assert same(by_layer[layer], value) and same(by_depth[depth], value)
        downloaded = Path(run["artifacts"])
        assert (downloaded / "results" / "table.csv").read_bytes() == \
            (on_disk / "table.csv").read_bytes()
        assert (downloaded / "figures" / "metrics_vs_depth.png").read_bytes()[:4] == b"\x89PNG"
        assert (downloaded / "config" / "config.yaml").exists()


def test_no_password_reaches_params_tags_artifacts_logs_or_files(team, teammate_view):
    read = teammate_view
    logged = json.dumps([[r["params"], r["tags"]] for r in read["runs"]])
    files = [p for r in read["runs"] for p in Path(r["artifacts"]).rglob("*") if p.is_file()]
    files += [p for p in (team["tmp"] / "multirun").rglob("*") if p.is_file()]
    files.append(team["server"].log)
    assert len(files) > 20
    output = team["sweep"].stdout + team["sweep"].stderr
    for secret in SECRETS:
        assert secret not in logged and secret not in output
        assert not [p for p in files if secret.encode() in p.read_bytes()]
    # nor on the server's command line (its environment is private to its user)
    command_line = Path(f"/proc/{team['server'].process.pid}/cmdline").read_bytes()
    assert b"basic-auth" in command_line and ADMIN_PW.encode() not in command_line


def test_requests_without_credentials_get_401_and_a_reader_cannot_write(team):
    server, experiment = team["server"], team["experiment"]["experiment_id"]
    search = {"experiment_ids": [experiment], "max_results": 5}
    assert server.api("POST", "2.0/mlflow/runs/search", json=search).status_code == 401
    assert server.api("POST", "2.0/mlflow/runs/search", auth=("bob", "wrong-password-123"),
                      json=search).status_code == 401
    reply = server.api("POST", "2.0/mlflow/runs/search", auth=("bob", BOB_PW), json=search)
    assert reply.status_code == 200 and len(reply.json()["runs"]) == 3
    run_id = reply.json()["runs"][0]["info"]["run_id"]
    create = server.api("POST", "2.0/mlflow/runs/create", auth=("bob", BOB_PW),
                        json={"experiment_id": experiment})
    log = server.api("POST", "2.0/mlflow/runs/log-metric", auth=("bob", BOB_PW),
                     json={"run_id": run_id, "key": "x", "value": 1.0, "timestamp": 0})
    assert create.status_code == 403 and log.status_code == 403
    # alice made the experiment, so she may write to it
    create = server.api("POST", "2.0/mlflow/runs/create", auth=("alice", ALICE_PW),
                        json={"experiment_id": experiment})
    assert create.status_code == 200
    server.api("POST", "2.0/mlflow/runs/delete", auth=("alice", ALICE_PW),
               json={"run_id": create.json()["run"]["info"]["run_id"]})


def test_a_reader_gets_the_report_files_and_one_line_instead_of_a_traceback(team, tmp_path):
    """bob (READ) runs lw.report on the team server from MLFLOW_TRACKING_URI (no --uri): the
    files are written, logging them is refused in one line naming --no-log, the last line
    names index.html; the runs carry who logged them (mlflow.user)."""
    server = team["server"]
    done = subprocess.run([str(PYTHON), "-m", "lw.report", "--all", "--out", str(tmp_path)],
                          env=cli_env(MLFLOW_TRACKING_URI=server.uri,
                                      MLFLOW_TRACKING_USERNAME="bob",
                                      MLFLOW_TRACKING_PASSWORD=BOB_PW),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].endswith(str(tmp_path / "index.html")), lines
    refused = [line for line in lines if line.startswith("[lw] could not log the report")]
    assert len(refused) == 1 and "--no-log" in refused[0] and "403" in refused[0] + done.stderr
    assert len(pd.read_csv(tmp_path / "summary.csv")) == 2
    reply = server.api("POST", "2.0/mlflow/runs/search", auth=("bob", BOB_PW),
                       json={"experiment_ids": [team["experiment"]["experiment_id"]]})
    users = {t["value"] for r in reply.json()["runs"] for t in r["data"]["tags"]
             if t["key"] == "mlflow.user"}
    assert users == {"alice"}


def test_four_jobs_logging_at_once_lose_no_metric_point(team, tmp_path):
    server = team["server"]
    folders = [tmp_path / f"job{i}" for i in range(4)]

    def job(i: int):
        folders[i].mkdir()
        return sweep(folders[i], server.uri, "model=tiny-pythia" if i % 2 else "model=tiny-mamba",
                     f"seed={i}", "tracking.experiment=lw-concurrent",
                     f"run_name=concurrent {i}")

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(job, range(4)))
    assert all(d.returncode == 0 for d in done), [d.stderr[-2000:] for d in done]
    client_auth = ("alice", ALICE_PW)
    experiment = server.api("GET", "2.0/mlflow/experiments/get-by-name", auth=client_auth,
                            params={"experiment_name": "lw-concurrent"}).json()["experiment"]
    runs = server.api("POST", "2.0/mlflow/runs/search", auth=client_auth,
                      json={"experiment_ids": [experiment["experiment_id"]]}).json()["runs"]
    assert sorted(r["info"]["run_name"] for r in runs) == [f"concurrent {i}" for i in range(4)]
    for run in runs:
        i = int(run["info"]["run_name"].split()[-1])
        table = pd.read_csv(folders[i] / "out" / "results" / "table.csv")
        columns = [c for c in table.columns if c not in ("layer", "depth_pct")]
        for column in columns:
            history = server.api("GET", "2.0/mlflow/metrics/get-history", auth=client_auth,
                                 params={"run_id": run["info"]["run_id"],
                                         "metric_key": column}).json()["metrics"]
            values = {m["step"]: float(m["value"]) for m in history}
            assert sorted(values) == table["layer"].tolist(), column
            assert all(same(values[layer], v) for layer, v in zip(table["layer"], table[column],
                                                                   strict=True))


def test_a_server_stopped_mid_sweep_fails_the_running_job_and_keeps_its_results(
        postgres, tmp_path):
    folder = private_folder("lw-server-")
    server = Server(postgres("stopped"), folder)
    server.add_user("alice", ALICE_PW)
    (tmp_path / "prompts.txt").write_text(
        "".join(r["extract"] + "\n" for r in wiki_records()[:64]))
    running = sweep(tmp_path, server.uri, "-m", "model=tiny-pythia", "seed=0,1",
                    "data.n_prompts=64", "data.max_tokens=96",
                    "metrics=[prompt_entropy,curvature,dataset_entropy,dip]", wait=False)
    # (no MLflow retry knobs here: lw's own defaults, tracking.SERVER_RETRIES, must end it)
    try:
        # stop it once the first job's run is set up (its config is uploaded) and computing
        deadline = time.monotonic() + 300
        while not list((folder / "artifacts").rglob("config/config.yaml")):
            assert running.poll() is None and time.monotonic() < deadline, running.stderr.read()
            time.sleep(0.05)
        server.stop()
        stdout, stderr = running.communicate(timeout=300)
    finally:
        running.kill()
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    assert running.returncode == 1, stderr[-3000:]
    failed = [line for line in stdout.splitlines() if line.startswith("[lw] FAILED job #0")]
    assert failed and server.uri in failed[0], stdout[-3000:] + stderr[-3000:]
    # the job's results were computed and written to its Hydra folder before logging failed
    results = tmp_path / "multirun" / "0" / "results"
    assert pd.read_csv(results / "table.csv")["layer"].tolist() == list(range(7))
    assert (results / "per_prompt.parquet").stat().st_size > 0
