"""`make bench-sweep`: a soak of many small real jobs into a team server, measured.

Stands up a throwaway PostgreSQL 15 cluster (as an unprivileged user under root), starts
`python -m lw.server` on it (basic auth, served artifacts), and runs one sweep of N jobs
(tiny-pythia, random init; 4 local prompts of up to 24 tokens; prompt entropy, dataset entropy
and dip; one job per `data.seed`) with `hydra/launcher=joblib`, logging to the server as a user.
Then it measures and checks:
- jobs per minute (the sweep's wall time, `python -m lw.run` start to exit);
- per job: its run's time in the store (create to FINISHED: compute + logging), its forward
  pass (`forward_seconds`), and the cost beyond the job's compute: the sweep's wall time x
  workers / N minus the job's compute (dispatch, Hydra, model load, logging);
- store rows (runs, params, tags, metric points) and the database and artifact sizes;
- `python -m lw.report --all` on the sweep: its wall time;
- every job has exactly one FINISHED run with every metric point.

    .venv/bin/python bench/bench_sweep.py --jobs 500 --workers 2

Prints the table and writes it to bench/results/ (sweep-latest.md, a dated .md and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PYTHON = ROOT / ".venv" / "bin" / "python"
if not PYTHON.exists():
    PYTHON = Path(sys.executable)
NOBODY = 65534


def unprivileged(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


class Postgres:
    def __init__(self, folder: Path):
        self.bin = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1].parent
        self.folder, self.port = folder, free_port()
        if os.geteuid() == 0:
            os.chown(folder, NOBODY, NOBODY)
        self.pg("initdb", "-D", str(folder / "data"), "-U", "postgres", "--auth=trust",
                "-E", "UTF8", "--no-sync")
        self.pg("pg_ctl", "-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "-o",
                f"-k {folder} -p {self.port} -c listen_addresses='' -c fsync=off", "start")
        self.pg("createdb", "-h", str(folder), "-p", str(self.port), "-U", "postgres", "lw")
        self.uri = f"postgresql+psycopg://postgres@/lw?host={folder}&port={self.port}"

    def pg(self, tool: str, *args: str) -> str:
        return subprocess.run(unprivileged([str(self.bin / tool), *args]), check=True,
                              capture_output=True, text=True, timeout=600).stdout

    def sql(self, query: str) -> str:
        return self.pg("psql", "-h", str(self.folder), "-p", str(self.port), "-U", "postgres",
                       "-d", "lw", "-At", "-c", query).strip()

    def stop(self) -> None:
        subprocess.run(unprivileged([str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"),
                                     "-m", "immediate", "stop"]), capture_output=True)


def start_server(db: str, folder: Path, admin: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(
        [str(PYTHON), "-m", "lw.server", "--port", str(port), "--workers", "2"],
        env=env_for(LW_SERVER_DB=db, LW_SERVER_ARTIFACTS=str(folder / "artifacts"),
                    LW_SERVER_ADMIN_PASSWORD=admin),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while "[lw] ready:" not in (folder / "server.log").read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((folder / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    return process, uri


def add_user(uri: str, admin: str, name: str, password: str) -> None:
    import requests

    reply = requests.post(f"{uri}/api/2.0/mlflow/users/create", auth=("admin", admin),
                          json={"username": name, "password": password}, timeout=60)
    reply.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report-timeout", type=int, default=1200)
    parser.add_argument("--deadline-min", type=float, default=240,
                        help="stop the sweep after this long and measure what it did")
    args = parser.parse_args()
    # a stopped benchmark still stops its sweep, server and database (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_sweep: stopped (SIGTERM)"))
    work = Path(tempfile.mkdtemp(prefix="lw-bench-sweep-"))
    pg = Postgres(Path(tempfile.mkdtemp(prefix="lw-bench-pg-")))
    admin, password = secrets.token_hex(12), secrets.token_hex(12)
    server, uri = start_server(pg.uri, work, admin)
    out: dict = {"jobs": args.jobs, "workers": args.workers,
                 "date": datetime.now().isoformat(timespec="seconds")}
    sweep = None
    try:
        add_user(uri, admin, "bench", password)
        env = env_for(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME="bench",
                      MLFLOW_TRACKING_PASSWORD=password, OMP_NUM_THREADS="1")
        prompts = work / "prompts.txt"
        words = "the model reads a line of plain text with a few words in it".split()
        prompts.write_text("".join(" ".join(words[i:] + words[:i]) + "\n" for i in range(12)))
        command = [str(PYTHON), "-m", "lw.run", "-m", "hydra/launcher=joblib",
                   f"hydra.launcher.n_jobs={args.workers}", "model=tiny-pythia", "data=local",
                   f"data.path={prompts}", "data.n_prompts=4", "data.max_tokens=24",
                   "metrics=[prompt_entropy,dataset_entropy,dip]", "tracking=server",
                   f"data.seed=range(0,{args.jobs})", f"hydra.sweep.dir={work}/multirun"]
        out["load_before"] = os.getloadavg()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        with open(work / "sweep.out", "w") as stdout, open(work / "sweep.err", "w") as stderr:
            sweep = subprocess.Popen(command, cwd=work, env=env, stdout=stdout, stderr=stderr,
                                     start_new_session=True)
            try:
                sweep.wait(timeout=args.deadline_min * 60)
            except subprocess.TimeoutExpired:  # stop the sweep, workers included; count
                out["stopped_at_deadline_min"] = args.deadline_min
                os.killpg(sweep.pid, signal.SIGTERM)
                time.sleep(10)
                os.killpg(sweep.pid, signal.SIGKILL)
                sweep.wait()
        out["sweep_s"] = time.monotonic() - started
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["sweep_cpu_s"] = (cpu.ru_utime + cpu.ru_stime
                              - cpu_before.ru_utime - cpu_before.ru_stime)
        out["load_after"] = os.getloadavg()
        out["sweep_exit"] = sweep.returncode
        out["sweep_last_lines"] = (work / "sweep.out").read_text().strip().splitlines()[-3:]
        if sweep.returncode:
            print((work / "sweep.err").read_text()[-5000:], file=sys.stderr)
        out.update(store_check(uri, env, pg, args))
        out["db_rows"] = {t: int(pg.sql(f"select count(*) from {t}"))
                          for t in ("runs", "params", "tags", "metrics", "latest_metrics")}
        out["db_mb"] = int(pg.sql("select pg_database_size('lw')")) / 2**20
        out["artifacts_mb"] = sum(p.stat().st_size for p in (work / "artifacts").rglob("*")
                                  if p.is_file()) / 2**20
        started = time.monotonic()
        try:
            # the sweep's parent by id: one stopped at the deadline is not FINISHED
            report = subprocess.run([str(PYTHON), "-m", "lw.report", "--all", "--uri", uri,
                                     "--parent", out["parent"], "--out", str(work / "report")],
                                    cwd=work, env=env,
                                    capture_output=True, text=True,
                                    timeout=args.report_timeout)
            out["report_exit"] = report.returncode
            if report.returncode:
                out["report_error"] = report.stderr.strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            out["report_exit"] = f"timeout after {args.report_timeout} s"
        out["report_s"] = time.monotonic() - started
    finally:
        if sweep is not None and sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(pg.folder, ignore_errors=True)
    write(out)


def store_check(uri: str, env: dict, pg: Postgres, args) -> dict:
    """Every job: exactly one FINISHED run with every point; run durations."""
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_USERNAME",
                                           "MLFLOW_TRACKING_PASSWORD")})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lw").experiment_id
    runs = client.search_runs([experiment], max_results=50000)
    jobs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parent = next(r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags)
    by_seed: dict[str, list] = {}
    for run in jobs:
        by_seed.setdefault(run.data.params.get("data.seed"), []).append(run)
    one_finished = sum(1 for seed in map(str, range(args.jobs))
                       if [r.info.status for r in by_seed.get(seed, [])] == ["FINISHED"])
    # every point: what each job's table.csv and summary.json hold, against the store
    import pandas as pd

    stored = dict(line.split("|") for line in pg.sql(
        "select run_uuid, count(*) from metrics group by run_uuid").splitlines())
    missing = 0
    for run in jobs:
        if run.info.status != "FINISHED":  # a job stopped at the deadline: not counted here
            continue
        folder = Path(run.data.tags["lw.output_dir"])
        table = pd.read_csv(folder / "results" / "table.csv")
        summary = json.loads((folder / "results" / "summary.json").read_text())
        columns = [c for c in table.columns if c not in ("layer", "depth")]
        want = 2 * len(columns) * len(table) + len(summary)
        missing += int(int(stored.get(run.info.run_id, 0)) != want)
    durations = [(r.info.end_time - r.info.start_time) / 1000 for r in jobs if r.info.end_time]
    forward = [r.data.metrics.get("forward_seconds", float("nan")) for r in jobs]
    return {"parent": parent, "runs": len(jobs), "jobs_with_one_finished_run": one_finished,
            "runs_missing_points": missing,
            "run_s_median": statistics.median(durations) if durations else float("nan"),
            "forward_s_median": statistics.median(forward) if forward else float("nan")}


def write(out: dict) -> None:
    done = out.get("jobs_with_one_finished_run") or out["jobs"]
    jobs_per_min = done / out["sweep_s"] * 60
    share = out["sweep_s"] * out["workers"] / done
    out["cpu_per_job_s"] = out["sweep_cpu_s"] / done
    out["jobs_per_min"] = jobs_per_min
    out["job_share_s"] = share
    out["beyond_run_s"] = share - out.get("run_s_median", float("nan"))
    lines = [
        f"# make bench-sweep ({out['date']})", "",
        f"{out['jobs']} jobs (tiny-pythia, 4 prompts, hydra/launcher=joblib, "
        f"{out['workers']} workers) into lw.server on PostgreSQL 15", "",
        "| measure | value |", "|---|---:|",
        f"| sweep wall time | {out['sweep_s']:.0f} s (exit {out['sweep_exit']}"
        + (f"; stopped at the {out['stopped_at_deadline_min']} min deadline"
           if "stopped_at_deadline_min" in out else "") + ") |",
        f"| jobs per minute | {jobs_per_min:.1f} |",
        f"| wall time per job and worker | {share:.2f} s |",
        f"| CPU time per job (all of the sweep's processes / jobs) | "
        f"{out['cpu_per_job_s']:.2f} s |",
        f"| load average before / after (2 cores, shared) | "
        f"{out['load_before'][0]:.1f} / {out['load_after'][0]:.1f} |",
        f"| run in the store, create to FINISHED (median) | {out.get('run_s_median', 0):.2f} s |",
        f"| of which the forward pass (median) | {out.get('forward_s_median', 0):.3f} s |",
        f"| per job outside its run (dispatch, Hydra, resume lookup) | "
        f"{out['beyond_run_s']:.2f} s |",
        f"| jobs with exactly one FINISHED run | {out.get('jobs_with_one_finished_run')} of "
        f"{out['jobs']} |",
        f"| runs missing metric points | {out.get('runs_missing_points')} |",
        f"| store rows | {', '.join(f'{k} {v}' for k, v in out.get('db_rows', {}).items())} |",
        f"| database size | {out.get('db_mb', 0):.1f} MiB |",
        f"| artifacts | {out.get('artifacts_mb', 0):.1f} MiB |",
        f"| `lw.report --all` | {out.get('report_s', 0):.0f} s (exit {out.get('report_exit')}) |",
        "", "Sweep's last lines:", "", *[f"    {line}" for line in out["sweep_last_lines"]], ""]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = out["date"].replace(":", "")
    (RESULTS / "sweep-latest.md").write_text(text)
    (RESULTS / f"sweep-{stamp}.md").write_text(text)
    (RESULTS / f"sweep-{stamp}.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
