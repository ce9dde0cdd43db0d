"""`make bench`: what a job costs next to the bare forward pass, on the same prompts.

For each model and prompt count, each case in a fresh process of its own (so peak RSS is the
case's own):
- floor:   the bare forward pass with all hidden states, over lw's own batches (model loaded
           before the clock starts): the least any job can cost;
- job:     the full lw job (`lw.job.compute`, model load included; the activation cache on and
           empty, so the job also writes its entry);
- warm:    the same job again with that cache entry: no model, no forward pass;
- 1 proc / 2 procs: the job from the command line (`python -m lw.run`, tracking to a temporary
           store) in one process, and under `torchrun --nproc_per_node 2`;
- +<metric> (cka, layer_distance, logit_lens): the job case with that metric added, on an empty
           cache of its own; "+ / floor" is its cost over the job case, in floors.

    .venv/bin/python bench/bench.py                      # the default table (docs/development.md)
    .venv/bin/python bench/bench.py --models minilm --n 64 --cases floor job warm

Prints a table (seconds, ratio to the floor, prompts/s, peak RSS) and writes it to
bench/results/ (latest.md, and a dated .md and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PYTHON = ROOT / ".venv" / "bin" / "python"
CASES = ("floor", "job", "warm", "1proc", "2procs")
ADDED = ("+cka", "+layer_distance", "+logit_lens")  # the job with one more metric
METRICS = "[prompt_entropy,curvature,dataset_entropy,dip]"


def overrides(model: str, n: int) -> list[str]:
    return [f"model={model}", "data=wiki-vital", f"data.n_prompts={n}", "data.max_tokens=128",
            f"metrics={METRICS}"]


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def case_floor(model: str, n: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import compose_job
    from lw.job.extract import _pad_id, length_batches, pad_batch
    from lw.job.stages import pick_device, plan_job
    from lw.loading.models import load_model, load_tokenizer

    job = compose_job(overrides(model, n))
    plan = plan_job(job, load_tokenizer(job.model))
    loaded = load_model(job.model, pick_device("auto"))
    batches = length_batches([len(p) for p in plan.ids], job.extraction.batch_size,
                             equal_lengths=loaded.info.family == "ssm")
    started = time.perf_counter()
    with torch.inference_mode():
        for index in batches:
            ids, mask = pad_batch([plan.ids[i] for i in index], _pad_id(loaded.tokenizer))
            loaded.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True,
                         use_cache=False)
    return {"seconds": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()}


def case_job(model: str, n: int, added: str = "") -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import compose_job
    from lw.job.stages import compute

    extra = [f"metrics={METRICS[:-1]},{added}]"] if added else []
    started = time.perf_counter()
    result = compute(compose_job([*overrides(model, n), *extra, "extraction.cache=true"]))
    return {"seconds": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib(),
            "cache_hit": result.summary["activation_cache_hit"]}


def case_cli(model: str, n: int, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        launcher = ([str(PYTHON.parent / "torchrun"), "--standalone", "--nproc_per_node",
                     str(processes)] if processes > 1 else [str(PYTHON)])
        command = [*launcher, "-m", "lw.run", *overrides(model, n),
                   f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                   f"tracking.artifact_location={tmp}/art", f"hydra.run.dir={tmp}/run"]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib(resource.RUSAGE_CHILDREN)}


def run_case(case: str, model: str, n: int, cache_dir: str) -> dict:
    """One case in a fresh process; its JSON line back."""
    env = {**os.environ, "LW_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([str(PYTHON), __file__, "--one", case, model, str(n)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def link_model_cache(cache_dir: Path) -> None:
    """The dequantized smollm2 is made once per machine in ~/.cache/lw: share it, keep the
    activation cache fresh."""
    home = Path(os.environ.get("LW_CACHE_DIR", Path.home() / ".cache" / "lw"))
    for folder in home.glob("smollm2-*"):
        (cache_dir / folder.name).symlink_to(folder)


def table(rows: list[dict]) -> str:
    lines = ["| model | N | case | seconds | / floor | + / floor | prompts/s | peak RSS MiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['n']} | {row['case']} | error: "
                         f"{row['error']} | | | | |")
            continue
        ratio = f"{row['ratio']:.2f}" if row.get("ratio") else ""
        added = f"{row['added']:.3f}" if row.get("added") is not None else ""
        lines.append(f"| {row['model']} | {row['n']} | {row['case']} | {row['seconds']:.2f} | "
                     f"{ratio} | {added} | {row['n'] / row['seconds']:.1f} | "
                     f"{row['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--n", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES + ADDED)
    parser.add_argument("--one", nargs=3, metavar=("CASE", "MODEL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        case, model, n = args.one[0], args.one[1], int(args.one[2])
        measure = {"floor": case_floor, "job": case_job, "warm": case_job,
                   "1proc": lambda m, k: case_cli(m, k, 1),
                   "2procs": lambda m, k: case_cli(m, k, 2),
                   **{a: lambda m, k, a=a: case_job(m, k, a[1:]) for a in ADDED}}[case]
        print(json.dumps(measure(model, n)))
        return
    rows = []
    for model in args.models:
        for n in args.n:
            with tempfile.TemporaryDirectory() as cache_dir:
                link_model_cache(Path(cache_dir))
                floor = job = None
                for case in args.cases:  # warm follows job: same cache folder
                    if case in ADDED:  # an empty activation cache of its own
                        with tempfile.TemporaryDirectory() as own:
                            link_model_cache(Path(own))
                            row = {"model": model, "n": n, "case": case,
                                   **run_case(case, model, n, own)}
                    else:
                        row = {"model": model, "n": n, "case": case,
                               **run_case(case, model, n, cache_dir)}
                    if case == "floor" and "error" not in row:
                        floor = row["seconds"]
                    if case == "job" and "error" not in row:
                        job = row["seconds"]
                    if floor and "error" not in row:
                        row["ratio"] = row["seconds"] / floor
                        if case in ADDED and job:
                            row["added"] = (row["seconds"] - job) / floor
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    header = (f"lw bench {stamp}: {os.cpu_count()} CPUs, "
              f"{'CUDA' if _has_cuda() else 'no GPU'}; metrics {METRICS}, max 128 tokens\n\n")
    for name in (f"{stamp}.md", "latest.md"):
        (RESULTS / name).write_text(header + text + "\n")
    (RESULTS / f"{stamp}.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {RESULTS / 'latest.md'}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
