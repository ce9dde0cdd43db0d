"""Every environment variable lw reads, sets or passes on, declared once.

The docs' reference page is generated from ``VARIABLES``; tests/test_docs.py checks that every
variable name the code and ``conf/`` use is declared here, and that every variable declared as
lw's own is still used. ``internal`` ones are lw's plumbing between its own processes (or the
tests'): listed so nobody wonders, not meant to be set by hand.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    name: str
    meaning: str
    default: str = ""      # what applies when it is unset ("" : nothing, or the meaning says)
    read_by: str = "lw"    # lw, or the library that reads it (lw may set it for that library)
    group: str = "lw"      # the reference page's section
    internal: bool = False
    secret: bool = False   # never logged, written to a file or put on a command line


VARIABLES: tuple[Variable, ...] = (
    # Tracking: which store, and who you are on a team server
    Variable("MLFLOW_TRACKING_URI", "the tracking store every command uses unless given "
             "`tracking.uri=` / `--uri` (docs: results.md, which store)",
             "./mlruns/mlflow.db (SQLite) under the folder you run in", "lw and MLflow",
             "tracking"),
    Variable("MLFLOW_TRACKING_USERNAME", "your user on a team server (basic auth); also the "
             "`lw.user` tag of your runs", read_by="MLflow (lw reads it for the tag)",
             group="tracking"),
    Variable("MLFLOW_TRACKING_PASSWORD", "your password on a team server; lw refuses one put "
             "into a URI", read_by="MLflow", group="tracking", secret=True),
    Variable("MLFLOW_TRACKING_TOKEN", "a bearer token instead of a password", read_by="MLflow",
             group="tracking", secret=True),
    Variable("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "retries of one request to a server; lw sets "
             "4 unless you did", "4 (lw)", "MLflow", "tracking"),
    Variable("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "back-off between those retries; lw sets 1 "
             "unless you did", "1 (lw)", "MLflow", "tracking"),
    Variable("MLFLOW_HTTP_REQUEST_TIMEOUT", "seconds one request may take; lw sets 180 unless "
             "you did", "180 (lw)", "MLflow", "tracking"),
    Variable("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLflow's download bars; the reading "
             "commands turn them off (one bar per run otherwise)", "false (lw)", "MLflow",
             "tracking"),
    Variable("MLFLOW_DISABLE_TELEMETRY", "MLflow's usage telemetry; lw turns it off (offline, "
             "its thread breaks log requests)", "true (lw)", "MLflow", "tracking"),
    Variable("DO_NOT_TRACK", "the same switch, for the libraries that read this name",
             "true (lw)", "MLflow", "tracking"),
    # The Hugging Face hub
    Variable("HF_TOKEN", "your hub token, for gated models (Llama) and private repositories; "
             "from the environment or `hf auth login`, never on a command line",
             read_by="huggingface_hub", group="hub", secret=True),
    Variable("HF_HUB_OFFLINE", "1: no hub requests; lw then loads only what is in the hub "
             "cache and says so in one line for anything that is not", "0",
             "lw and huggingface_hub", "hub"),
    Variable("HF_ENDPOINT", "a hub mirror; lw probes it (3 s) before loading and names it "
             "when it cannot be reached", "https://huggingface.co", "lw and huggingface_hub",
             "hub"),
    # Caches
    Variable("LW_CACHE_DIR", "lw's cache folder: activation cache (`extraction.cache=true`) "
             "and models lw builds from packaged weights", "~/.cache/lw", group="cache"),
    Variable("LW_CACHE_MAX_GB", "the activation cache's size bound in GiB; least recently "
             "used entries are evicted", "20", group="cache"),
    # Several processes
    Variable("LW_RANK_WAIT_HOURS", "how long the ranks of a multi-process job wait for the "
             "slowest one at an agreement (rank 0 measuring alone), in hours", "72",
             group="processes"),
    Variable("WORLD_SIZE", "the number of processes of one job, set by torchrun / accelerate",
             "1", "lw and torch", "processes", internal=True),
    Variable("SLURM_JOB_ID", "the SLURM job a process runs in; tagged so a requeued task "
             "recognises its own earlier run", read_by="lw (set by SLURM)", group="slurm",
             internal=True),
    Variable("SLURM_ARRAY_JOB_ID", "the SLURM array a task belongs to (as above)",
             read_by="lw (set by SLURM)", group="slurm", internal=True),
    Variable("SLURM_ARRAY_TASK_ID", "the task's index in that array (as above)",
             read_by="lw (set by SLURM)", group="slurm", internal=True),
    Variable("LW_SLURM_PARTITION", "`hydra/launcher=submitit_slurm`: the partition",
             "the cluster's default", "conf/hydra/launcher/submitit_slurm.yaml", "slurm"),
    Variable("LW_SLURM_ACCOUNT", "the account jobs are charged to", "none",
             "conf/hydra/launcher/submitit_slurm.yaml", "slurm"),
    Variable("LW_SLURM_QOS", "the quality of service", "none",
             "conf/hydra/launcher/submitit_slurm.yaml", "slurm"),
    Variable("LW_SLURM_GPUS", "GPUs per job", "1", "conf/hydra/launcher/submitit_slurm.yaml",
             "slurm"),
    Variable("LW_SLURM_CPUS", "CPUs per job", "8", "conf/hydra/launcher/submitit_slurm.yaml",
             "slurm"),
    Variable("LW_SLURM_MEM_GB", "memory per job, GB", "64",
             "conf/hydra/launcher/submitit_slurm.yaml", "slurm"),
    Variable("LW_SLURM_TIME_MIN", "time limit per job, minutes", "240",
             "conf/hydra/launcher/submitit_slurm.yaml", "slurm"),
    Variable("LW_SLURM_LOST_AFTER_S", "seconds a task neither sacct nor squeue knows may "
             "stay unknown before the sweep reports it lost", "120",
             "lw (hydra_plugins.lw_launchers)", "slurm"),
    Variable("LW_SLURM_PARALLEL", "jobs of the array running at once", "64",
             "conf/hydra/launcher/submitit_slurm.yaml", "slurm"),
    # The team server (python -m lw.server, make server)
    Variable("LW_SERVER_ADMIN_PASSWORD", "the server's `admin` password (required; MLflow's "
             "policy: 12 characters or more)", group="server", secret=True),
    Variable("LW_SERVER_DB", "the tracking database (SQLAlchemy URI; PostgreSQL for a team)",
             "sqlite:///./mlserver/mlflow.db", group="server", secret=True),
    Variable("LW_SERVER_AUTH_DB", "users and permissions", "beside a SQLite store, else the "
             "same database as LW_SERVER_DB", group="server", secret=True),
    Variable("LW_SERVER_ARTIFACTS", "where artifacts go (folder or object-store URI)",
             "./mlserver/artifacts", group="server"),
    Variable("MLFLOW_FLASK_SERVER_SECRET_KEY", "the key signing the login forms (CSRF); set it "
             "to one value for a server behind several hosts", "a fresh one per start",
             "MLflow (lw.server passes it on)", "server", secret=True),
    Variable("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "MLflow's GenAI job runner (nothing lw "
             "logs uses it); lw.server and `make ui` turn it off unless set", "false (lw)",
             "MLflow", "server"),
    Variable("PGPASSWORD", "a PostgreSQL password taken out of LW_SERVER_DB's URI, so that it "
             "never reaches a command line", read_by="psycopg (set by lw.server)",
             group="server", internal=True, secret=True),
    Variable("MLFLOW_BACKEND_STORE_URI", "the store, passed by lw.server to its MLflow process "
             "(never on its command line)", read_by="MLflow (set by lw.server)", group="server",
             internal=True, secret=True),
    Variable("MLFLOW_AUTH_CONFIG_PATH", "MLflow's auth settings, written by lw.server to a "
             "file only its process can read", read_by="MLflow (set by lw.server)",
             group="server", internal=True),
    Variable("MLFLOW_AUTH_ADMIN_PASSWORD", "LW_SERVER_ADMIN_PASSWORD, passed on",
             read_by="MLflow (set by lw.server)", group="server", internal=True, secret=True),
    # lw's own plumbing
    Variable("LW_PARENT_RUN_ID", "the sweep's parent run, handed to its jobs",
             group="internal", internal=True),
    Variable("LW_SWEEP_MODELS", "the models a sweep runs (the end-of-sweep comparison)",
             group="internal", internal=True),
    Variable("LW_SWEEP_VARIES", "the config keys a sweep varies (run names)",
             group="internal", internal=True),
    Variable("LW_SWEEP_SAME_WEIGHTS", "the revisions of a sweep's models holding identical "
             "weights (their runs' tag lw.model.same_weights)", group="internal", internal=True),
    Variable("LW_SWEEP_PID", "the sweep's process (a job knows its sweep is alive)",
             group="internal", internal=True),
    Variable("LW_REFUSED_PROBE_S", "how long lw waits for a refused tracking server before "
             "it works offline (tests shorten it)", "5", group="internal", internal=True),
    Variable("LW_TEST_FAULT", "the tests' fault injection into a multi-process job",
             group="internal", internal=True),
)

GROUPS = {"tracking": "Tracking store and team-server credentials",
          "hub": "The Hugging Face hub", "cache": "Caches",
          "processes": "Several processes", "slurm": "SLURM",
          "server": "The team server (`python -m lw.server`)",
          "internal": "lw's own plumbing"}


def by_name() -> dict[str, Variable]:
    return {variable.name: variable for variable in VARIABLES}
