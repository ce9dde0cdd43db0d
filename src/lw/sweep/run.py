"""`python -m lw.run`: compose a config with Hydra, run the job, log it to MLflow.

    python -m lw.run model=minilm data=wiki-vital data.n_prompts=32
    python -m lw.run -m model=smollm2,minilm data=wiki-vital,medical-hpo
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lw.config.schema import register_configs, validate
from lw.errors import LwError
from lw.job.distributed import current_ranks, from_main, shared_now, together
from lw.job.identity import job_identity, job_key, stable_hash
from lw.job.plots import figures_of
from lw.job.results import JobResult
from lw.job.stages import compute
from lw.loading.paths import PROJECT_ROOT
from lw.sweep.callback import SKIPPED_FILE, record_failure
from lw.sweep.checks import user_error
from lw.sweep.names import RUN_NAME_MAX, run_name
from lw.tracking.health import ResultsKept, fail_run, results_kept, server_refuses, store_lost
from lw.tracking.jobdir import read_record, save_job_files, upload_job
from lw.tracking.resume import Heartbeat, changed_identity, die_with_sweep, job_runs, live_run
from lw.tracking.runs import job_record, start_job_run
from lw.tracking.store import client_for, experiment_id, store_lock, tracking_uri

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


def run_job(cfg: DictConfig) -> JobResult | None:
    """Validate, open the MLflow run, compute, log. A failure marks the run FAILED and re-raises.
    A store that is away (at the start, or when the job ends) interrupts nothing: the job
    computes into its folder and raises ResultsKept at its end (``python -m lw.sync``).

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
    uri = tracking_uri(job.tracking)
    away = None  # why the store is away: the job computes into its folder all the same
    with together("opening the MLflow run", ranks):
        if ranks.is_main:
            identity, key = job_identity(job), job_key(job)
            digest = stable_hash(identity)  # = lw.identity.job_hash(job)
            label = (f"job #{hydra_cfg.job.num} ({name})"
                     if hydra_cfg.mode == RunMode.MULTIRUN else f"job ({name})")
            try:
                client = client_for(job.tracking)
                run_id, done = open_run(client, job, cfg, name, overrides, identity, key,
                                        digest, label, output_dir)
            except Exception as error:
                if not store_lost(error, uri):
                    raise
                away = server_refuses(uri) or "connection failed"
                # the run the job opened before its server went away (lw.sync reuses it),
                # else the record of the run it would be
                record = read_record(output_dir)
                mine = record.get("job_hash") == digest and \
                    record.get("tags", {}).get("lw.pid") == str(os.getpid())
                run_id = record.get("run_id") if mine else None
                if not mine:
                    job_record(cfg, name, overrides, digest, identity, key, output_dir)
                print(f"[lw] {label}: tracking server {uri} is unreachable ({away}); "
                      f"computing into {output_dir} all the same", file=sys.stderr)
    if from_main(done, ranks) is not None:
        return None
    try:
        # rank 0: the run shows it is alive (lw.resume); a dead server interrupts nothing
        with Heartbeat(client if away is None else None, run_id):
            result = compute(job, ranks)
            with together("saving and logging the results", ranks):
                if ranks.is_main:
                    # Every file of the run lands on disk first: a tracking failure loses
                    # nothing, and lw.sync can log the folder later.
                    save_job_files(result, figures_of(result, name),
                                   {"lw.output_dir": str(output_dir)}, output_dir)
                    away = away or server_refuses(uri)
                    if away is None:
                        try:
                            upload_job(client, run_id, output_dir)
                            client.set_terminated(run_id, "FINISHED")
                        except Exception as error:
                            if not store_lost(error, uri):
                                raise
                            away = server_refuses(uri) or "connection failed"
                    if away is not None:
                        raise results_kept(uri, output_dir, away)
        return result
    except BaseException as error:
        if run_id is not None and away is None:
            fail_run(client, run_id, error, uri, output_dir)
        raise


def open_run(client, job, cfg: DictConfig, name: str, overrides: list[str], identity: dict,
             key: str, digest: str, label: str, output_dir: Path) -> tuple[str | None, str | None]:
    """The job's run, created (its id, None), or the run that makes it a skip (None, its
    id): resume, a job with a FINISHED run of the same hash is done, one whose run is alive
    elsewhere (another launch of this sweep) is being done (lw.resume)."""
    hydra_cfg = HydraConfig.get()
    run_id = None
    experiment = experiment_id(client, job.tracking)
    with store_lock(job.tracking) as locked:
        found, live = job_runs(client, experiment, digest, label)
        why = "already FINISHED"
        if found is None and live and not job.tracking.rerun:
            found, why = live[0], "RUNNING"
        if found is None or job.tracking.rerun:
            before = changed_identity(client, experiment, key, digest, identity)
            if before is not None:  # the same job, other inputs or code: say what
                print(f"[lw] {label}: running again, its identity changed since "
                      f"FINISHED run {before[0]}: {'; '.join(before[1])}", file=sys.stderr)
            run_id = start_job_run(client, cfg, name, overrides, digest, identity, key,
                                   output_dir, experiment)
    if run_id is not None and not job.tracking.rerun and not locked:
        # no lock (a server): see which launch's run won
        found, why = live_run(client, experiment, digest, label, run_id), "RUNNING"
        if found is not None:
            client.delete_run(run_id)
            run_id = None
    if run_id is not None:
        return run_id, None
    where = "" if why != "RUNNING" else \
        f" on {found.data.tags.get('lw.host', '?')} pid {found.data.tags.get('lw.pid')}"
    print(f"[lw] {label}: skipped, {why} in run {found.info.run_id}{where} "
          f"(lw.job_hash={digest}; tracking.rerun=true runs it again)", file=sys.stderr)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        (output_dir / SKIPPED_FILE).write_text(f"{label}: {why} in run {found.info.run_id}\n")
    return None, found.info.run_id


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    die_with_sweep()  # a worker of the sweep's process ends with it (lw.resume)
    try:
        run_job(cfg)
    except Exception as caught:
        kept = caught if isinstance(caught, ResultsKept) else caught.__cause__
        if isinstance(kept, ResultsKept):
            # computed, its store away: the job's last line says where its results wait
            job = f" #{HydraConfig.get().job.num}" if multirun else ""
            print(f"[lw] job{job}: {kept}", file=sys.stderr, flush=True)
            if not multirun:
                sys.exit(1)
            return  # the sweep counts its folder (KEPT_FILE) and exits non-zero
        error = user_error(caught, cfg)
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
