"""A real one-node SLURM cluster in a temporary folder, for the tests (Debian's slurmctld,
slurmd, slurm-client and munge; slurmdbd and mariadb-server for accounting).

Everything it needs lives in its folder: its own munge key and socket, its own ports,
``slurm.conf`` (``SLURM_CONF`` points at it), spool and state folders, logs. No systemd or
cgroups: ``proctrack/linuxproc``, ``task/none``. The daemons run as root (SLURM's own user
checks), so the cluster is only stood up where the tests run as root; elsewhere, or where the
packages are missing, the tests that need it skip saying why.

With ``accounting=True`` a throwaway MariaDB (on a free port, its data in the folder) backs a
``slurmdbd``, so ``sacct`` answers as on a production cluster; without, ``sacct`` fails
("accounting storage is disabled"), as on many small clusters.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")
ACCOUNTING = ("slurmdbd", "mariadbd", "mariadb-install-db")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def why_not(accounting: bool = False) -> str | None:
    """Why a cluster cannot be stood up here (None when it can)."""
    if os.geteuid() != 0:
        return "SLURM's daemons need root here (they run as SlurmUser=root)"
    missing = [n for n in DAEMONS + (ACCOUNTING if accounting else ()) if _which(n) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (apt-get install slurmctld slurmd "
                f"slurm-client munge{' slurmdbd mariadb-server' if accounting else ''})")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, what: str, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:] if p.exists() else ''}"
                              for p in logs)
            raise RuntimeError(f"SLURM test cluster: {what} not within {timeout:.0f} s\n{tails}")
        time.sleep(0.1)


class SlurmCluster:
    """One node (``lwnode``, this machine's cores and 4 GiB), one partition (``debug``)."""

    def __init__(self, folder: Path, accounting: bool = False, kill_wait_s: int = 2,
                 min_job_age_s: int = 600):
        self.folder = folder
        self.accounting = accounting
        self.kill_wait_s = kill_wait_s
        self.min_job_age_s = min_job_age_s  # how long squeue still shows an ended job
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *SBIN])

    # --- commands, as a user would type them, on this cluster ---
    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True,
                              timeout=60, check=check)

    def node_state(self) -> str:
        done = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    def jobs(self) -> dict[str, str]:
        """{job id (``<array>_<task>``): state} of every job the controller still knows."""
        done = self.run("squeue", "-h", "--states=all", "-r", "-o", "%i %T")
        return dict(line.split() for line in done.stdout.splitlines() if line.strip())

    def _jobs_or_none(self) -> dict[str, str]:
        try:
            return self.jobs()
        except subprocess.SubprocessError:
            return {}

    def _our_step_daemons(self) -> list[int]:
        """The slurmstepd processes of this cluster (found by their SLURM_CONF)."""
        mine = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if (proc.name.isdigit() and (proc / "comm").read_text().strip() == "slurmstepd"
                        and mine in (proc / "environ").read_bytes().split(b"\0")):
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    # --- life cycle ---
    def _start(self, command: list[str], log: Path) -> subprocess.Popen:
        process = subprocess.Popen(command, env=self.env, stdout=log.open("ab"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def start(self) -> SlurmCluster:
        f = self.folder
        for sub in ("state", "spool", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        munge = f / "munge"
        munge.mkdir(mode=0o700, exist_ok=True)
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={munge / 'munge.key'}"],
                       check=True, capture_output=True)
        socket_path = munge / "munge.socket"
        self._start([_which("munged"), "--foreground", "--force", f"--socket={socket_path}",
                     f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--seed-file={munge / 'munge.seed'}", f"--log-file={f / 'log/munged.log'}"],
                    f / "log/munged.out")
        _wait(socket_path.exists, "munged's socket", 30, [f / "log/munged.log"])
        accounting = "AccountingStorageType=accounting_storage/none\n"
        if self.accounting:
            accounting = self._start_accounting(socket_path)
        cpus = os.cpu_count() or 1
        (f / "slurm.conf").write_text(f"""\
ClusterName=lwtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={f / 'state'}
SlurmdSpoolDir={f / 'spool'}
SlurmctldPidFile={f / 'slurmctld.pid'}
SlurmdPidFile={f / 'slurmd.pid'}
SlurmctldLogFile={f / 'log/slurmctld.log'}
SlurmdLogFile={f / 'log/slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
KillWait={self.kill_wait_s}
MinJobAge={self.min_job_age_s}
SlurmctldTimeout=30
SlurmdTimeout=30
{accounting}NodeName=lwnode NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} \
RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes=lwnode Default=YES MaxTime=INFINITE State=UP
""")
        self._start([_which("slurmctld"), "-D", "-i"], f / "log/slurmctld.out")
        self._start([_which("slurmd"), "-D", "-N", "lwnode"], f / "log/slurmd.out")
        _wait(lambda: self.node_state() == "idle", "node lwnode idle (sinfo)", 20,
              [f / "log/slurmctld.log", f / "log/slurmd.log", f / "log/slurmd.out"])
        return self

    def _start_accounting(self, munge_socket: Path) -> str:
        f = self.folder
        data, port = f / "mariadb", _free_port()
        subprocess.run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}",
                        "--user=root", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)
        self._start([_which("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root",
                     f"--socket={f / 'mariadb.sock'}", f"--port={port}",
                     "--bind-address=127.0.0.1", f"--pid-file={f / 'mariadb.pid'}",
                     "--skip-grant-tables", "--innodb-buffer-pool-size=64M"],
                    f / "log/mariadb.out")
        _wait(lambda: (f / "mariadb.sock").exists(), "mariadb's socket", 60,
              [f / "log/mariadb.out"])
        dbd_port = _free_port()
        conf = f / "slurmdbd.conf"
        conf.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
PidFile={f / 'slurmdbd.pid'}
LogFile={f / 'log/slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={port}
StorageUser=root
StorageLoc=slurm_acct_db
""")
        conf.chmod(0o600)
        self._start([_which("slurmdbd"), "-D"], f / "log/slurmdbd.out")
        _wait(lambda: _listening(dbd_port), "slurmdbd listening", 60,
              [f / "log/slurmdbd.log", f / "log/slurmdbd.out"])
        return (f"AccountingStorageType=accounting_storage/slurmdbd\n"
                f"AccountingStorageHost=localhost\nAccountingStoragePort={dbd_port}\n"
                f"AccountingStoragePass={munge_socket}\n")  # the munge socket, for slurmdbd

    def stop(self) -> None:
        """Cancel what still runs, stop the daemons (their process groups), remove the folder."""
        if self.processes:
            self.run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(
                    state in ("RUNNING", "COMPLETING", "PENDING")
                    for state in self._jobs_or_none().values()):
                time.sleep(0.1)
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=20)
        self.processes.clear()
        for pid in self._our_step_daemons():  # slurmstepd detaches from slurmd
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
