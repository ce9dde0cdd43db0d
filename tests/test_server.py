"""The team's tracking server (`python -m lw.server`) on real parts: a throwaway PostgreSQL 15
cluster made here (run as an unprivileged user: PostgreSQL refuses root), MLflow's server with
the basic-auth app and served artifacts, real HTTP, real sweeps of tiny models."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests

from conftest import (
    PYTHON,
    CliResult,
    cli_env,
    free_port,
    lw_cli,
    wiki_records,
    without_privileges,
)

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

ADMIN_PW = "admin-Secret-4711-xyz"
ALICE_PW = "alice-Secret-0815-abc"
BOB_PW = "bob-Secret-2342-qrs"
SECRETS = (ADMIN_PW, ALICE_PW, BOB_PW)
INITDB = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
NOBODY = 65534  # the unprivileged uid PostgreSQL runs as under root


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
        pytest.skip("no PostgreSQL installed (no /usr/lib/postgresql/*/bin/initdb): "
                    "apt-get install postgresql-15 (or postgresql, on Debian 12)")
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

    def with_password(role: str, password: str, name: str) -> str:
        """A role that must log in with ``password`` (scram) owning a new database."""
        pg("psql", "-h", str(folder), "-p", str(port), "-U", "postgres", "-c",
           f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        pg("createdb", "-h", str(folder), "-p", str(port), "-U", "postgres", "-O", role, name)
        hba = folder / "data" / "pg_hba.conf"
        hba.write_text(f"local all {role} scram-sha-256\n" + hba.read_text())
        pg("pg_ctl", "-D", str(folder / "data"), "reload")
        return f"postgresql+psycopg://{role}:{password}@/{name}?host={folder}&port={port}"

    database.with_password = with_password
    yield database
    subprocess.run(as_unprivileged([str(bin_dir / "pg_ctl"), "-D", str(folder / "data"),
                                    "-m", "immediate", "stop"]), capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


class Server:
    """`python -m lw.server` in its own process group, its output in a log file."""

    def __init__(self, db: str, folder: Path, *args: str, port: int | None = None,
                 tls: tuple[Path, Path] | None = None, **extra_env: str):
        self.port = port or free_port()
        self.uri = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify = str(tls[0]) if tls else True  # the self-signed certificate: its own CA
        if tls:
            args = (*args, "--tls-cert", str(tls[0]), "--tls-key", str(tls[1]))
        self.folder = folder
        self.log = folder / "server.log"
        env = cli_env(LW_SERVER_DB=db, LW_SERVER_ARTIFACTS=str(folder / "artifacts"),
                      LW_SERVER_ADMIN_PASSWORD=ADMIN_PW, **extra_env)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(PYTHON), "-m", "lw.server", "--port", str(self.port), "--workers", "1",
                 *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 600  # MLflow's start takes minutes on a loaded machine
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                context = ssl.create_default_context(cafile=tls[0]) if tls else None
                urllib.request.urlopen(f"{self.uri}/health", timeout=2, context=context)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"lw.server did not answer in 600 s: {self.log.read_text()[-3000:]}")

    def stop(self, how: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, how)
            self.process.wait(timeout=60)

    def api(self, method: str, path: str, auth=None, **kwargs) -> requests.Response:
        return requests.request(method, f"{self.uri}/api/{path}", auth=auth, timeout=30,
                                verify=self.verify, **kwargs)

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
          wait: bool = True, timeout: float = 400, out: str = "out", in_process: bool = False,
          **extra_env: str):
    """``python -m lw.run`` on tiny models and real text, logging to ``uri`` as ``user``: a
    process of its own (the password in its environment only), or with ``in_process`` in
    this one (conftest.lw_cli) where what it logs is all a test reads."""
    data = tmp / "prompts.txt"
    if not data.exists():
        data.write_text("".join(r["extract"] + "\n" for r in wiki_records()[:8]))
    multirun = [o for o in overrides if o == "-m"]
    command = [str(PYTHON), "-m", "lw.run", *multirun, "data=local", f"data.path={data}",
               "data.n_prompts=8", "data.max_tokens=24",
               "metrics=[prompt_entropy,dataset_entropy,dip]", "tracking=server",
               *[o for o in overrides if o != "-m"],
               f"hydra.run.dir={tmp}/{out}", f"hydra.sweep.dir={tmp}/multirun"]
    env = dict(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME=user[0],
               MLFLOW_TRACKING_PASSWORD=user[1], **extra_env)
    if in_process:
        return lw_cli(tmp, *command[3:], env=env, timeout=timeout)
    env = cli_env(**env)
    if not wait:
        return subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def team(postgres, tmp_path_factory):
    """A team server on PostgreSQL (users see only what they are granted), admin-made users
    alice and bob, and a 2-job sweep logged by alice; bob is then granted READ on it."""
    # another user's, mode 700: the teammate's reader (root without capabilities under root)
    # cannot open the artifacts there; the server (root) can
    folder = private_folder("lw-server-", owner=NOBODY)
    server = Server(postgres("team"), folder, "--default-permission", "NO_PERMISSIONS")
    server.add_user("alice", ALICE_PW)
    server.add_user("bob", BOB_PW)
    tmp = tmp_path_factory.mktemp("team-sweep")
    done = sweep(tmp, server.uri, "-m", "model=tiny-pythia,tiny-mamba",
                 "extraction.log_pooled=true")  # what a teammate's lw.crossmodel reads
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = server.api("GET", "2.0/mlflow/experiments/get-by-name", auth=("alice", ALICE_PW),
                            params={"experiment_name": "lw"}).json()["experiment"]
    server.grant("bob", experiment["experiment_id"], "READ")
    yield {"server": server, "tmp": tmp, "sweep": done, "experiment": experiment}
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


READER = """
import json, os, sys, tempfile
from mlflow.tracking import MlflowClient

if len(sys.argv) > 2:  # the server's folder: this process must not open it
    try:
        os.listdir(sys.argv[2])
        sys.exit("the teammate's process can open the server's folder")
    except PermissionError:
        pass
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


def read_as_teammate(uri: str, server_folder: Path) -> dict:
    """Everything in experiment `lw`, read over HTTP as bob, in a process that cannot open the
    server's artifact folder (under root: root without capabilities, which reads the venv
    wherever the clone lies; the folder is another user's)."""
    env = cli_env(MLFLOW_TRACKING_USERNAME="bob", MLFLOW_TRACKING_PASSWORD=BOB_PW,
                  HOME=str(private_folder("lw-bob-")))
    check = [str(server_folder)] if os.geteuid() == 0 else []
    done = subprocess.run(without_privileges([str(PYTHON), "-c", READER, uri, *check]),
                          env=env, capture_output=True, text=True, timeout=300,
                          cwd=env["HOME"])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def teammate_view(team) -> dict:
    return read_as_teammate(team["server"].uri, team["server"].folder)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


def test_a_verified_password_is_remembered_and_a_changed_or_removed_one_is_not(tmp_path):
    """lw.server_app on MLflow's real auth store (SQLite): a second check of the same password
    comes from memory, which holds no password; a wrong, changed or removed one fails."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    from lw.server_app import remember_verified_passwords

    class Store(SqlAlchemyStore):  # the patch on a subclass: MLflow's own class stays as is
        pass

    remember_verified_passwords(Store)
    store = Store()
    store.init_db(f"sqlite:///{tmp_path}/auth.db")
    store.create_user("alice", ALICE_PW)
    verified = Store.authenticate_user.verified
    assert store.authenticate_user("alice", ALICE_PW) and store.authenticate_user("alice", ALICE_PW)
    assert len(verified) == 1
    assert not any(ALICE_PW.encode() in token for token in verified)
    assert not store.authenticate_user("alice", ALICE_PW + "x")
    assert not store.authenticate_user("nobody", ALICE_PW)
    store.update_user("alice", password=ADMIN_PW)
    assert not store.authenticate_user("alice", ALICE_PW)  # the old password: a miss, then no
    assert store.authenticate_user("alice", ADMIN_PW)
    store.delete_user("alice")
    assert not store.authenticate_user("alice", ADMIN_PW)


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


def test_the_server_says_nothing_but_why_when_its_port_is_taken(tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    env = cli_env(LW_SERVER_DB=f"sqlite:///{tmp_path}/m.db", LW_SERVER_ADMIN_PASSWORD=ADMIN_PW,
                  LW_SERVER_ARTIFACTS=str(tmp_path / "a"))
    done = subprocess.run([str(PYTHON), "-m", "lw.server", "--port", str(port)], env=env,
                          capture_output=True, text=True, timeout=60)
    taken.close()
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert f"port {port} on 127.0.0.1 is not free" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


DB_PW = "db-Secret-9876-tuv"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl), as a team would make for a test."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True, timeout=60)
    return cert, key


def test_the_database_password_is_on_no_command_line_in_no_file_or_log_and_tmp_is_left_clean(
        postgres):
    """A PostgreSQL role that logs in with a password: the server works (a user is added and
    logs in), the password is on no process's command line, in no file of the server's
    folders or its temp folder, in no line it prints; it says when it is ready, once; once
    stopped its temp folder is empty."""
    db = postgres.with_password("lwteam", DB_PW, "secrets")
    folder, tmp = private_folder("lw-server-"), private_folder("lw-tmp-")
    cert, key = self_signed(folder)
    server = Server(db, folder, "--create-experiment", "--allowed-hosts", "mlflow.example.org",
                    tls=(cert, key), TMPDIR=str(tmp), TMP=str(tmp), TEMP=str(tmp))
    try:
        server.add_user("alice", ALICE_PW)  # the users' tables: the password got through
        # https: MLflow's client trusts the server's certificate from its own variable
        client = subprocess.run(
            [str(PYTHON), "-c", "import sys; from mlflow.tracking import MlflowClient; "
             "print(MlflowClient(sys.argv[1]).get_experiment_by_name('lw').experiment_id)",
             server.uri], capture_output=True, text=True, timeout=120,
            env=cli_env(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=ALICE_PW,
                        MLFLOW_TRACKING_SERVER_CERT_PATH=str(cert)))
        assert client.returncode == 0, client.stderr[-2000:]
        made = client.stdout.strip()
        plain = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{server.port}/health"], capture_output=True,
                               text=True, timeout=30)
        assert plain.stdout != "200"  # no clear-text http beside it
        # MLflow's DNS-rebinding guard: the team's name on any port, localhost, nothing else
        for host, passes in ((f"mlflow.example.org:{server.port}", True),
                             ("mlflow.example.org", True), (f"127.0.0.1:{server.port}", True),
                             (f"evil.example.com:{server.port}", False)):
            reply = subprocess.run(["curl", "-sk", "-H", f"Host: {host}",
                                    f"https://127.0.0.1:{server.port}/api/2.0/mlflow/"
                                    "experiments/search?max_results=1"],
                                   capture_output=True, text=True, timeout=30)
            assert ("Invalid Host header" not in reply.stdout) == passes, (host, reply.stdout)
        command_lines = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                command_lines.append(cmdline.read_bytes())
            except OSError:  # a process that ended meanwhile
                pass
        assert any(b"lw.server" in c for c in command_lines)
        for secret in (DB_PW, ADMIN_PW):
            assert not [c for c in command_lines if secret.encode() in c]
            files = [p for p in [*folder.rglob("*"), *tmp.rglob("*")] if p.is_file()]
            assert not [p for p in files if secret.encode() in p.read_bytes()]
        deadline = time.monotonic() + 60  # the ready line follows /health
        while "[lw] ready:" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        server.stop()
    log = server.log.read_text()
    ready = [line for line in log.splitlines() if line.startswith("[lw] ready:")]
    assert len(ready) == 1 and server.uri in ready[0], log[-3000:]
    assert f"experiment lw has id {made}" in ready[0]
    assert f"{server.uri}/#/experiments/{made}?workflowType=machine_learning" in ready[0]
    assert DB_PW not in log and ADMIN_PW not in log
    assert list(tmp.iterdir()) == [], list(tmp.iterdir())
    shutil.rmtree(folder, ignore_errors=True)


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
        columns = [c for c in table.columns if c not in ("layer", "depth")]
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
    # nor on the command line of lw.server or the MLflow server it runs (their environment is
    # private to their user)
    import psutil

    server = psutil.Process(team["server"].process.pid)
    command_lines = [" ".join(p.cmdline()) for p in [server, *server.children(recursive=True)]]
    assert any("basic-auth" in line for line in command_lines), command_lines
    assert not [line for line in command_lines if ADMIN_PW in line]


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


def test_a_reader_compares_two_runs_into_a_local_folder_it_is_told(team, tmp_path):
    """bob (READ) compares alice's two runs with lw.crossmodel on the team server: the store
    refuses him a run of his own, so the matrix goes to a local folder the last line names,
    equal to CKA on the pooled vectors the runs logged."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from lw.job import pooled
    from lw.metrics.cka import cka_between

    server = team["server"]
    with alice_login():  # only the two pooled-vectors files, as alice (who logged them)
        client = MlflowClient(server.uri)
        runs = {r.data.tags["lw.model"]: r.info.run_id
                for r in client.search_runs([team["experiment"]["experiment_id"]])
                if "lw.model" in r.data.tags}
        vectors = {m: pooled.load(client.download_artifacts(i, "results/pooled.pt",
                                                            str(tmp_path)))
                   for m, i in runs.items()}
    ids = [runs["tiny-pythia"], runs["tiny-mamba"]]
    done = subprocess.run([str(PYTHON), "-m", "lw.crossmodel", *ids],
                          env=cli_env(MLFLOW_TRACKING_URI=server.uri,
                                      MLFLOW_TRACKING_USERNAME="bob",
                                      MLFLOW_TRACKING_PASSWORD=BOB_PW),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stdout.strip().splitlines()[-1]
    folder = Path(last.rsplit(" in ", 1)[1])
    assert folder.is_dir() and folder.resolve().is_relative_to(tmp_path.resolve()), last
    table = np.genfromtxt(folder / "cross_cka" / "tiny-pythia__tiny-mamba.csv", delimiter=",",
                          skip_header=1)
    (a, hashes_a), (b, hashes_b) = vectors["tiny-pythia"], vectors["tiny-mamba"]
    rows_a, rows_b = pooled.common_rows(hashes_a, hashes_b)
    np.testing.assert_allclose(table[:, 1:], cka_between(a[rows_a], b[rows_b]).numpy(),
                               rtol=1e-6)


class SlowProxy:
    """A TCP proxy on 127.0.0.1 in front of a server that holds ``delay`` seconds each HTTP
    response to a request whose first line names one of ``held`` (every response if None)
    before passing it on: a busy server, as its clients see it, exactly where a test needs it."""

    METHODS = (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD")

    def __init__(self, target_port: int, delay: float, held: tuple[bytes, ...] | None = None):
        self.target, self.delay, self.held, self.delayed = target_port, delay, held, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server is gone: so is this connection
                client.close()
                continue
            asked = threading.Event()  # a held request went up since the last response
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, asked, sink is client),
                                 daemon=True).start()

    def _pump(self, source, sink, asked: threading.Event, down: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if not down:
                    if data.split(b" ", 1)[0] in self.METHODS:  # a request's first chunk
                        line = data.split(b"\r\n", 1)[0]
                        if self.held is None or any(name in line for name in self.held):
                            asked.set()
                elif asked.is_set():
                    asked.clear()
                    self.delayed += 1
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


# Longer than any timeout of lw's own (a probe's connect, LW_REFUSED_PROBE_S: 1 s in this
# test, 5 s by default), far below MLflow's request timeout (180 s, SERVER_RETRIES): a slow
# answer is waited for, whatever its length between.
SLOW_S = 2.0


def test_jobs_logging_at_once_through_a_slow_server_all_finish_and_lose_no_point(
        team, tmp_path):
    """The answers that create, fill and close runs held (a proxy in front of the server): two
    jobs (processes of their own, a transformer and an SSM) log at once; they wait, none
    fails, every point is stored."""
    server = team["server"]
    proxy = SlowProxy(server.port, delay=SLOW_S,
                      held=(b"runs/create", b"runs/log-batch", b"runs/update"))
    folders = [tmp_path / f"job{i}" for i in range(2)]

    def job(i: int):
        folders[i].mkdir()
        return sweep(folders[i], proxy.uri, "model=tiny-pythia" if i % 2 else "model=tiny-mamba",
                     f"seed={i}", "tracking.experiment=lw-concurrent",
                     f"run_name=concurrent {i}", timeout=1800, LW_REFUSED_PROBE_S="1")

    try:
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(job, range(2)))
    finally:
        proxy.close()
    assert all(d.returncode == 0 for d in done), [d.stderr[-2000:] for d in done]
    # each job's held answers: its run's creation, params, points and end (and its parent's)
    assert proxy.delayed >= 2 * 4
    client_auth = ("alice", ALICE_PW)
    experiment = server.api("GET", "2.0/mlflow/experiments/get-by-name", auth=client_auth,
                            params={"experiment_name": "lw-concurrent"}).json()["experiment"]
    runs = server.api("POST", "2.0/mlflow/runs/search", auth=client_auth,
                      json={"experiment_ids": [experiment["experiment_id"]]}).json()["runs"]
    assert sorted(r["info"]["run_name"] for r in runs) == [f"concurrent {i}" for i in range(2)]
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    for run in runs:
        i = int(run["info"]["run_name"].split()[-1])
        table = pd.read_csv(folders[i] / "out" / "results" / "table.csv")
        columns = [c for c in table.columns if c not in ("layer", "depth")]
        for column in columns:
            history = server.api("GET", "2.0/mlflow/metrics/get-history", auth=client_auth,
                                 params={"run_id": run["info"]["run_id"],
                                         "metric_key": column}).json()["metrics"]
            values = {m["step"]: float(m["value"]) for m in history}
            assert sorted(values) == table["layer"].tolist(), column
            assert all(same(values[layer], v) for layer, v in zip(table["layer"], table[column],
                                                                   strict=True))


def sync_as_alice(uri: str, folder: Path) -> CliResult:
    """``python -m lw.sync folder`` logging to ``uri`` as alice, in this process."""
    import contextlib
    import io

    from lw import sync

    out, err, code = io.StringIO(), io.StringIO(), 0
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME="alice",
                      MLFLOW_TRACKING_PASSWORD=ALICE_PW)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            sync.main([str(folder)])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if isinstance(stop.code, str):
            err.write(stop.code)
    finally:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(name, None)
    return CliResult(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def alice_login():
    """MLflow clients made inside log in as alice (its login is read from the environment)."""
    os.environ.update(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=ALICE_PW)
    try:
        yield
    finally:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(name, None)


def run_as_alice(uri: str, artifacts: Path | None = None) -> dict:
    """Every run of experiment `lw` in the store at ``uri``: status, tags, params, metric
    histories and the artifact files (read with alice's login)."""
    from mlflow.tracking import MlflowClient

    with alice_login():
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("lw")
        runs = {}
        for run in client.search_runs([experiment.experiment_id]):
            folder = Path(tempfile.mkdtemp(dir=artifacts))
            local = Path(client.download_artifacts(run.info.run_id, "", str(folder)))
            runs[run.info.run_id] = {
                "status": run.info.status, "name": run.info.run_name, "tags": run.data.tags,
                "params": run.data.params,
                "histories": {k: sorted((m.step, m.value, m.timestamp)
                                        for m in client.get_metric_history(run.info.run_id, k))
                              for k in run.data.metrics},
                "files": {str(p.relative_to(local)): p.read_bytes()
                          for p in local.rglob("*") if p.is_file()}}
        return runs


def finished_as_alice(uri: str, job_hash: str) -> str | None:
    """The run id resume (lw.resume.finished_run) finds for ``job_hash`` in experiment lw."""
    from mlflow.tracking import MlflowClient

    from lw.tracking.resume import finished_run

    os.environ.update(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=ALICE_PW)
    try:
        client = MlflowClient(uri)
        found = finished_run(client, client.get_experiment_by_name("lw").experiment_id,
                             job_hash, "test")
        return found.info.run_id if found else None
    finally:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(name, None)


def test_a_dead_server_is_told_from_a_live_or_slow_one():
    """server_refuses (what a job asks before it uploads, and after a failed request): a
    listening server is alive, a closed port is dead; nothing interrupts the caller."""
    from lw.tracking.health import server_refuses

    listener = socket.create_server(("127.0.0.1", 0))
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    assert server_refuses(uri) is None
    listener.close()
    assert server_refuses(uri)  # "Connection refused"
    assert server_refuses("sqlite:///nowhere.db") is None  # not a server: never dead


def test_a_server_killed_mid_job_stops_nothing_and_lw_sync_logs_it_once(postgres, tmp_path):
    """The job's run exists in the store, the job is frozen (SIGSTOP), the server is killed
    (-9), the job resumes: it computes to the end into its folder, its last line names the
    folder and `python -m lw.sync`, it exits 1; after a restart on the same database and
    artifacts `lw.sync` logs it once into the run it opened, as a FINISHED run equal to an
    uninterrupted one, and a re-run skips it."""
    db = postgres("killed")
    folder = private_folder("lw-server-")
    server = Server(db, folder)
    server.add_user("alice", ALICE_PW)
    (tmp_path / "prompts.txt").write_text(
        "".join(r["extract"] + "\n" for r in wiki_records()[:32]))
    knobs = ("model=tiny-pythia", "data.n_prompts=32", "data.max_tokens=64",
             "metrics=[prompt_entropy,curvature,dataset_entropy,dip]")
    # one retry of a refused request instead of lw's four (a user's own setting wins): the
    # job's end comes seconds after the server's death, not ~15 s
    running = sweep(tmp_path, server.uri, "seed=0", *knobs, wait=False, out="killed",
                    MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    job0 = tmp_path / "killed"
    try:
        deadline = time.monotonic() + 300
        while not json.loads((job0 / "lw_run.json").read_text()
                             if (job0 / "lw_run.json").exists() else "{}").get("run_id"):
            assert running.poll() is None and time.monotonic() < deadline, running.stderr.read()
            time.sleep(0.05)
        os.kill(running.pid, signal.SIGSTOP)  # its run exists; it has not computed
        assert not (job0 / "results" / "table.csv").exists()
        server.stop(signal.SIGKILL)
        os.kill(running.pid, signal.SIGCONT)
        stdout, stderr = running.communicate(timeout=600)
    finally:
        running.kill()
        server.stop(signal.SIGKILL)
    assert running.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-5000:]
    assert stderr.splitlines()[-1] == (
        f"[lw] job: tracking server {server.uri} is unreachable (Connection refused): the "
        f"job's results are kept in {job0}; `python -m lw.sync {job0}` logs them once the "
        "server is back"), stderr[-3000:]
    for name in ("results/table.csv", "results/table.json", "results/per_prompt.parquet",
                 "results/summary.json", "results/model.json", "figures/metrics_vs_depth.png",
                 "figures/prompt_entropy_histograms.png", "config/config.yaml", "lw_run.json",
                 "lw_kept.txt"):
        assert (job0 / name).stat().st_size > 0, name
    created = json.loads((job0 / "lw_run.json").read_text())["run_id"]

    # The server back (same database, artifacts and address): sync the job folder, twice.
    server = Server(db, folder, port=server.port)
    try:
        synced = [sync_as_alice(server.uri, job0) for _ in range(2)]
        assert [s.returncode for s in synced] == [0, 0], [s.stderr[-2000:] for s in synced]
        assert f"logged as run {created} (FINISHED)" in synced[0].stdout, synced[0].stdout
        assert "already FINISHED" in synced[1].stdout, synced[1].stdout
        assert not (job0 / "lw_kept.txt").exists()
        # a re-run sees job #0 as done: resume finds its FINISHED run by its hash
        record = json.loads((job0 / "lw_run.json").read_text())
        assert finished_as_alice(server.uri, record["job_hash"]) == created
        # an uninterrupted run of job #0 logs what lw.sync logged
        reference = sweep(tmp_path, server.uri, "seed=0", *knobs, "tracking.rerun=true",
                          "run_name=reference", in_process=True)
        assert reference.returncode == 0, reference.stderr[-3000:]
        store = run_as_alice(server.uri, tmp_path)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    synced_run = store[created]
    assert synced_run["status"] == "FINISHED" and "lw.error" not in synced_run["tags"]
    fresh, = [r for r in store.values() if r["params"].get("tracking.rerun") == "True"]
    assert len([r for r in store.values() if r["tags"].get("lw.seed") == "0"]) == 2
    assert len(store) == 2  # the job once, its uninterrupted twin
    assert {r["status"] for r in store.values()} == {"FINISHED"}
    own_params = ("tracking.rerun", "tracking.uri", "run_name")  # the reference's own knobs
    assert {k: v for k, v in synced_run["params"].items() if k not in own_params} == \
        {k: v for k, v in fresh["params"].items() if k not in own_params}
    assert synced_run["histories"].keys() == fresh["histories"].keys()
    timing = ("forward_seconds", "prompts_per_second")
    for key, points in fresh["histories"].items():
        if key not in timing:
            assert [(s, v) for s, v, _ in synced_run["histories"][key]] == \
                [(s, v) for s, v, _ in points], key
    assert synced_run["files"].keys() == fresh["files"].keys()
    for name in ("results/table.csv", "results/table.json", "results/model.json"):
        assert synced_run["files"][name] == fresh["files"][name], name
    own = ("lw.synced_from", "lw.host", "lw.pid", "lw.pid_started", "lw.heartbeat",
           "lw.output_dir", "lw.overrides", "mlflow.runName", "mlflow.parentRunId",
           "mlflow.user", "lw.git_commit")
    assert {k: v for k, v in synced_run["tags"].items() if k not in own} == \
        {k: v for k, v in fresh["tags"].items() if k not in own}
