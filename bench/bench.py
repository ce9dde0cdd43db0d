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
- +<metric> (any registered metric, e.g. +cka): the job case with that metric added (or, for
           one of the job's own metrics, the job without it: -<metric>), on an empty cache of
           its own; "+ / floor" is its cost over the job case, in floors.

`--training-study` times the whole offline training study (bench/training_study.json).

`--metric-costs` measures every metric that runs offline on wiki-vital that way (smollm2, 64
prompts by default) and writes bench/metric_cost.json, which the docs' metrics reference shows
(cost / forward pass).

    .venv/bin/python bench/bench.py                      # the default table (docs/development.md)
    .venv/bin/python bench/bench.py --models minilm --n 64 --cases floor job warm
    .venv/bin/python bench/bench.py --metric-costs              # bench/metric_cost.json

Prints a table (seconds, ratio to the floor, prompts/s, peak RSS) and writes it to
bench/results/ (latest.md, and a dated .md and .json).
"""

from __future__ import annotations

import argparse
import json
import math
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
METRICS = "[prompt_entropy,curvature,dataset_entropy,dip]"
BASE = METRICS.strip("[]").split(",")
COSTS = ROOT / "bench" / "metric_cost.json"
# What a metric needs beyond wiki-vital's text: labels come from its topics; multiple-choice
# answers (mc_accuracy) and MTEB's hub tasks are not measured here.
NOT_OFFLINE = {"answers": "needs multiple-choice data", "model": "needs MTEB's hub tasks"}


def metric_list(added: str) -> list[str]:
    """The job's metrics for case +<name> (base plus it) or -<name> (base without it)."""
    name = added[1:]
    return [m for m in BASE if m != name] if added.startswith("-") else [*BASE, name]


def overrides(model: str, n: int) -> list[str]:
    # topic labels for probe and cluster; every case plans the same prompts with them
    return [f"model={model}", "data=wiki-vital", f"data.n_prompts={n}", "data.max_tokens=128",
            "data.label_field=topic", f"metrics={METRICS}"]


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

    extra = [f"metrics=[{','.join(metric_list(added))}]"] if added else []
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
    parser.add_argument("--cases", nargs="+", default=list(CASES),
                        help=f"{', '.join(CASES)}, or +<metric> / -<metric>")
    parser.add_argument("--metric-costs", action="store_true",
                        help="every offline metric's cost over the forward pass "
                             "(bench/metric_cost.json; default --models smollm2 --n 64); with "
                             "--cases +<metric>...: only those (bench/results/)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="with --metric-costs: runs of each case (the fastest is kept)")
    parser.add_argument("--pairwise", action="store_true",
                        help="each pairwise measure's whole layer x layer matrix at smollm2's "
                             "shape (N=512, 31 layers, 576 wide), seconds (bench/pairwise.json)")
    parser.add_argument("--training-study", action="store_true",
                        help="the whole +experiment=training_dynamics_offline (training, then "
                             "the checkpoints sweep) in a fresh folder, wall and CPU seconds "
                             "(bench/training_study.json)")
    parser.add_argument("--one", nargs=3, metavar=("CASE", "MODEL", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--one-costs", nargs=4, help=argparse.SUPPRESS)  # model n repeats cases
    args = parser.parse_args()
    if args.one_costs:
        model, n, repeats, cases = args.one_costs
        case_costs(model, int(n), cases.split(","), int(repeats))
        return
    if args.one:
        case, model, n = args.one[0], args.one[1], int(args.one[2])
        measure = {"floor": case_floor, "job": case_job, "warm": case_job,
                   "1proc": lambda m, k: case_cli(m, k, 1),
                   "2procs": lambda m, k: case_cli(m, k, 2),
                   }.get(case) or (lambda m, k: case_job(m, k, case))
        print(json.dumps(measure(model, n)))
        return
    if args.metric_costs:
        return metric_costs(args)
    if args.pairwise:
        return pairwise_costs()
    if args.training_study:
        return training_study()
    rows = measure_cases(args.models, args.n, args.cases)
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


def case_costs(model: str, n: int, cases: list[str], repeats: int) -> None:
    """In one process (no start-up or import noise between cases): each job case timed
    ``repeats`` times, interleaved (once when it takes over 2 minutes), the floor likewise;
    one JSON line per run on stdout (a case that cannot run here: its error)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import compose_job
    from lw.job.stages import compute

    def job_seconds(case: str) -> float:
        metrics = BASE if case == "job" else metric_list(case)
        started = time.perf_counter()
        compute(compose_job([*overrides(model, n), f"metrics=[{','.join(metrics)}]"]))
        return time.perf_counter() - started

    job_seconds("job")  # warm: imports, the tokenizer, the model's files in the page cache
    for _ in range(repeats):
        print(json.dumps({"floor": case_floor(model, n)["seconds"]}), flush=True)
    slow = set()
    for _ in range(repeats):
        for case in cases:
            if case in slow:
                continue
            try:
                seconds = job_seconds(case)
            except Exception as error:  # noqa: BLE001 - a case that cannot run here: said
                print(json.dumps({case: f"error: {error}"[:300]}), flush=True)
                slow.add(case)
                continue
            if seconds > 120:  # a case this slow is measured once: its noise is small
                slow.add(case)
            print(json.dumps({case: seconds}), flush=True)


def metric_costs(args) -> None:
    """Each offline metric's cost over the bare forward pass, in floors: the job with it
    against the job without it (+m over the job; the job over -m for the job's own metrics)."""
    sys.path.insert(0, str(ROOT / "src"))
    from lw.metrics import registry

    model = args.models[0] if args.models != ["smollm2", "minilm"] else "smollm2"
    n = args.n[0] if args.n != [64, 512] else 64
    skipped = {m.name: NOT_OFFLINE[need] for m in registry.every().values()
               for need in m.needs if need in NOT_OFFLINE}
    cases = ["job"] + [("-" if name in BASE else "+") + name
                       for name in registry.every() if name not in skipped]
    some = [c for c in args.cases if c[0] in "+-"]  # --cases +layer_distance: only those
    if some:
        cases = ["job", *some]
    with tempfile.TemporaryDirectory() as cache_dir:
        link_model_cache(Path(cache_dir))
        env = {**os.environ, "LW_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT / "src")}
        done = subprocess.run([str(PYTHON), __file__, "--one-costs", model, str(n),
                               str(args.repeats), ",".join(cases)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
    seconds: dict[str, float] = {}  # the fastest run of each case
    errors: dict[str, str] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            for case, value in json.loads(line).items():
                if isinstance(value, str):
                    errors[case] = value
                else:
                    seconds[case] = min(seconds.get(case, math.inf), value)
    if done.returncode != 0 or "floor" not in seconds or "job" not in seconds:
        raise SystemExit(done.stderr[-3000:])
    floor, job = seconds["floor"], seconds["job"]
    costs = {case[1:]: round(((seconds[case] - job) if case[0] == "+" else
                              (job - seconds[case])) / floor, 3)
             for case in cases if case[0] in "+-" and case in seconds}
    skipped.update({case[1:]: reason.split(". ")[0] for case, reason in errors.items()})
    for name, cost in costs.items():
        print(f"{name:20s} {cost:+.3f} floors")
    target = COSTS if not some else RESULTS / f"metric_cost_{model}_{n}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({
        "what": (f"the job with it against the job without it, over the bare forward pass with "
                 f"every hidden state ({model}, {n} wiki-vital prompts up to 128 tokens, "
                 f"{os.cpu_count()} CPUs, {'CUDA' if _has_cuda() else 'no GPU'}; floor "
                 f"{floor:.1f} s, the job with {', '.join(BASE)} {job:.1f} s; the fastest of "
                 f"{args.repeats} runs each (one for cases over 2 min), in one process; "
                 "`bench/bench.py --metric-costs`, "
                 f"{datetime.now():%Y-%m-%d}). Differences under ~0.05 are noise. Not measured "
                 "here: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())),
        "n": n, "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "metrics": costs}, indent=2) + "\n")
    print(f"wrote {target}")


def pairwise_costs(n: int = 512, layers: int = 31, width: int = 576, repeats: int = 2) -> None:
    """Each pairwise measure's within-model matrix on pooled vectors of smollm2's shape (random:
    the kernels' cost does not depend on the values), the fastest of ``repeats``, in seconds and
    against the bare forward pass of smollm2 over N wiki-vital prompts, measured here first (the
    floor case, in its own process) so both see the same machine."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from lw.metrics import registry
    from lw.metrics.pairwise import own_knobs

    with tempfile.TemporaryDirectory() as cache_dir:
        link_model_cache(Path(cache_dir))
        floor = run_case("floor", "smollm2", n, cache_dir)
    if "error" in floor:
        sys.exit(f"the floor case failed: {floor['error']}")
    print(f"{'floor':12s} {floor['seconds']:7.2f} s  (smollm2, N = {n})", flush=True)
    per_prompt = floor["seconds"] / n
    pooled = torch.randn(n, layers, width, generator=torch.Generator().manual_seed(0))
    rows = {}
    for metric in registry.every().values():
        if metric.across_models is None:
            continue
        knobs = own_knobs(metric.knobs())
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            metric.across_models(pooled, pooled, **knobs)
            best = min(best, time.perf_counter() - started)
        rows[metric.name] = {"seconds": round(best, 2),
                             "over_floor": round(best / (per_prompt * n), 3)}
        print(f"{metric.name:12s} {best:7.2f} s  {rows[metric.name]['over_floor']:.3f} floors",
              flush=True)
    (ROOT / "bench" / "pairwise.json").write_text(json.dumps({
        "what": (f"the whole (L+1) x (L+1) matrix, N = {n}, L+1 = {layers}, D = {width} "
                 "(smollm2's shape; random vectors: every layer of full rank N-1, the worst "
                 "case for svcca, pwcca and procrustes, which take an SVD of up to N x N per "
                 "pair of layers, O((L+1)^2 N^3): beyond a tenth of the forward pass at this "
                 f"N, said in their Cost sections), fastest of {repeats}, {os.cpu_count()} CPUs, "
                 f"{'CUDA' if _has_cuda() else 'no GPU'}, {datetime.now():%Y-%m-%d}; against "
                 f"smollm2's bare forward pass over the same N wiki-vital prompts, measured "
                 f"in the same session ({per_prompt * n:.1f} s); 1-minute load average at the end "
                 f"{os.getloadavg()[0]:.1f}"),
        "measures": rows}, indent=2) + "\n")


def training_study() -> None:
    """``python -m lw.run -m +experiment=training_dynamics_offline`` from an empty folder and an
    empty activation cache (it trains, then measures every checkpoint), timed as a user runs it:
    wall-clock seconds and the CPU seconds of its processes."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([str(PYTHON), "-m", "lw.run", "-m",
                               "+experiment=training_dynamics_offline"], cwd=folder,
                              # an empty activation cache: a study trained before with the
                              # same seed has the same weights, and its jobs would be hits
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src"),
                                   "LW_CACHE_DIR": str(Path(folder) / "cache")},
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            sys.exit(f"the experiment failed: {done.stderr.strip().splitlines()[-1][:300]}")
        jobs = sum(1 for line in done.stdout.splitlines() + done.stderr.splitlines()
                   if "[HYDRA] \t#" in line)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {"what": (f"+experiment=training_dynamics_offline from an empty folder and cache: "
                       f"training "
                       f"then {jobs} jobs, {os.cpu_count()} CPUs, "
                       f"{'CUDA' if _has_cuda() else 'no GPU'}, {datetime.now():%Y-%m-%d}, "
                       f"1-minute load average {load:.1f} at the start"),
              "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}
    print(json.dumps(result, indent=2))
    (ROOT / "bench" / "training_study.json").write_text(json.dumps(result, indent=2) + "\n")


def measure_cases(models: list[str], sizes: list[int], cases: list[str]) -> list[dict]:
    rows = []
    for model in models:
        for n in sizes:
            with tempfile.TemporaryDirectory() as cache_dir:
                link_model_cache(Path(cache_dir))
                floor = job = None
                for case in cases:  # warm follows job: same cache folder
                    if case[0] in "+-":  # an empty activation cache of its own
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
                        if case[0] in "+-" and job:
                            row["added"] = (row["seconds"] - job) / floor
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
    return rows


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
