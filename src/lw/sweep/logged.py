"""A logged job, the one way there is (``python -m lw.run`` and ``lw.measure(log=True)``): claim
the job's run (identity, lock, resume: lw.tracking.resume.claim), compute, write the job folder,
upload it, finish; a failure leaves the run FAILED and is raised. A store that is away, at the
start or at the end, interrupts nothing: the job computes into its folder and raises
ResultsKept at its end (``python -m lw.sync`` logs the folder later)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from lw.config.schema import LwConfig
from lw.job.distributed import Ranks, current_ranks, from_main, together
from lw.job.identity import job_identity, job_key, stable_hash
from lw.job.plots import figures_of
from lw.job.results import JobResult
from lw.sweep.callback import SKIPPED_FILE
from lw.sweep.names import RUN_NAME_MAX
from lw.tracking.health import fail_run, results_kept, server_refuses, store_lost
from lw.tracking.jobdir import read_record, save_job_files, upload_job
from lw.tracking.resume import Claim, Heartbeat, claim
from lw.tracking.runs import job_record, start_job_run
from lw.tracking.store import client_for, experiment_id, tracking_uri


def short_name(name: str) -> str:
    """A run name MLflow's SQL stores take (lw.overrides has all of it)."""
    return name if len(name) <= RUN_NAME_MAX else name[:RUN_NAME_MAX - 3] + "..."


def note_skipped(found: Claim, label: str, folder: Path) -> None:
    """The job's line in the sweep's skipped list (the parent's callback counts them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SKIPPED_FILE).write_text(found.line(label))


def logged_job(cfg: DictConfig, job: LwConfig, name: str, overrides: list[str], label: str,
               folder: Path, work: Callable[[], JobResult], ranks: Ranks | None = None,
               in_sweep: bool = False) -> tuple[JobResult | None, Claim | None]:
    """Claim the job's run, run ``work`` (the job's stages), save the job ``folder``, upload it
    and finish the run. Returns (the result, the claim: ``run_id`` the run it is in), or (None,
    the claim: ``found`` the run that has the job already) when it is skipped, said on stderr
    (and in the sweep's skipped list when ``in_sweep``). The claim is rank 0's (None on the
    others).

    Under a multi-process launch every rank calls this; only rank 0 talks to MLflow and writes
    files, and every step ends with the ranks agreeing on how it went (lw.job.distributed)."""
    ranks = ranks or current_ranks()
    name = short_name(name)
    client = found = None
    run_id: str | None = None
    uri = tracking_uri(job.tracking)
    away = None  # why the store is away: the job computes into its folder all the same
    with together("opening the MLflow run", ranks):
        if ranks.is_main:
            identity, key = job_identity(job), job_key(job)
            digest = stable_hash(identity)  # = lw.identity.job_hash(job)
            try:
                client = client_for(job.tracking)
                experiment = experiment_id(client, job.tracking)
                found = claim(client, job.tracking, experiment, digest, label,
                              lambda: start_job_run(client, cfg, name, overrides, digest,
                                                    identity, key, folder, experiment),
                              key, identity)
            except Exception as error:
                if not store_lost(error, uri):
                    raise
                away = server_refuses(uri) or "connection failed"
                found = None
                run_id = offline_record(cfg, name, overrides, digest, identity, key, folder)
                print(f"[lw] {label}: tracking server {uri} is unreachable ({away}); "
                      f"computing into {folder} all the same", file=sys.stderr)
            else:
                run_id = found.run_id
                if run_id is None:
                    print(found.said(label, digest), file=sys.stderr)
                    if in_sweep:
                        note_skipped(found, label, folder)
    if from_main(found.done if found is not None else None, ranks) is not None:
        return None, found
    try:
        # rank 0: the run shows it is alive (lw.resume); a dead server interrupts nothing
        with Heartbeat(client if away is None else None, run_id):
            result = work()
            with together("saving and logging the results", ranks):
                if ranks.is_main:
                    # Every file of the run lands on disk first: a tracking failure loses
                    # nothing, and lw.sync can log the folder later.
                    save_job_files(result, figures_of(result, name),
                                   {"lw.output_dir": str(folder)}, folder)
                    away = away or server_refuses(uri)
                    if away is None:
                        try:
                            upload_job(client, run_id, folder)
                            client.set_terminated(run_id, "FINISHED")
                        except Exception as error:
                            if not store_lost(error, uri):
                                raise
                            away = server_refuses(uri) or "connection failed"
                    if away is not None:
                        raise results_kept(uri, folder, away)
        return result, found
    except BaseException as error:
        if run_id is not None and away is None:
            fail_run(client, run_id, error, uri, folder)
        raise


def offline_record(cfg: DictConfig, name: str, overrides: list[str], digest: str,
                   identity: dict, key: str, folder: Path) -> str | None:
    """The job's record when its store is away: the run it opened before its server went away
    (lw.sync reuses it), else the record of the run it would be (no run id)."""
    record = read_record(folder)
    mine = record.get("job_hash") == digest and \
        record.get("tags", {}).get("lw.pid") == str(os.getpid())
    if mine:
        return record.get("run_id")
    job_record(cfg, name, overrides, digest, identity, key, folder)
    return None
