"""`python -m lw.run`: compose a config with Hydra, run the job, log it to MLflow.

    python -m lw.run model=minilm data=wiki-vital data.n_prompts=32
    python -m lw.run -m model=smollm2,minilm data=wiki-vital,medical-hpo
"""

from __future__ import annotations

import errno
import re
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lw.config import LwConfig, LwError, register_configs, validate
from lw.distributed import current_ranks, from_main, shared_now, together
from lw.identity import job_identity, job_key, stable_hash
from lw.job import compute
from lw.plots import depth_curves, entropy_histograms
from lw.results import JobResult
from lw.resume import Heartbeat, changed_identity, die_with_sweep, job_runs, live_run
from lw.tracking import (
    SKIPPED_FILE,
    ServerWatch,
    client_for,
    experiment_id,
    fail_run,
    record_failure,
    save_job_files,
    start_job_run,
    store_lock,
    tracking_lost,
    tracking_uri,
    upload_job,
)

register_configs()
# Hydra's ${now:} is per process: ranks of one launch must agree on their sweep folder.
# use_cache: Hydra copies the sweep config's resolver cache into every job's config
# (load_sweep_config), so joblib workers and SLURM tasks read the parent's value instead of
# their own clock (which would put their job folders outside the sweep folder it checks).
OmegaConf.register_new_resolver("lw_now", shared_now, use_cache=True, replace=True)
# conf/hydra/launcher/submitit_{slurm,local}.yaml replace the plugin's nodes on purpose
# (same fields, values from the environment); Hydra 1.3 warns that it checks it against it.
warnings.filterwarnings("ignore",
                        message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated")


def figures_of(result: JobResult, title: str) -> dict:
    figures = {"metrics_vs_depth": depth_curves(result.table, title)}
    columns = [c for c in result.per_prompt.columns if c.startswith("prompt_entropy/")]
    if columns:
        column = "prompt_entropy/max" if "prompt_entropy/max" in columns else columns[0]
        figures["prompt_entropy_histograms"] = entropy_histograms(
            result.per_prompt, result.table, column, title)
    for make in result.figures.values():  # the figures metrics add (lw.metrics.registry)
        figures.update(make(result, title))
    return figures


RUN_NAME_MAX = 250  # runs.name is VARCHAR(250) in MLflow's SQL stores (PostgreSQL enforces it)


def run_name(job: LwConfig, overrides: list[str]) -> str:
    """Short enough for the MLflow table's default width: the model, then what the sweep
    varies ("smollm2 wiki-vital p=0.5", "pythia-70m step1000"); outside a sweep, the model,
    the data and a perturbation."""
    import os

    from lw.tracking import SWEEP_VARIES_ENV, short_value

    varies = os.environ.get(SWEEP_VARIES_ENV)
    if varies is None:
        parts = [job.data.name] + ([] if job.perturbation.name == "none"
                                   else [job.perturbation.name])
        return " ".join([job.model.name, *parts])
    keys = [k for k in varies.split(",") if k and k != "model"]
    values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return " ".join([job.model.name] + [short_value(k, values[k]) for k in keys if k in values])


def run_job(cfg: DictConfig) -> JobResult | None:
    """Validate, open the MLflow run, compute, log. A failure marks the run FAILED and re-raises.

    Under a multi-process launch every rank runs this; only rank 0 talks to MLflow and writes
    results, and every step ends with the ranks agreeing on how it went (lw.distributed)."""
    ranks = current_ranks()
    job = validate(cfg)
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    name = job.run_name or run_name(job, overrides)
    if len(name) > RUN_NAME_MAX:  # MLflow's SQL stores refuse longer; lw.overrides has all
        name = name[:RUN_NAME_MAX - 3] + "..."
    client = run_id = done = None
    with together("opening the MLflow run", ranks):
        if ranks.is_main:
            client = client_for(job.tracking)
            identity, key = job_identity(job), job_key(job)
            digest = stable_hash(identity)  # = lw.identity.job_hash(job)
            label = (f"job #{hydra_cfg.job.num} ({name})"
                     if hydra_cfg.mode == RunMode.MULTIRUN else f"job ({name})")
            experiment = experiment_id(client, job.tracking)
            # Resume: a job with a FINISHED run of the same hash is done, one whose run is
            # alive elsewhere (another launch of this sweep) is being done (lw.resume).
            with store_lock(job.tracking) as locked:
                found, live = job_runs(client, experiment, digest, label)
                why = "already FINISHED"
                if found is None and live and not job.tracking.rerun:
                    found, why = live[0], "RUNNING"
                if found is None or job.tracking.rerun:
                    before = changed_identity(client, experiment, key, digest, identity)
                    if before is not None:  # the same job, other inputs or code: say what
                        print(f"[lw] {label}: running again, its identity changed since "
                              f"FINISHED run {before[0]}: {'; '.join(before[1])}",
                              file=sys.stderr)
                    run_id = start_job_run(client, cfg, name, overrides, digest, identity, key,
                                           output_dir, experiment)
            if run_id is not None and not job.tracking.rerun and not locked:
                # no lock (a server): see which launch's run won
                found, why = live_run(client, experiment, digest, label, run_id), "RUNNING"
                if found is not None:
                    client.delete_run(run_id)
                    run_id = None
            if run_id is None:
                done = found.info.run_id
                where = "" if why != "RUNNING" else \
                    f" on {found.data.tags.get('lw.host', '?')} pid {found.data.tags.get('lw.pid')}"
                print(f"[lw] {label}: skipped, {why} in run {done}{where} "
                      f"(lw.job_hash={digest}; tracking.rerun=true runs it again)",
                      file=sys.stderr)
                if hydra_cfg.mode == RunMode.MULTIRUN:
                    (output_dir / SKIPPED_FILE).write_text(f"{label}: {why} in run {done}\n")
    if from_main(done, ranks) is not None:
        return None
    uri = tracking_uri(job.tracking)
    try:
        # rank 0: the run shows it is alive (lw.resume), and a dead server ends the job
        with Heartbeat(client, run_id), ServerWatch(uri if ranks.is_main else ""):
            result = compute(job, ranks)
            with together("saving and logging the results", ranks):
                if ranks.is_main:
                    # Every file of the run lands on disk first: a tracking failure loses
                    # nothing, and lw.sync can log the folder later.
                    save_job_files(result, figures_of(result, name),
                                   {"lw.output_dir": str(output_dir)}, output_dir)
                    upload_job(client, run_id, output_dir)
                    client.set_terminated(run_id, "FINISHED")
        return result
    except BaseException as error:
        if run_id is not None:
            fail_run(client, run_id, error, uri, output_dir)
        raise


# user:password@ (or a token as user@) in a URI anywhere in the command line or config
_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s@,]+@", re.IGNORECASE)
# What a folder lw or Hydra must write to can fail with: the user's to fix.
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
               errno.ENOTDIR, errno.EEXIST)


def _refuse(message: str) -> None:
    print(f"[lw] error: {message}", file=sys.stderr)
    sys.exit(1)


def _writable(folder: str, knob: str) -> None:
    """``folder`` can be made and written to, or one error line naming ``knob``."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        _refuse(f"{knob}={folder}: cannot write there ({error.strerror or error}); choose a "
                "writable folder")


class StartChecks(Callback):
    """Checks made before Hydra writes anything (the job's folder, ``.hydra/``, the sweep's
    multirun.yaml): no credential in a URI, and a folder Hydra can write to."""

    @staticmethod
    def _no_credentials(config: DictConfig) -> None:
        said = [str(config.tracking.get("uri") or ""), *config.hydra.overrides.task]
        if any(_CREDENTIALS.search(text) for text in said):
            _refuse("tracking.uri holds credentials (user:password@); they would be written to "
                    "Hydra's files and MLflow: set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._no_credentials(config)
        _writable(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._no_credentials(config)
        _writable(str(config.hydra.sweep.dir), "hydra.sweep.dir")


def _knob_of(path: str, cfg: DictConfig) -> str:
    """The setting that chose where ``path`` is (for the error line), or ""."""
    tracking = cfg.get("tracking", {})
    places = {"tracking.artifact_location": tracking.get("artifact_location"),
              "tracking.uri": tracking.get("uri"),
              "hydra.runtime.output_dir": HydraConfig.get().runtime.output_dir}
    for knob, given in places.items():
        place = str(given or "").removeprefix("sqlite:///").removeprefix("file://")
        if place and (path == place or path.startswith(place.rstrip("/") + "/")
                      or Path(place).parent == Path(path).parent):
            return f" ({knob}={given})"
    return ""


def _full_disk(error: BaseException | None) -> bool:
    """A full disk anywhere in the chain: writers that name no file (shutil's copy into the
    artifact store, pyarrow) raise ENOSPC without a filename, or only say it in words."""
    while error is not None:
        if isinstance(error, OSError) and (error.errno in (errno.ENOSPC, errno.EDQUOT)
                                           or "No space left on device" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def user_error(error: Exception, cfg: DictConfig) -> Exception:
    """A folder or disk that refuses a write, as an LwError naming the path (else ``error``)."""
    if isinstance(error, OSError) and error.errno in _UNWRITABLE and error.filename:
        path = str(error.filename)
        return LwError(f"cannot write {path}{_knob_of(path, cfg)}: {error.strerror}; choose "
                       "a writable folder with free space")
    if _full_disk(error):
        places = [f"{knob}={value}" for knob, value in (
            ("hydra.runtime.output_dir", HydraConfig.get().runtime.output_dir),
            ("tracking.artifact_location", cfg.tracking.get("artifact_location")),
            ("tracking.uri", cfg.tracking.get("uri"))) if value]
        return LwError(f"No space left on device while writing the job's files or artifacts "
                       f"({', '.join(places)}); free space there or choose other folders")
    return error


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    die_with_sweep()  # a worker of the sweep's process ends with it (lw.resume)
    try:
        run_job(cfg)
    except Exception as caught:
        # a tracking server that went away: one line, naming it and where the results are
        error = tracking_lost(caught, str(cfg.tracking.uri or ""),
                              HydraConfig.get().runtime.output_dir) or user_error(caught, cfg)
        if isinstance(error, LwError):  # the user's to fix: the message says what and how
            job = f" in job #{HydraConfig.get().job.num}" if multirun else ""
            print(f"[lw] error{job}: {error}", file=sys.stderr)
        else:
            traceback.print_exc()
        if not multirun:
            sys.exit(1)
        record_failure(f"#{HydraConfig.get().job.num} "
                       f"{' '.join(HydraConfig.get().overrides.task)}: "
                       f"{type(error).__name__}: {error}", HydraConfig.get().runtime.output_dir)
    # Under -m a failed job is FAILED in MLflow and the sweep goes on; the parent run's
    # callback reports the failures and sets the exit status at the end.


if __name__ == "__main__":
    main()
