"""Hydra's submitit launchers (SLURM job arrays, or local processes) as lw runs them, holding a
sweep's promises: a job already FINISHED in the store takes no task, every task is waited for, and a
task that ends without a result (``scancel``, time limit, lost node) is reported, not raised.

- Resume before submission: each job's config is composed here, in the launching process, and
  a job with a FINISHED run of its ``lw.job_hash`` is skipped (said on stderr, as ``lw.run``
  says it) and never submitted.
- Waiting: every task of the array is waited for, whatever another task did. A task's end is
  read from its result file, else from ``sacct`` (accounting), else from ``squeue`` (the
  controller keeps ended jobs for ``MinJobAge``); a task neither knows for
  ``LW_SLURM_LOST_AFTER_S`` seconds (default 120) is reported lost. Without accounting
  submitit alone waits on "UNKNOWN" for good.
- A task that ended without a result is listed in the sweep's ``[lw] FAILED`` summary with its
  SLURM state, and its run, left RUNNING by the killed process, is marked KILLED.
- GPUs asked of a partition that has none: one ``[lw] error`` line before anything is
  submitted (sbatch would say "Invalid generic resource"), and the parent run is closed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
from omegaconf import OmegaConf, open_dict

from lw.config.tracking import TrackingConfig
from lw.errors import LwError

LOST_AFTER_ENV = "LW_SLURM_LOST_AFTER_S"
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
         "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT"}


class _Job:
    """One job of the sweep as the launcher sees it: overrides, number, folder, hash, label."""

    def __init__(self, overrides: Sequence[str], num: int, folder: Path, digest: str | None,
                 label: str, tracking: TrackingConfig | None):
        self.overrides, self.num, self.folder = list(overrides), num, folder
        self.digest, self.label, self.tracking = digest, label, tracking


class _ResumingLauncher:
    """What both submitit launchers add to the plugin's (mixed in before it)."""

    def _plan(self, overrides: Sequence[str], num: int) -> _Job:
        from lw.config.schema import validate
        from lw.job.identity import job_hash
        from lw.sweep.names import run_name

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.num = num
            folder = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            del cfg["hydra"]
        try:
            job = validate(cfg)
        except Exception:  # noqa: BLE001 - a bad job is submitted and fails there, said once
            return _Job(overrides, num, folder, None, f"job #{num}", None)
        name = job.run_name or run_name(job, list(overrides))
        return _Job(overrides, num, folder, job_hash(job), f"job #{num} ({name})", job.tracking)

    def _already_done(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs with a FINISHED run of their hash (lw.tracking.resume.claim, looking only);
        said per job, their folders marked."""
        from lw.sweep.logged import note_skipped
        from lw.tracking.resume import claim
        from lw.tracking.store import client_for, experiment_id

        done, clients = [], {}
        for job in jobs:
            if job.digest is None or job.tracking is None or job.tracking.rerun:
                continue
            key = (job.tracking.uri, job.tracking.experiment)
            client = clients[key] = clients.get(key) or client_for(job.tracking)
            try:
                found = claim(client, job.tracking, experiment_id(client, job.tracking),
                              job.digest, job.label, start=None)
            except Exception as error:  # noqa: BLE001 - the job checks again where it runs
                print(f"[lw] {job.label}: could not check the store before submitting it "
                      f"({type(error).__name__}: {error}); submitted", file=sys.stderr)
                continue
            if found.done is not None:
                print(found.said(job.label, job.digest, "; not submitted"), file=sys.stderr)
                note_skipped(found, job.label, job.folder)
                done.append(job)
        return done

    def _check_resources(self) -> None:
        """Overridden where the cluster can be asked (SLURM)."""

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from lw.sweep.callback import record_failure

        jobs = [self._plan(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        returns = {job.num: _returned(job) for job in jobs}
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        try:
            self._check_resources()
            skipped = {job.num for job in self._already_done(jobs)}
        except LwError as error:  # before anything is submitted: one line, the parent closed
            print(f"[lw] error: {error}", file=sys.stderr)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            record_failure(f"sweep {sweep_dir}: nothing submitted: {error}", sweep_dir)
            return list(returns.values())
        todo = [job for job in jobs if job.num not in skipped]
        if todo:
            self._submit_and_wait(todo)
        return list(returns.values())

    def _submit_and_wait(self, jobs: list[_Job]) -> None:
        """The plugin's submission (one array), keeping each job's own number (resume leaves
        gaps), then a wait of lw's own (the plugin's raises at the first task without a
        result, while the array's other tasks still run)."""
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        init_keys = {"max_num_timeout", "submitit_folder"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]}
            if "max_num_timeout" in self.params else {})
        base = set(OmegaConf.structured(plugin.BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                      for k, v in self.params.items() if k not in init_keys})
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        for job in jobs:
            plugin.log.info(f"\t#{job.num} : {' '.join(filter_overrides(job.overrides))}")
        params = [(job.overrides, "hydra.sweep.dir", job.num, f"job_id_for_{job.num}",
                   Singleton.get_state()) for job in jobs]
        tasks = executor.map_array(self, *zip(*params, strict=True))
        self._wait(list(zip(jobs, tasks, strict=True)))

    def _wait(self, pairs: list) -> None:
        from lw.sweep.callback import record_failure

        pending = dict(pairs)
        started = time.monotonic()
        while pending:
            states = self._states([task for _, task in pending.items()])
            for job, task in list(pending.items()):
                ended = self._ended(task, states)
                if ended is None:
                    continue
                del pending[job]
                if ended == "":
                    continue  # a result: the job reported itself (run, lw_failed.txt)
                why = f"{self._what} {task.job_id} ended {ended}"
                if not self._close_run(job, why):  # no run to carry it: a line of its own
                    job.folder.mkdir(parents=True, exist_ok=True)
                    record_failure(f"#{job.num} {' '.join(job.overrides)}: {why} without a "
                                   "result", job.folder)
            if pending:
                time.sleep(min(15.0, max(1.0, (time.monotonic() - started) / 20)))

    _what = "task"

    def _states(self, tasks: list) -> dict[str, str]:
        return {}

    def _ended(self, task, states: dict[str, str]) -> str | None:
        """None while running; "" with a result; else the state it ended in."""
        if task.paths.result_pickle.exists():
            try:
                task.results()
                return ""
            except Exception as error:  # noqa: BLE001 - submitit's own account of the end
                return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        if task.done():
            return task.state
        return None

    def _close_run(self, job: _Job, why: str) -> int:
        """The job's run, left RUNNING by its killed process: KILLED, with why (the sweep's
        summary lists it). Returns how many runs it closed."""
        from lw.tracking.resume import HASH_TAG, mark_killed
        from lw.tracking.store import client_for, experiment_id
        from lw.tracking.sweep_state import current

        if job.digest is None or job.tracking is None:
            return 0
        closed = 0
        try:
            client = client_for(job.tracking)
            parent = current().parent
            query = (f"attributes.status = 'RUNNING' and tags.`{HASH_TAG}` = '{job.digest}'"
                     + (f" and tags.mlflow.parentRunId = '{parent}'" if parent else ""))
            for run in client.search_runs([experiment_id(client, job.tracking)], query):
                client.set_tag(run.info.run_id, "lw.error", why)
                mark_killed(client, run, why)
                closed += 1
        except Exception as error:  # noqa: BLE001 - the failure is listed anyway
            print(f"[lw] could not mark {job.label}'s run KILLED: {error}", file=sys.stderr)
        return closed


def _returned(job: _Job) -> JobReturn:
    """What Hydra's sweeper gets back: the jobs report themselves (runs, lw_failed.txt)."""
    ret = JobReturn(overrides=job.overrides, working_dir=str(job.folder),
                    task_name="lw.run", status=JobStatus.COMPLETED)
    ret.return_value = None
    return ret


def _slurm(command: list[str]) -> str | None:
    """The command's output; "" where SLURM answered that it knows none of the jobs asked
    about (squeue: "Invalid job id specified"); None where it did not answer."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode == 0:
        return done.stdout
    return "" if "Invalid job id" in done.stderr else None


class SlurmLauncher(_ResumingLauncher, plugin.SlurmLauncher):
    _what = "SLURM task"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._unknown_since: dict[str, float] = {}
        self._squeue_answered = True
        self._kill_wait: float | None = None

    def _check_resources(self) -> None:
        gpus = self.params.get("gpus_per_node") or self.params.get("gpus_per_task") or 0
        gres = str(self.params.get("gres") or "")
        if not gpus and "gpu" not in gres:
            return
        partition = self.params.get("partition")
        out = _slurm(["sinfo", "-h", "-o", "%P %G", *(["-p", partition] if partition else [])])
        if out is None:
            return  # sinfo cannot tell: sbatch will
        lines = [line.split(None, 1) for line in out.splitlines() if line.strip()]
        if not partition:  # the default partition is marked with a *
            lines = [line for line in lines if line[0].endswith("*")] or lines
        if not any("gpu" in (line[1] if len(line) > 1 else "") for line in lines):
            where = f"partition {partition}" if partition else "the default partition"
            raise LwError(f"LW_SLURM_GPUS={gpus} (hydra.launcher.gpus_per_node) but {where} "
                          "has no GPUs (sinfo shows no gpu gres); set LW_SLURM_GPUS=0, or "
                          "LW_SLURM_PARTITION to a partition with GPUs")

    def _kill_wait_s(self) -> float:
        """SLURM's KillWait: how long a cancelled task's processes may go on (default 30 s)."""
        if self._kill_wait is None:
            out = _slurm(["scontrol", "show", "config"]) or ""
            self._kill_wait = next((float(line.split("=")[1].split()[0]) for line in
                                    out.splitlines() if line.strip().startswith("KillWait")
                                    and "=" in line), 30.0)
        return self._kill_wait

    def _states(self, tasks: list) -> dict[str, str]:
        """{task id: state} from sacct where it answers, else from squeue."""
        arrays = sorted({task.job_id.split("_")[0] for task in tasks})
        states: dict[str, str] = {}
        out = _slurm(["sacct", "-X", "-n", "--parsable2", "-o", "JobID,State",
                      *[f"-j{a}" for a in arrays]])
        for line in (out or "").splitlines():
            if "|" in line:
                job_id, state = line.split("|", 1)
                states[job_id] = state.split()[0] if state.strip() else ""
        out = _slurm(["squeue", "-h", "-r", "--states=all", "-o", "%i %T",
                      *[f"-j{a}" for a in arrays]])
        self._squeue_answered = out is not None
        for line in (out or "").splitlines():
            if len(line.split()) == 2:
                job_id, state = line.split()
                states.setdefault(job_id, state)
        return states

    def _ended(self, task, states: dict[str, str]) -> str | None:
        if task.paths.result_pickle.exists():
            return super()._ended(task, states)
        state = states.get(task.job_id)
        if state:
            self._unknown_since.pop(task.job_id, None)
            if state not in ENDED:
                return None
            # Wait a while for a result file: after COMPLETED it may lag on a shared file
            # system; after CANCELLED and the like, SLURM sends SIGKILL only KillWait seconds
            # later, and a task that ends its job meanwhile writes one (its run is FINISHED:
            # closing it as KILLED now would race its own process).
            grace = 30.0 if state == "COMPLETED" else self._kill_wait_s() + 5.0
            first = self._unknown_since.setdefault(task.job_id + "/result", time.monotonic())
            if time.monotonic() - first < grace:
                return None
            return state
        if not self._squeue_answered:  # the controller is busy or down: not a lost task
            self._unknown_since.pop(task.job_id, None)
            return None
        lost_after = float(os.environ.get(LOST_AFTER_ENV, "120"))
        first = self._unknown_since.setdefault(task.job_id, time.monotonic())
        if time.monotonic() - first < lost_after:
            return None
        return (f"LOST (neither sacct nor squeue knew it for {lost_after:.0f} s; "
                "see its log in .submitit/)")


class LocalLauncher(_ResumingLauncher, plugin.LocalLauncher):
    _what = "local task"
