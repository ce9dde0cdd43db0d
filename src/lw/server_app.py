"""MLflow's basic-auth server app, whose UI opens lw's experiments on their runs.

MLflow 3.17.2's UI shows an experiment as GenAI (traces) or "Model training" (runs) from the
URL's ``?workflowType=``, else the browser's localStorage ``mlflow.workflowType_v1``, else
GenAI; it ignores the experiment's ``mlflow.experimentKind`` tag and has no server option for
this. So the page this app serves sets that localStorage default to the runs when the browser
has none yet: a fresh browser lands on the runs (experiment and run pages), and a user who
picks GenAI keeps that choice.

    python -m lw.server_app server --app-name basic-auth ...   # what `python -m lw.server` runs
    python -m lw.server_app server --app-name lw-ui ...        # what `make ui` runs (no auth)
"""

from __future__ import annotations

import sys

WORKFLOW_KEY = "mlflow.workflowType_v1"
DEFAULT_VIEW = (f'<script>try{{if(!localStorage.getItem("{WORKFLOW_KEY}"))'
                f'localStorage.setItem("{WORKFLOW_KEY}",JSON.stringify("machine_learning"))}}'
                "catch(e){}</script>")


def index_page() -> str:
    """MLflow's index.html with the default view set before the UI's script runs."""
    from pathlib import Path

    from mlflow.server import app

    html = (Path(app.root_path) / app.static_folder / "index.html").read_text()
    return html.replace("<head>", "<head>" + DEFAULT_VIEW, 1)


def remember_verified_passwords(store_class) -> None:
    """MLflow's auth checks the basic-auth password against its hash (werkzeug's scrypt, tens
    of ms of CPU) several times per request; a job's ~15 requests then cost the server seconds
    of CPU, and in a 500-job soak its two workers spent half their time hashing. A verified
    (user, stored hash, password) is remembered in the worker's memory as an HMAC under a
    per-process key (never the password), so a changed password or a removed user misses."""
    import hashlib
    import hmac
    import secrets

    from mlflow.exceptions import MlflowException
    from werkzeug.security import check_password_hash

    if not all(hasattr(store_class, name) for name in ("_get_user", "authenticate_user")):
        return  # another MLflow: leave its own check alone
    key, verified = secrets.token_bytes(32), set()

    def authenticate_user(self, username: str, password: str, *,
                          use_primary: bool = False) -> bool:
        with self.ManagedSessionMaker(read_only=not use_primary) as session:
            try:
                stored = self._get_user(session, username).password_hash
            except MlflowException:
                return False
        token = hmac.new(key, "\0".join((username, stored, password)).encode(),
                         hashlib.sha256).digest()
        if token in verified:
            return True
        if not check_password_hash(stored, password):
            return False
        if len(verified) > 10_000:
            verified.clear()
        verified.add(token)
        return True

    authenticate_user.verified = verified
    store_class.authenticate_user = authenticate_user


def runs_page_app():
    """MLflow's tracking app (Flask) serving lw's index page (index_page)."""
    from flask import Response
    from mlflow.server import app

    page = index_page()
    app.view_functions["serve"] = lambda: Response(page, mimetype="text/html")
    return app


def create_ui_app():
    """``make ui``'s app (entry point ``lw-ui``): MLflow's own, no auth, with lw's page; under
    uvicorn (MLflow's default server) wrapped as MLflow wraps its own app."""
    from mlflow.server.auth import _MLFLOW_SGI_NAME
    from mlflow.server.fastapi_app import create_fastapi_app

    app = runs_page_app()
    return create_fastapi_app(app) if _MLFLOW_SGI_NAME.get() == "uvicorn" else app


def create_app():
    """MLflow's basic-auth app (mlflow.server.auth.create_app) with lw's index page, and each
    verified password remembered (remember_verified_passwords)."""
    from mlflow.server.auth import create_app as basic_auth_app
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    remember_verified_passwords(SqlAlchemyStore)
    return basic_auth_app(runs_page_app())



def main(argv: list[str]) -> None:
    """`mlflow <argv>`, with ``--app-name basic-auth`` served by ``create_app`` (MLflow finds
    apps by entry point, group ``mlflow.app``; this points its lookup for MLflow's own name
    here instead). ``lw-ui`` is lw's entry point (pyproject.toml): plain ``mlflow server
    --app-name lw-ui`` finds it too."""
    import mlflow.server
    from mlflow.cli import cli

    find_app = mlflow.server._find_app
    mlflow.server._find_app = (lambda name: "lw.server_app:create_app" if name == "basic-auth"
                               else find_app(name))
    cli.main(argv, prog_name="mlflow")


if __name__ == "__main__":
    main(sys.argv[1:])
