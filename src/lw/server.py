"""`python -m lw.server` (`make server`): the team's MLflow tracking server, set up the way MLflow
recommends for a team: a SQL backend store, artifacts uploaded to and served by the server, and
MLflow's basic-auth app (logins, per-experiment READ / EDIT / MANAGE permissions).

    export LW_SERVER_ADMIN_PASSWORD=...            # required; MLflow's admin user is `admin`
    export LW_SERVER_DB=postgresql+psycopg://lw@db.example.org/lw   # default: a SQLite file
    export LW_SERVER_ARTIFACTS=/srv/lw/artifacts   # or s3://bucket/lw ...
    python -m lw.server --host 0.0.0.0 --port 5000

The admin password travels only in the server's environment (MLFLOW_AUTH_ADMIN_PASSWORD, which
MLflow's auth app reads when it creates the admin user): never on a command line, in a file or
in a log line. The auth app's config file holds no password.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from lw.config import LwError

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # lw.models would import torch

ADMIN = "admin"
# MLflow < 3.5 shipped this admin password in basic_auth.ini; a server must never run with it.
MLFLOW_OLD_DEFAULT_PASSWORD = "password1234"
MIN_PASSWORD = 12  # MLflow's own password policy
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
DRIVERS = {"postgresql": ("psycopg", "psycopg"), "mysql": ("pymysql", "pymysql"),
           "mssql": ("pyodbc", "pyodbc")}


def settings(env: dict[str, str]) -> dict[str, str]:
    """The server's stores from the environment: LW_SERVER_DB (SQLAlchemy URI, default a
    SQLite file in <project>/mlserver/), LW_SERVER_ARTIFACTS (folder or object-store URI),
    LW_SERVER_AUTH_DB (users and permissions; default beside a SQLite store, else the same
    database: MLflow's auth tables and version table do not collide with the tracking ones)."""
    home = PROJECT_ROOT / "mlserver"
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


def auth_config_file(auth_db: str, default_permission: str, folder: Path) -> Path:
    """MLflow's basic_auth.ini for this server: no password in it (the admin's comes from the
    environment); users get ``default_permission`` on experiments they were not granted."""
    path = folder / "basic_auth.ini"
    path.write_text("[mlflow]\n"
                    f"default_permission = {default_permission}\n"
                    f"database_uri = {auth_db}\n"
                    f"admin_username = {ADMIN}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    path.chmod(0o600)
    return path


def team_uri(host: str, port: int) -> str:
    """The URI teammates use: the machine's name when the server listens on every interface."""
    name = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    return f"http://{name}:{port}"


def server_command(args, stores: dict[str, str]) -> list[str]:
    # `mlflow server`, its UI opening experiments on their runs (lw.server_app)
    command = [sys.executable, "-m", "lw.server_app", "server", "--app-name", "basic-auth",
               "--backend-store-uri", stores["db"],
               "--serve-artifacts", "--artifacts-destination", stores["artifacts"],
               "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    if args.allowed_hosts:
        command += ["--allowed-hosts", args.allowed_hosts]
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
{experiment_links(stores['db'], uri)}"""


def experiment_links(db: str, uri: str) -> str:
    """The runs view of each experiment already in the store; else where the links come from."""
    from lw.server_app import runs_link

    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(db)
        with engine.connect() as connection:
            rows = connection.execute(sqlalchemy.text(
                "select experiment_id, name from experiments "
                "where lifecycle_stage = 'active' order by experiment_id")).fetchall()
        engine.dispose()
    except Exception:  # noqa: BLE001 - a new store has no tables yet
        rows = []
    if not rows:
        return (f"    {uri}/#/experiments (no experiment yet: each sweep prints the link to its "
                "runs when it starts)")
    return "\n".join(f"    {runs_link(uri, str(i))}   {name}" for i, name in rows)


def redact(uri: str) -> str:
    """A store URI without the password a database URI may carry."""
    url = urlparse(uri)
    if url.password:
        return uri.replace(f":{url.password}@", ":***@", 1)
    return uri


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lw.server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (0.0.0.0: every interface, for a team)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--default-permission", default="READ", choices=PERMISSIONS,
                        help="what a user may do on experiments nobody granted them")
    parser.add_argument("--allowed-hosts",
                        help="Host headers to accept besides localhost and private IPs "
                             "(MLflow's DNS-rebinding guard), e.g. mlflow.example.org")
    args = parser.parse_args(argv)
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
    folder = Path(tempfile.mkdtemp(prefix="lw-server-"))
    env.pop("LW_SERVER_ADMIN_PASSWORD")
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(auth_config_file(stores["auth_db"],
                                                            args.default_permission, folder)),
               MLFLOW_AUTH_ADMIN_PASSWORD=password,
               # CSRF key of the login forms: the team's own, or a fresh one per start
               MLFLOW_FLASK_SERVER_SECRET_KEY=env.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
               or secrets.token_hex(32))
    print(instructions(team_uri(args.host, args.port), stores), flush=True)
    command = server_command(args, stores)
    os.execve(command[0], command, env)  # the server replaces this process: signals reach it


if __name__ == "__main__":
    main()
