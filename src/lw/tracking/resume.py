"""Resume: a job whose results are already in the store is not run again, and a run whose
process died is not left RUNNING.

A job is known by ``lw.identity.job_hash`` (tag ``lw.job_hash``). Before a job runs, rank 0
looks in the experiment for a FINISHED run with the same hash: if there is one, the job is
skipped and says so (``tracking.rerun=true`` runs it anyway).

When is a RUNNING run dead? Every lw run (job or sweep parent) carries its owner's
``lw.host``, ``lw.pid`` and ``lw.pid_started`` (the process's start time, so that a reused pid
is not taken for the owner), and ``lw.heartbeat`` (epoch seconds), refreshed every
``HEARTBEAT_S`` while it runs. A RUNNING run is dead when
- it was started on this host and no process with that pid and start time exists (certain,
  at once: the usual case of a sweep killed on a workstation), or
- its last sign of life (heartbeat, else its start) is older than ``STALE_AFTER_S`` (a run
  from another host: a SLURM node, a teammate's machine; its live owner keeps beating).
A dead run is marked KILLED (tag ``lw.killed_by`` says who found it) before its job is redone;
a sweep's start marks every dead RUNNING run of its experiment KILLED, parents included. A
job whose run is alive elsewhere (another launch of the same sweep) is skipped and said so,
never computed twice (``live_run``); its live run is left alone.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HASH_TAG = "lw.job_hash"
KEY_TAG = "lw.job_key"    # the job as configured (lw.identity.job_key)
HEARTBEAT_TAG = "lw.heartbeat"
SLURM_TAG = "lw.slurm_task"  # a requeued task's earlier run is its own, dead, predecessor
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0   # 10 missed heartbeats: dead, wherever it ran


def _process_started(pid: int) -> float | None:
    """The start time of process ``pid`` (epoch seconds, rounded), or None if there is none."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _slurm_task() -> str | None:
    """This process's SLURM task ("<array job>_<task>", or the job id), if it is one."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def owner_tags() -> dict[str, str]:
    """Who runs this run: host, pid and the pid's start time, its SLURM task if any, and a
    first heartbeat."""
    task = _slurm_task()
    return {"lw.host": socket.gethostname(), "lw.pid": str(os.getpid()),
            "lw.pid_started": str(_process_started(os.getpid())),
            **({SLURM_TAG: task} if task else {}), HEARTBEAT_TAG: str(int(time.time()))}


def is_dead(run, now: float | None = None) -> bool:
    """Whether the owner of RUNNING ``run`` is gone (the rule in this module's docstring)."""
    tags = run.data.tags
    if tags.get("lw.host") == socket.gethostname() and tags.get("lw.pid", "").isdigit():
        return str(_process_started(int(tags["lw.pid"]))) != tags.get("lw.pid_started")
    last = run.info.start_time / 1000
    try:
        last = max(last, float(tags.get(HEARTBEAT_TAG, 0)))
    except ValueError:
        pass
    return (time.time() if now is None else now) - last > STALE_AFTER_S


def mark_killed(client, run, who: str) -> None:
    client.set_tag(run.info.run_id, "lw.killed_by", who)
    client.set_terminated(run.info.run_id, "KILLED")
    print(f"[lw] run {run.info.run_id} ({run.info.run_name}) was left RUNNING by a process "
          f"that died (host {run.data.tags.get('lw.host', '?')}, pid "
          f"{run.data.tags.get('lw.pid', '?')}): marked KILLED", file=sys.stderr)


def _running(client, experiment: str, extra: str = "") -> list:
    return client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'"
                              + extra, max_results=10000)


def reap(client, experiment: str, who: str) -> list:
    """Mark every dead RUNNING run of the experiment KILLED (a sweep's start); returns those
    it marked. One it may not change (another user's, on a server) is left as it is."""
    dead = []
    for run in _running(client, experiment):
        if is_dead(run):
            try:
                mark_killed(client, run, who)
                dead.append(run)
            except Exception as error:  # noqa: BLE001 - the sweep goes on without it
                print(f"[lw] could not mark dead run {run.info.run_id} KILLED: {error}",
                      file=sys.stderr)
    return dead


def job_runs(client, experiment: str, job_hash: str, who: str) -> tuple:
    """The runs of the job with ``job_hash``, from one search: (its latest FINISHED run or
    None, its live RUNNING runs oldest first). Dead RUNNING runs are marked KILLED on the way
    (the job is about to be redone). One search, not one per status: on a busy server each
    request a job makes before its run is time the job waits."""
    runs = client.search_runs([experiment], filter_string=f"tags.`{HASH_TAG}` = '{job_hash}'",
                              order_by=["attributes.start_time DESC"], max_results=10000)
    finished = next((run for run in runs if run.info.status == "FINISHED"), None)
    return finished, _live(client, [r for r in runs if r.info.status == "RUNNING"], who)


def finished_run(client, experiment: str, job_hash: str, who: str):
    """The latest FINISHED run of the job with ``job_hash``, or None (see ``job_runs``)."""
    return job_runs(client, experiment, job_hash, who)[0]


def changed_identity(client, experiment: str, job_key: str, job_hash: str,
                     identity: dict) -> tuple[str, list[str]] | None:
    """The latest FINISHED run of the same job as configured (tag ``lw.job_key``) whose hash
    differs, and the identity fields that changed since (from its ``config/identity.json``);
    None when there is none."""
    import json
    import tempfile

    from lw.job.identity import identity_diff

    runs = client.search_runs([experiment], filter_string="attributes.status = 'FINISHED' and "
                              f"tags.`{KEY_TAG}` = '{job_key}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or runs[0].data.tags.get(HASH_TAG) == job_hash:
        return None
    run = runs[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run.info.run_id, "config/identity.json", tmp)
            with open(path) as f:
                old = json.load(f)
    except Exception:  # noqa: BLE001 - an older run without it: the hashes still differ
        return run.info.run_id, [f"{HASH_TAG}: {run.data.tags.get(HASH_TAG)} -> {job_hash} "
                                 "(that run has no config/identity.json)"]
    return run.info.run_id, identity_diff(old, identity)


def live_run(client, experiment: str, job_hash: str, who: str, mine: str):
    """After creating run ``mine`` for the job: the run that owns the job, the oldest RUNNING
    one whose owner is alive (dead ones are marked KILLED on the way), or None when that is
    ``mine``: it may go on.

    Two launches of one sweep (teammates, or a re-run while the first still runs) must not
    compute a job twice. On a local SQLite store the check and the run's creation happen
    under one lock (lw.tracking.store_lock), so only one launch creates a run. On a server
    there is no lock: each launch creates its run, then the oldest live one (start time,
    then run id) goes on and the others step aside; only two runs created within the same
    milliseconds, in an order their clocks disagree on, could both go on."""
    live = _live(client, _running(client, experiment, f" and tags.`{HASH_TAG}` = '{job_hash}'"),
                 who, mine)
    return None if not live or live[0].info.run_id == mine else live[0]


def _live(client, running: list, who: str, mine: str | None = None) -> list:
    """Of a job's RUNNING runs, those whose owner is alive, oldest first (start time, then run
    id); the dead ones, and a requeued SLURM task's own earlier run, are marked KILLED."""
    live = []
    for run in running:
        own_predecessor = _slurm_task() is not None and \
            run.data.tags.get(SLURM_TAG) == _slurm_task()
        if run.info.run_id != mine and (own_predecessor or is_dead(run)):
            mark_killed(client, run, who)
        else:
            live.append(run)
    return sorted(live, key=lambda run: (run.info.start_time, run.info.run_id))


@dataclass
class Claim:
    """What ``claim`` found: ``run_id``, the run this process computes the job in; or
    ``found``, the run that already has it, and ``why`` ("already FINISHED", "RUNNING")."""

    run_id: str | None = None
    found: Any = None
    why: str = ""

    @property
    def done(self) -> str | None:
        """The run id of the run that has the job, when it is not this process's."""
        return None if self.found is None else self.found.info.run_id

    def said(self, label: str, digest: str, then: str = "") -> str:
        """The one line a skipped job is told with (lw.run, the launchers, lw.measure)."""
        tags = self.found.data.tags
        where = "" if self.why != "RUNNING" else \
            f" on {tags.get('lw.host', '?')} pid {tags.get('lw.pid')}"
        return (f"[lw] {label}: skipped, {self.why} in run {self.done}{where} "
                f"(lw.job_hash={digest}; tracking.rerun=true runs it again){then}")

    def line(self, label: str) -> str:
        """The job's line in the sweep's skipped list (lw_skipped.txt)."""
        return f"{label}: {self.why} in run {self.done}\n"


def claim(client, tracking, experiment: str, digest: str, label: str,
          start: Callable[[], str] | None, key: str = "", identity: dict | None = None) -> Claim:
    """Who computes the job with ``lw.job_hash`` ``digest``: a FINISHED run of it means nobody
    (it is done), a live RUNNING one elsewhere means that run's launch (it is being done);
    otherwise ``start()`` creates this process's run, after saying what changed in the job's
    identity (``key``, ``identity``) since its latest FINISHED run. ``tracking.rerun`` computes
    it whatever the store holds. ``start=None`` only looks (a launcher before submitting: a
    FINISHED run, no lock; the job claims again where it runs).

    On a local store the look and the run's creation happen under one lock (store_lock); on a
    server, where there is none, the run created is checked against the others (``live_run``)
    and deleted again when an older live one has the job."""
    from lw.tracking.store import store_lock

    if start is None:
        if tracking.rerun:
            return Claim()
        found = finished_run(client, experiment, digest, label)
        return Claim() if found is None else Claim(None, found, "already FINISHED")
    with store_lock(tracking) as locked:
        found, live = job_runs(client, experiment, digest, label)
        why = "already FINISHED"
        if found is None and live and not tracking.rerun:
            found, why = live[0], "RUNNING"
        if found is not None and not tracking.rerun:
            return Claim(None, found, why)
        if key and identity is not None:
            before = changed_identity(client, experiment, key, digest, identity)
            if before is not None:  # the same job, other inputs or code: say what
                print(f"[lw] {label}: running again, its identity changed since "
                      f"FINISHED run {before[0]}: {'; '.join(before[1])}", file=sys.stderr)
        run_id = start()
    if not tracking.rerun and not locked:  # no lock (a server): see which launch's run won
        found = live_run(client, experiment, digest, label, run_id)
        if found is not None:
            client.delete_run(run_id)
            return Claim(None, found, "RUNNING")
    return Claim(run_id)


def die_with_sweep() -> None:
    """In a process the sweep's own process started for a job (a joblib worker; a submitit
    local job, through submitit's controller), be killed when that process dies: a
    ``kill -9`` of the sweep must not leave workers computing, and holding memory, for
    nobody. A direct child asks Linux for it (PR_SET_PDEATHSIG); a grandchild watches the
    sweep's pid from a daemon thread. A process the sweep did not start here (a SLURM task)
    is left alone."""
    import signal

    import psutil

    from lw.tracking.sweep_state import current

    sweep_pid = current().pid
    if sweep_pid is None or sweep_pid == os.getpid():
        return
    try:
        sweep = psutil.Process(sweep_pid)
        if sweep not in psutil.Process().parents():
            return
    except psutil.Error:
        return
    if os.getppid() == sweep.pid and sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL,
                                                    0, 0, 0) == 0:
            if os.getppid() != sweep.pid:  # it died before the line above
                os.kill(os.getpid(), signal.SIGKILL)
            return

    def alive() -> bool:  # pid and start time (a reused pid is not the sweep), no zombie
        try:
            return sweep.is_running() and sweep.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="lw-sweep-watch").start()


class Heartbeat:
    """Refresh ``lw.heartbeat`` on a run every ``every`` seconds from a daemon thread, until
    stopped. A tracking hiccup skips a beat; it never fails the job."""

    def __init__(self, client, run_id: str | None, every: float = HEARTBEAT_S):
        self.client, self.run_id, self.every = client, run_id, every
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="lw-heartbeat")

    def _beat(self) -> None:
        while not self.stop_event.wait(self.every):
            try:
                self.client.set_tag(self.run_id, HEARTBEAT_TAG, str(int(time.time())))
            except Exception:  # noqa: BLE001 - a missed beat only ages the run
                pass

    def start(self) -> Heartbeat:
        if self.run_id is not None:
            self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)  # a beat stuck on a dead server is not waited for

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
