"""`python -m lw.sync <job folder>... | <sweep folder>`: put the results a job kept in its
Hydra folder into the tracking store, as the job's run, once.

A job writes everything its run holds to its folder before logging it (``lw_run.json``: run
name, params, tags, the run's id once created; ``config/``, ``results/``, ``figures/``). When
the store failed (a server that died), this logs the folder as the job's run: into the run the
job created if the store has it, else into a new run with the same name, params and tags. The
metric points carry the job's own timestamp, so the run equals the one an uninterrupted job
logs. A job whose server was away from its start has no run id in ``lw_run.json``: it is
logged as a new run (a child of its sweep's parent run when that exists, else a plain run).
A job that already has a FINISHED run with its ``lw.job_hash`` is left alone (its own run, if
left RUNNING, is closed KILLED): syncing twice creates no second run, and a re-run of the
sweep then skips the job.

    python -m lw.sync multirun/2026-12-01/01-02-03            # every job of a sweep
    python -m lw.sync multirun/2026-12-01/01-02-03/0 --uri http://mlflow.example.org:5000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lw.config.tracking import TrackingConfig
from lw.errors import LwError
from lw.tracking import sweep_state
from lw.tracking.health import KEPT_FILE
from lw.tracking.jobdir import RUN_FILE, read_record, upload_job, write_record
from lw.tracking.resume import HASH_TAG
from lw.tracking.store import client_for, experiment_id

SYNCED_TAG = "lw.synced_from"


def job_folders(paths: list[str]) -> list[Path]:
    """The job folders named, or found under the sweep folders named."""
    folders: list[Path] = []
    for path in map(Path, paths):
        if (path / RUN_FILE).exists():
            folders.append(path)
            continue
        found = sorted((p.parent for p in path.rglob(RUN_FILE)),
                       key=lambda p: [int(x) if x.isdigit() else x for x in p.parts])
        if not found:
            raise LwError(f"{path}: no job folder ({RUN_FILE}) in it; give a job folder "
                          "(multirun/<date>/<time>/<n>, outputs/<date>/<time>) or a sweep "
                          "folder")
        folders += found
    return folders


def _run_or_none(client, run_id: str | None):
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:  # another store, or a run deleted since
        return None


def sync_job(folder: Path, uri: str | None = None) -> str:
    """Log one job folder into the store (``uri``, default the one the job used); returns
    what was done, in one line."""
    from mlflow.entities import Param

    record = read_record(folder)
    if "result_tags" not in record or not (folder / "results" / "table.csv").exists():
        raise LwError(f"{folder}: the job did not finish (no results in it); run it again")
    tracking = TrackingConfig(name="sync", uri=uri or record["tracking_uri"],
                              experiment=record["experiment"])
    client = client_for(tracking)
    experiment = experiment_id(client, tracking)
    done = client.search_runs(
        [experiment], filter_string=f"attributes.status = 'FINISHED' and "
        f"tags.`{HASH_TAG}` = '{record['job_hash']}'", max_results=1)
    run = _run_or_none(client, record.get("run_id"))
    if done:
        closed = ""
        if run is not None and run.info.run_id != done[0].info.run_id and \
                run.info.status == "RUNNING":  # the job's own run, left by a dead server
            client.set_tag(run.info.run_id, "lw.killed_by", f"lw.sync: {done[0].info.run_id} "
                           "holds this job's results")
            client.set_terminated(run.info.run_id, "KILLED")
            closed = f" (its own run {run.info.run_id} closed KILLED)"
        (folder / KEPT_FILE).unlink(missing_ok=True)
        return f"{folder}: already FINISHED in run {done[0].info.run_id}, nothing to do{closed}"
    if run is not None and run.info.experiment_id == experiment:
        run_id = run.info.run_id
        if "lw.error" in run.data.tags:  # what failed was the store, not the job
            client.delete_tag(run_id, "lw.error")
    else:
        tags = dict(record["tags"])
        parent = tags.get("mlflow.parentRunId")
        if parent and _run_or_none(client, parent) is None:
            tags.pop("mlflow.parentRunId")
        run_id = client.create_run(experiment, run_name=record["run_name"],
                                   tags=tags).info.run_id
    params = [Param(k, v) for k, v in record["params"].items()]
    for start in range(0, len(params), 100):  # the same values again are accepted
        client.log_batch(run_id, params=params[start:start + 100])
    write_record(folder, {**record, "run_id": run_id, "tracking_uri": tracking.uri})
    upload_job(client, run_id, folder, ("config", "results", "figures"))
    client.set_tag(run_id, SYNCED_TAG, str(folder.resolve()))
    client.set_terminated(run_id, "FINISHED")
    (folder / KEPT_FILE).unlink(missing_ok=True)
    return f"{folder}: logged as run {run_id} (FINISHED) in {tracking.uri}"


def parser() -> argparse.ArgumentParser:
    """The command's flags (also the docs' CLI reference)."""
    parser = argparse.ArgumentParser(prog="python -m lw.sync",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="job folders, or sweep folders")
    parser.add_argument("--uri", help="the store to log to (default: the one each job used)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sweep_state.end()  # its runs are logged as they were, not as children of a sweep here
    failed = 0
    try:
        folders = job_folders(args.folders)
    except LwError as error:
        sys.exit(f"[lw] error: {error}")
    for folder in folders:
        try:
            print(f"[lw] {sync_job(folder, args.uri)}", flush=True)
        except LwError as error:
            failed += 1
            print(f"[lw] error: {error}", file=sys.stderr, flush=True)
        except Exception as error:  # noqa: BLE001 - one line per folder, the others go on
            failed += 1
            print(f"[lw] error: {folder}: {type(error).__name__}: {str(error)[:500]}",
                  file=sys.stderr, flush=True)
    print(f"[lw] sync: {len(folders) - failed} of {len(folders)} job folders in the store")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
