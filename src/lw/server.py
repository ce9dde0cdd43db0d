"""`python -m lw.server` (`make server`): the team's MLflow tracking server, set up the way MLflow
recommends for a team: a SQL backend store, artifacts uploaded to and served by the server, and
MLflow's basic-auth app (logins, per-experiment READ / EDIT / MANAGE permissions).

    export LW_SERVER_ADMIN_PASSWORD=...            # required; MLflow's admin user is `admin`
    export LW_SERVER_DB=postgresql+psycopg://lw@db.example.org/lw   # default: a SQLite file
    export LW_SERVER_ARTIFACTS=/srv/lw/artifacts   # or s3://bucket/lw ...
    python -m lw.server --host 0.0.0.0 --port 5000

The admin password travels only in the server's environment (MLFLOW_AUTH_ADMIN_PASSWORD, which
MLflow's auth app reads when it creates the admin user): never on a command line, in a file or
in a log line. So does the database's: the store URI goes to MLflow in MLFLOW_BACKEND_STORE_URI
(not ``--backend-store-uri``), a PostgreSQL password in PGPASSWORD (libpq's own variable: the
URIs MLflow sees carry none), and the auth app's config (which names the users' database) is
an in-memory file (memfd) the workers read through /proc: nothing is written to disk, nothing
is left in /tmp. lw.server stays the server's parent: it checks that the port is free before it
says anything, prints the URI and the runs link once /health answers, and passes SIGTERM/SIGINT
on.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from lw.errors import LwError

ADMIN = "admin"
# MLflow < 3.5 shipped this admin password in basic_auth.ini; a server must never run with it.
MLFLOW_OLD_DEFAULT_PASSWORD = "password1234"
MIN_PASSWORD = 12  # MLflow's own password policy
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
DRIVERS = {"postgresql": ("psycopg", "psycopg"), "mysql": ("pymysql", "pymysql"),
           "mssql": ("pyodbc", "pyodbc")}


def settings(env: dict[str, str]) -> dict[str, str]:
    """The server's stores from the environment: LW_SERVER_DB (SQLAlchemy URI, default a
    SQLite file in ./mlserver/ of the folder it runs in), LW_SERVER_ARTIFACTS (folder or
    object-store URI), LW_SERVER_AUTH_DB (users and permissions; default beside a SQLite
    store, else the same database: MLflow's auth tables and version table do not collide with
    the tracking ones)."""
    home = Path.cwd() / "mlserver"
    db = env.get("LW_SERVER_DB") or f"sqlite:///{home / 'mlflow.db'}"
    artifacts = env.get("LW_SERVER_ARTIFACTS") or str(home / "artifacts")
    if db.startswith("sqlite:///"):
        default_auth = f"sqlite:///{Path(db[len('sqlite:///'):]).parent / 'auth.db'}"
    else:
        default_auth = db
    return {"db": db, "artifacts": artifacts,
            "auth_db": env.get("LW_SERVER_AUTH_DB") or default_auth}


def admin_password(env: dict[str, str]) -> str:
    password = env.get("LW_SERVER_ADMIN_PASSWORD", "")
    if not password:
        raise LwError("LW_SERVER_ADMIN_PASSWORD is not set: the server's admin user (`admin`) "
                      "needs a password, taken from the environment only, e.g. "
                      "`read -rs LW_SERVER_ADMIN_PASSWORD && export LW_SERVER_ADMIN_PASSWORD`")
    if password == MLFLOW_OLD_DEFAULT_PASSWORD:
        raise LwError("LW_SERVER_ADMIN_PASSWORD is MLflow's old published default admin "
                      "password; choose another")
    if len(password) < MIN_PASSWORD:
        raise LwError(f"LW_SERVER_ADMIN_PASSWORD has {len(password)} characters; MLflow "
                      f"accepts passwords of at least {MIN_PASSWORD}")
    return password


def check_database(uri: str, what: str) -> None:
    """Fail here, naming the URI and the fix, rather than in a worker's traceback."""
    scheme = urlparse(uri).scheme
    if not scheme:
        raise LwError(f"{what}={uri!r} is not a SQLAlchemy URI (postgresql+psycopg://user@host/db,"
                      " sqlite:///path/mlflow.db)")
    dialect, _, driver = scheme.partition("+")
    module, package = DRIVERS.get(dialect, (None, None))
    if dialect == "postgresql" and driver not in ("", "psycopg"):
        module = package = driver
    if module:
        try:
            __import__(module)
        except ImportError:
            raise LwError(f"{what} is a {dialect} database but {package} is not installed: "
                          "pip install '.[server]' (make server does)") from None
    if dialect == "postgresql" and driver == "":
        raise LwError(f"{what}: write postgresql+psycopg://... (psycopg 3, installed by "
                      "'.[server]'); plain postgresql:// asks for psycopg2")
    if dialect == "sqlite":
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def auth_config_text(auth_db: str, default_permission: str) -> str:
    """MLflow's basic_auth.ini for this server: no admin password in it (it comes from the
    environment); users get ``default_permission`` on experiments they were not granted."""
    return ("[mlflow]\n"
            f"default_permission = {default_permission}\n"
            f"database_uri = {auth_db}\n"
            f"admin_username = {ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")


def in_memory_file(name: str, text: str) -> tuple[int, str]:
    """A file that exists only in memory (Linux memfd), and the path by which this process's
    children open it while this process lives: nothing on disk to leave behind."""
    fd = os.memfd_create(name, 0)
    os.write(fd, text.encode())
    os.set_inheritable(fd, True)
    return fd, f"/proc/{os.getpid()}/fd/{fd}"


def without_password(uri: str) -> tuple[str, str | None]:
    """A PostgreSQL URI without its password, and the password (for PGPASSWORD, which libpq
    reads); other URIs as they are."""
    url = urlparse(uri)
    if not url.password or not url.scheme.startswith("postgresql"):
        return uri, None
    return uri.replace(f":{url.password}@", "@", 1), unquote(url.password)


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (another process has it), or None."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror or str(error)
    return None


def local_url(port: int, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://127.0.0.1:{port}"


def _unverified():
    """This machine's own server, reached as 127.0.0.1: its certificate names another host."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def wait_healthy(process: subprocess.Popen, port: int, tls: bool = False,
                 timeout: float = 600) -> bool:
    """Whether the server answered /health before it exited (or ``timeout`` passed)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(f"{local_url(port, tls)}/health", timeout=2,
                                   context=_unverified() if tls else None).close()
            return True
        except OSError:
            time.sleep(0.5)
    return False


def pass_on(signum: int, process: subprocess.Popen) -> None:
    """A signal to lw.server stops the server: its whole process group when lw.server leads
    one (MLflow's CLI does not pass signals on to its uvicorn workers), else MLflow's CLI."""
    signal.signal(signum, signal.SIG_IGN)
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signum)
    elif process.poll() is None:
        process.send_signal(signum)


def experiment_link(uri: str, port: int, password: str, name: str | None,
                    create: bool, tls: bool = False) -> tuple[str, str | None]:
    """The runs-view link of experiment ``name`` (created by the admin when ``create``), and
    its id; without a name or an experiment, the link's pattern."""
    import json
    import urllib.parse
    import urllib.request
    from base64 import b64encode

    from lw.tracking.store import runs_link

    pattern = f"{uri}/#/experiments"  # no such experiment yet: the list of them
    if not name:
        return pattern, None
    api = f"{local_url(port, tls)}/api/2.0/mlflow/experiments"
    auth = {"Authorization": "Basic " + b64encode(f"{ADMIN}:{password}".encode()).decode(),
            "Content-Type": "application/json"}

    def call(path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{api}/{path}", headers=auth, method="POST" if body else "GET",
            data=json.dumps(body).encode() if body else None)
        with urllib.request.urlopen(request, timeout=30,
                                    context=_unverified() if tls else None) as reply:
            return json.loads(reply.read())

    try:
        found = call("get-by-name?" + urllib.parse.urlencode({"experiment_name": name}))
        experiment = found["experiment"]["experiment_id"]
    except OSError:
        if not create:
            return pattern, None
        experiment = call("create", {"name": name, "tags": [
            {"key": "mlflow.experimentKind", "value": "custom_model_development"}]})[
            "experiment_id"]
    return runs_link(uri, str(experiment)), experiment


def team_uri(host: str, port: int, tls: bool = False) -> str:
    """The URI teammates use: the machine's name when the server listens on every interface."""
    name = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    return f"{'https' if tls else 'http'}://{name}:{port}"


def allowed_hosts(names: str) -> str:
    """MLflow's ``--allowed-hosts`` for ``names`` (comma-separated): MLflow compares the whole
    Host header (port included) and drops its defaults (localhost, private IPs) once the flag
    is given, so each name also gets ``name:*``, and the defaults are kept."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    given = [name.strip() for name in names.split(",") if name.strip()]
    ports = [f"{name}:*" for name in given if ":" not in name and "*" not in name]
    return ",".join(dict.fromkeys([*given, *ports, *get_default_allowed_hosts()]))


def server_command(args, stores: dict[str, str]) -> list[str]:
    """``mlflow server``'s command line: no store URI on it (MLFLOW_BACKEND_STORE_URI); its UI
    opens experiments on their runs (lw.server_app)."""
    command = [sys.executable, "-m", "lw.server_app", "server", "--app-name", "basic-auth",
               "--serve-artifacts", "--artifacts-destination", stores["artifacts"],
               "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    if args.allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts(args.allowed_hosts)]
    if args.tls_cert:  # https: basic-auth passwords must not cross the network in clear text
        command += ["--uvicorn-opts", f"--ssl-certfile {shlex.quote(args.tls_cert)} "
                    f"--ssl-keyfile {shlex.quote(args.tls_key)}"]
    return command


def instructions(uri: str, stores: dict[str, str]) -> str:
    return f"""[lw] team tracking server at {uri}
[lw]   backend store: {redact(stores['db'])}; artifacts: {redact(stores['artifacts'])}; \
users: {redact(stores['auth_db'])}
[lw] the admin adds each teammate (password of at least {MIN_PASSWORD} characters):
    curl -u admin -X POST {uri}/api/2.0/mlflow/users/create \\
         -H 'Content-Type: application/json' -d '{{"username": "alice", "password": "..."}}'
[lw] each teammate logs to it:
    export MLFLOW_TRACKING_URI={uri}
    export MLFLOW_TRACKING_USERNAME=alice MLFLOW_TRACKING_PASSWORD=...
    .venv/bin/python -m lw.run -m tracking=server model=smollm2,minilm
[lw] and looks at the runs in a browser (it asks for the login; never put it in the URL):
    {{link}}"""


def redact(uri: str) -> str:
    """A store URI without the password a database URI may carry."""
    url = urlparse(uri)
    if url.password:
        return uri.replace(f":{url.password}@", ":***@", 1)
    return uri


def parser() -> argparse.ArgumentParser:
    """The command's flags (also the docs' CLI reference)."""
    parser = argparse.ArgumentParser(prog="python -m lw.server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (0.0.0.0: every interface, for a team)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--default-permission", default="READ", choices=PERMISSIONS,
                        help="what a user may do on experiments nobody granted them")
    parser.add_argument("--allowed-hosts",
                        help="host names to accept (any port) besides localhost and private "
                             "IPs (MLflow's DNS-rebinding guard), e.g. mlflow.example.org")
    parser.add_argument("--experiment", default="lw",
                        help="the experiment whose runs the ready line links to")
    parser.add_argument("--create-experiment", action="store_true",
                        help="create --experiment (as admin) if it does not exist and print "
                             "its id: permissions can only be granted on an existing one")
    parser.add_argument("--tls-cert", help="serve https with this certificate (PEM; with "
                        "--tls-key), or put a TLS reverse proxy in front (README)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    return parser


def main(argv: list[str] | None = None) -> None:
    flags = parser()
    args = flags.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        flags.error("--tls-cert and --tls-key go together")
    env = dict(os.environ)
    try:
        password = admin_password(env)
        stores = settings(env)
        check_database(stores["db"], "LW_SERVER_DB")
        check_database(stores["auth_db"], "LW_SERVER_AUTH_DB")
        if "://" not in stores["artifacts"]:
            Path(stores["artifacts"]).mkdir(parents=True, exist_ok=True)
    except LwError as error:
        sys.exit(f"[lw] error: {error}")
    busy = port_in_use(args.host, args.port)
    if busy:
        sys.exit(f"[lw] error: port {args.port} on {args.host} is not free ({busy}): another "
                 "process listens there; pick another with --port")
    env.pop("LW_SERVER_ADMIN_PASSWORD")
    db, db_password = without_password(stores["db"])
    auth_db, auth_password = without_password(stores["auth_db"])
    if db_password and auth_password and db_password != auth_password:
        sys.exit("[lw] error: LW_SERVER_DB and LW_SERVER_AUTH_DB carry different PostgreSQL "
                 "passwords; lw.server passes one (PGPASSWORD): use one role, or a "
                 "~/.pgpass file for the other")
    if db_password or auth_password:
        env["PGPASSWORD"] = db_password or auth_password
    fd, auth_path = in_memory_file("basic_auth.ini",
                                   auth_config_text(auth_db, args.default_permission))
    env.update(MLFLOW_BACKEND_STORE_URI=db, MLFLOW_AUTH_CONFIG_PATH=auth_path,
               MLFLOW_AUTH_ADMIN_PASSWORD=password,
               # CSRF key of the login forms: the team's own, or a fresh one per start
               MLFLOW_FLASK_SERVER_SECRET_KEY=env.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
               or secrets.token_hex(32))
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's GenAI job runner (huey consumer processes, each importing all of MLflow) runs
    # nothing lw logs: off unless the team turns it on
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # MLflow's workers leave lock files in the temp folder (db_init_lock-<hash>): theirs is
    # one of lw.server's own, removed when the server stops
    import tempfile

    scratch = tempfile.mkdtemp(prefix="lw-server-")
    env.update(TMPDIR=scratch, TEMP=scratch, TMP=scratch)
    process = subprocess.Popen(server_command(args, stores), env=env, pass_fds=(fd,))
    for each in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the server stops with us
        signal.signal(each, lambda signum, _: pass_on(signum, process))
    tls = bool(args.tls_cert)
    uri = team_uri(args.host, args.port, tls)
    if wait_healthy(process, args.port, tls):
        try:
            link, experiment = experiment_link(uri, args.port, password, args.experiment,
                                               args.create_experiment, tls)
        except OSError as error:
            link, experiment = f"{uri}/#/experiments", None
            print(f"[lw] could not create experiment {args.experiment}: {error}", flush=True)
        print(instructions(uri, stores).replace("{link}", link), flush=True)
        made = f", experiment {args.experiment} has id {experiment}" if experiment else ""
        print(f"[lw] ready: {uri}{made}; runs: {link}", flush=True)
    code = process.wait()
    shutil.rmtree(scratch, ignore_errors=True)
    sys.exit(code)

if __name__ == "__main__":
    main()
