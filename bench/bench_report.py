"""`make bench-report`: how long `lw.report --all` takes on a 2,000-job sweep.

Logs one parent and N finished children the way lw.tracking logs a job (lw.* tags and params,
a per-layer curve for each metric, summaries, results/table.csv and results/per_prompt.parquet
of a 30-layer model on 32 prompts), with MlflowClient, into
- the local default store (SQLite + an artifact folder), and
- `python -m lw.server` on a throwaway PostgreSQL 15 cluster (served artifacts, basic auth),
then times `python -m lw.report --all` on the sweep (a process of its own, start to exit, the
report logged back to the parent) and checks that the report holds every child.

    .venv/bin/python bench/bench_report.py --jobs 2000 --stores sqlite server

Prints the table and writes it to bench/results/ (report-latest.md, a dated .md and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sweep import PYTHON, RESULTS, Postgres, add_user, env_for, start_server  # noqa: E402

LAYERS = 30
PROMPTS = 32
COLUMNS = ["prompt_entropy/raw", "prompt_entropy/max", "curvature", "dataset_entropy/max",
           "dip/stat", "dip/pvalue", "token_norm/max_over_median", "cka/to_last"]
MODELS = ["smollm2", "minilm", "tiny-pythia", "tiny-mamba"]


def job_files(rng, folder: Path) -> tuple[pd.DataFrame, Path]:
    layers = np.arange(LAYERS + 1)
    table = pd.DataFrame({"layer": layers, "depth": layers / LAYERS})
    for column in COLUMNS:
        table[column] = rng.random(LAYERS + 1)
    per_prompt = pd.DataFrame({"prompt": np.repeat(np.arange(PROMPTS), LAYERS + 1),
                               "layer": np.tile(layers, PROMPTS), "n_tokens": 40,
                               "prompt_entropy/raw": rng.normal(3, 0.2, PROMPTS * (LAYERS + 1))})
    per_prompt["prompt_entropy/max"] = per_prompt["prompt_entropy/raw"] / 4
    results = folder / "results"
    results.mkdir(parents=True)
    table.to_csv(results / "table.csv", index=False)
    per_prompt.to_parquet(results / "per_prompt.parquet", index=False)
    return table, results


def log_sweep(uri: str, jobs: int, threads: int, work: Path) -> str:
    """One parent and ``jobs`` FINISHED children; the parent's run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment("lw", artifact_location=(
        (work / "artifacts").as_uri() if uri.startswith("sqlite") else None))
    parent = client.create_run(experiment, run_name="sweep",
                               tags={"lw.jobs": str(jobs)}).info.run_id

    def child(i: int) -> None:
        rng = np.random.default_rng(i)
        model, seed = MODELS[i % len(MODELS)], i // len(MODELS)
        with tempfile.TemporaryDirectory() as tmp:
            table, results = job_files(rng, Path(tmp))
            run = client.create_run(experiment, run_name=f"{model} seed={seed}", tags={
                "mlflow.parentRunId": parent, "lw.model": model, "lw.data": "wiki-vital",
                "lw.seed": str(seed), "lw.job_hash": f"{i:016x}"}).info.run_id
            now = int(time.time() * 1000)
            points = [Metric(f"{c}", float(v), now, int(layer))
                      for c in COLUMNS for layer, v in zip(table["layer"], table[c], strict=True)]
            points += [Metric(f"{c}/best_layer", float(table[c].idxmax()), now, 0)
                       for c in COLUMNS]
            params = [Param(k, v) for k, v in {"model.name": model, "data.name": "wiki-vital",
                                                "data.seed": str(seed), "metrics": str(COLUMNS)
                                                }.items()]
            for start in range(0, len(points), 900):  # MLflow's log-batch limit, as lw does
                client.log_batch(run, metrics=points[start:start + 900],
                                 params=params if start == 0 else [],
                                 tags=[RunTag("lw.status", "ok")] if start == 0 else [])
            client.log_artifacts(run, str(results), "results")
            client.set_terminated(run, "FINISHED")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(child, range(jobs)))
    client.set_terminated(parent, "FINISHED")
    return parent


def time_report(uri: str, parent: str, env: dict, work: Path, timeout: int) -> dict:
    out = work / "report"
    started = time.monotonic()
    done = subprocess.run([str(PYTHON), "-m", "lw.report", "--all", "--uri", uri, "--parent",
                           parent, "--out", str(out)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=timeout)
    seconds = time.monotonic() - started
    row = {"report_s": seconds, "exit": done.returncode}
    if done.returncode:
        row["error"] = done.stderr.strip().splitlines()[-1:]
    else:
        row["summary_rows"] = len(pd.read_csv(out / "summary.csv"))
    return row


def bench_store(store: str, jobs: int, timeout: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"lw-bench-report-{store}-"))
    server = pg = None
    env = env_for(OMP_NUM_THREADS="1")
    try:
        if store == "sqlite":
            uri, threads = f"sqlite:///{work}/mlflow.db", 1  # SQLite: one writer at a time
        else:
            import secrets

            pg = Postgres(Path(tempfile.mkdtemp(prefix="lw-bench-pg-")))
            admin, password = secrets.token_hex(12), secrets.token_hex(12)
            server, uri = start_server(pg.uri, work, admin)
            add_user(uri, admin, "bench", password)
            env.update(MLFLOW_TRACKING_USERNAME="bench", MLFLOW_TRACKING_PASSWORD=password)
            os.environ.update(MLFLOW_TRACKING_USERNAME="bench", MLFLOW_TRACKING_PASSWORD=password)
            threads = 8
        started = time.monotonic()
        parent = log_sweep(uri, jobs, threads, work)
        row = {"store": store, "jobs": jobs, "log_s": time.monotonic() - started}
        row.update(time_report(uri, parent, env, work, timeout))
        return row
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        if pg is not None:
            pg.stop()
            shutil.rmtree(pg.folder, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--stores", nargs="+", default=["sqlite", "server"],
                        choices=["sqlite", "server"])
    parser.add_argument("--timeout", type=int, default=3600)
    args = parser.parse_args()
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    rows = [bench_store(store, args.jobs, args.timeout) for store in args.stores]
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    lines = [f"# make bench-report ({stamp}; {os.cpu_count()} CPUs, load "
             f"{os.getloadavg()[0]:.1f})", "",
             f"A sweep of {args.jobs} finished children ({LAYERS + 1} layers, {len(COLUMNS)} "
             f"per-layer metrics, {PROMPTS} prompts each), then `lw.report --all` on it", "",
             "| store | children | logging them | `lw.report --all` | report's summary rows |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        label = {"sqlite": "SQLite (local default)",
                 "server": "lw.server on PostgreSQL 15"}[row["store"]]
        report = (f"{row['report_s']:.0f} s" if not row["exit"]
                  else f"exit {row['exit']}: {row.get('error')}")
        lines.append(f"| {label} | {row['jobs']} | {row['log_s']:.0f} s | {report} | "
                     f"{row.get('summary_rows', '')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report-latest.md").write_text(text)
    (RESULTS / f"report-{stamp}.md").write_text(text)
    (RESULTS / f"report-{stamp}.json").write_text(json.dumps(rows, indent=2))
    if any(row["exit"] or row.get("summary_rows") != row["jobs"] for row in rows):
        raise SystemExit("[lw] bench-report: a report failed or missed children (above)")


if __name__ == "__main__":
    main()
