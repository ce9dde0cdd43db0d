"""The sweep's Hydra callback: one parent run holds the jobs as children, failures reported by
jobs wherever they ran are gathered, and the sweep exits 1 when any job failed."""


from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lw.errors import LwError
from lw.sweep.names import sweep_name
from lw.sweep.revisions import note_same_weights
from lw.tracking import sweep_state
from lw.tracking.health import KEPT_FILE, fail_run, store_lost
from lw.tracking.resume import Heartbeat, owner_tags, reap
from lw.tracking.runs import PARAM_LIMIT, git_commit, lw_version, source_tags
from lw.tracking.store import _tracking, client_for, experiment_id, runs_link, tracking_uri


def sweep_values(config: DictConfig) -> dict[str, list[str]]:
    """The sweep's varied overrides, key -> values (command line, then the sweeper's params).
    A key on the command line wins over the params, as in Hydra's basic sweeper (a single
    value there ends the key's sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    command_line = list(config.hydra.overrides.task)
    lines = command_line + [f"{key}={value}" for key, value in params.items()]
    varied: dict[str, list[str]] = {}
    given: set[str] = set()
    parser = OverridesParser.create()
    for n, line in enumerate(lines):
        try:  # names only: a sweep form without a list of values (interval) is left out
            override = parser.parse_override(line)
            key = override.get_key_element().lstrip("+~")
            if n < len(command_line):
                given.add(key)
            elif key in given:
                continue
            if override.is_sweep_override():
                varied[key] = [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # noqa: BLE001, S112
            continue
    return varied


@dataclass
class InProcess:
    """What the sweep keeps in its own process, beside what it shares (lw.tracking.sweep_state):
    the jobs that failed here (Hydra's basic launcher runs every job here: the exit status is
    right even when MLflow itself was what failed), and the parent run's heartbeat (lw.resume),
    from on_multirun_start to on_multirun_end."""

    failed: list[str] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)

    def stop_beating(self) -> None:
        while self.heartbeats:
            self.heartbeats.pop().stop()


HERE = InProcess()


# The same, and the jobs skipped as already done, as files in each job's folder: jobs of the
# joblib and submitit launchers run in other processes (or on other machines).
FAILED_FILE, SKIPPED_FILE = "lw_failed.txt", "lw_skipped.txt"


def record_failure(line: str, output_dir: str | Path) -> None:
    HERE.failed.append(line)
    try:
        (Path(output_dir) / FAILED_FILE).write_text(line + "\n")
    except OSError:  # a read-only or full folder: this process still counts it
        pass


def _close_parent_at_exit(config: DictConfig) -> None:
    """A sweep that stopped before on_multirun_end (Hydra calls it only when every job could
    be launched: a read-only sweep folder stops it earlier) leaves its parent FAILED, not
    RUNNING."""
    parent = sweep_state.end().parent
    if parent is None:
        return
    HERE.stop_beating()
    tracking = _tracking(config)
    try:
        client = client_for(tracking)
        error = RuntimeError("the sweep stopped before all its jobs were launched and "
                             "reported (see its output)")
        fail_run(client, parent, error, tracking_uri(tracking), None)
    except Exception:  # noqa: BLE001 - at exit: the store is what failed
        pass


def _job_files(sweep_dir: str, name: str) -> list[str]:
    return sorted(p.read_text().strip() for p in Path(sweep_dir).rglob(name))


class ParentRunCallback(Callback):
    """Under ``-m``, one parent run holds the sweep's jobs as children; the sweep exits 1 when
    any job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lw.job.distributed import current_ranks

        if not current_ranks().is_main:  # one parent per sweep, however many ranks
            return
        sweep_dir = str(config.hydra.sweep.dir)
        for name in (FAILED_FILE, SKIPPED_FILE, KEPT_FILE):  # a re-run into the same sweep folder
            for old in Path(sweep_dir).rglob(name):
                old.unlink()
        varied = sweep_values(config)
        # what the jobs read (lw.tracking.sweep_state), a parent run or not; its workers die
        # with it (lw.resume)
        state = sweep_state.SweepState(models=tuple(varied.get("model", [])),
                                       varies=tuple(varied), pid=os.getpid(),
                                       same_weights=note_same_weights(config, varied))
        sweep_state.begin(state)
        tracking = _tracking(config)
        try:
            client = client_for(tracking)
            experiment = experiment_id(client, tracking)
        except Exception as error:  # noqa: BLE001 - a store that is away stops no job
            if not store_lost(error, tracking_uri(tracking)):
                raise
            print(f"[lw] tracking server {tracking_uri(tracking)} is unreachable: the sweep's "
                  f"jobs compute into {sweep_dir}/<job #>/ without a parent run", flush=True)
            return
        # a killed earlier sweep's parent and children: KILLED, not RUNNING forever
        reap(client, experiment, f"sweep {sweep_dir}")
        run = client.create_run(
            experiment, run_name=sweep_name(varied, Path(sweep_dir).name),
            tags={"lw.sweep_dir": sweep_dir, "lw.git_commit": git_commit(),
                  "lw.version": lw_version(), **owner_tags(), **source_tags(client.tracking_uri),
                  "lw.overrides": " ".join(config.hydra.overrides.task)[:PARAM_LIMIT]})
        sweep_state.begin(dataclasses.replace(state, parent=run.info.run_id))
        print(f"[lw] sweep {run.info.run_id} started; its runs: "
              f"{runs_link(client.tracking_uri, experiment)}", flush=True)
        HERE.heartbeats.append(Heartbeat(client, run.info.run_id).start())
        import atexit

        atexit.register(_close_parent_at_exit, config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lw.job.distributed import current_ranks

        parent = sweep_state.end().parent
        HERE.stop_beating()
        failed_here, HERE.failed[:] = list(HERE.failed), []
        if not current_ranks().is_main:  # rank 0 reports; the others share its exit status
            if failed_here:
                raise SystemExit(1)
            return
        # what the jobs reported, wherever they ran (this process, joblib workers, submitit)
        sweep_dir = str(config.hydra.sweep.dir)
        failed_here = sorted(set(failed_here) | set(_job_files(sweep_dir, FAILED_FILE)))
        skipped = _job_files(sweep_dir, SKIPPED_FILE)
        kept = len(_job_files(sweep_dir, KEPT_FILE))  # computed, waiting for lw.sync
        try:
            if parent is None:
                raise LwError("no parent run")
            client = client_for(_tracking(config))
            children = client.search_runs(
                [client.get_run(parent).info.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=50000)
            # KILLED: its process was killed (scancel, a lost node: hydra_plugins.lw_launchers)
            failed = [r for r in children if r.info.status in ("FAILED", "KILLED")]
            # what the store holds: a run left RUNNING (its server died) is not finished
            unfinished = [r for r in children
                          if r.info.status not in ("FAILED", "KILLED", "FINISHED")]
            finished = len(children) - len(failed) - len(unfinished)
            client.set_tag(parent, "lw.jobs", str(len(children)))
            client.set_tag(parent, "lw.failed_jobs", str(len(failed) + len(unfinished)))
            client.set_tag(parent, "lw.skipped_jobs", str(len(skipped)))
            from lw.sweep.crossmodel import after_sweep

            after_sweep(client, parent, children)
            nothing_done = not finished and not skipped
            client.set_terminated(parent, "FAILED" if nothing_done and (children or failed_here)
                                  else "FINISHED")
        except Exception:  # noqa: BLE001 - tracking is what failed: say what the jobs reported
            for line in failed_here:
                print(f"[lw] FAILED job {line}")
            print(folders_line(sweep_dir, store_failed=True, kept=kept))
            if failed_here or kept:
                raise SystemExit(1) from None
            return
        # jobs that failed before their run was opened (a bad value, a task killed before
        # it opened one) have no child run: their lines ("#<n> <overrides>: ...") say it
        covered = tuple(r.data.tags.get("lw.overrides", "") + ": " for r in failed + unfinished)
        uncovered = [line for line in failed_here
                     if not (covered and line.partition(" ")[2].startswith(covered))]
        total = len(children) + len(uncovered)
        elsewhere = [line for line in skipped if ": RUNNING in run" in line]  # lw.run
        print(f"[lw] sweep done: {finished} of {total} jobs "
              f"finished, {len(skipped) - len(elsewhere)} skipped (already FINISHED), "
              + (f"{len(elsewhere)} left to the launch running them, " if elsewhere else "")
              + f"MLflow parent run {parent} in {tracking_uri(_tracking(config))}; its runs: "
              f"{runs_link(client.tracking_uri, client.get_run(parent).info.experiment_id)}")
        for run in failed + unfinished:
            print(f"[lw] FAILED {run.info.run_name}: "
                  f"{run.data.tags.get('lw.error', run.info.status)}")
        for line in uncovered:
            print(f"[lw] FAILED job {line}")
        print(folders_line(sweep_dir, store_failed=bool(unfinished), kept=kept))
        if failed or failed_here or unfinished or kept:
            raise SystemExit(1)


def folders_line(sweep_dir: str, store_failed: bool, kept: int = 0) -> str:
    """The sweep's last line: where every job's files are, and how many of them wait for
    ``lw.sync`` (jobs that computed while their store was away: KEPT_FILE in their folder)."""
    if kept:
        return (f"[lw] {kept} job{'s' if kept != 1 else ''} of {sweep_dir} computed without "
                f"their tracking server: results kept in {sweep_dir}/<job #>/; "
                f"`python -m lw.sync {sweep_dir}` logs them once the server is back")
    line = f"[lw] every job's files (results/, figures/, config/) are in {sweep_dir}/<job #>/"
    if store_failed:
        line += (f"; the store lacks some: `python -m lw.sync {sweep_dir}` logs those once the "
                 "server is back")
    return line
