"""One job over 2 processes (a gloo group on this CPU), launched as users launch it: torchrun,
accelerate launch, or ranks started by hand; each launch serves several assertions (a launch
is three python starts). Each logs to a temporary MLflow store, and what it
logs is compared with the 1-process run of the same job."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import PYTHON, cli_env, compose_job, free_port, read_runs, wiki_records
from lw.job.stages import compute

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

BIN = PYTHON.parent
METRICS = "[prompt_entropy,curvature,dataset_entropy,dip,infonce,dime,lidar]"
# Batch mates change with the split (padding, matmul shapes): float32 states then differ in the
# last bits, which float64 metrics carry through. Measured: max relative difference ~1e-6.
RTOL, ATOL = 1e-4, 1e-6


def data_file(tmp: Path, n: int = 12) -> Path:
    path = tmp / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": r["extract"]}) + "\n"
                            for r in wiki_records()[:n]))
    return path


def store_args(tmp: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/art",
            f"hydra.run.dir={tmp}/run", f"hydra.sweep.dir={tmp}/multirun"]


def launch(launcher: list[str], tmp: Path, *overrides: str,
           **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "-m", "lw.run", *overrides, *store_args(tmp)], cwd=tmp,
                          env=cli_env(OMP_NUM_THREADS="1", **env), capture_output=True,
                          text=True, timeout=600)


TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def curves(tmp: Path, run) -> dict[str, np.ndarray]:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    out = {}
    for key in run.data.metrics:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        out[key] = np.array([m.value for m in history])
    return out


def assert_logged_as_one_process(logged: dict, overrides: list[str]) -> None:
    """The run's logged per-layer curves and summaries are the 1-process job's values
    (``lw.job.compute`` in this process)."""
    result = compute(compose_job(overrides))
    columns = [c for c in result.table.columns if c not in ("layer", "depth")]
    assert columns and set(columns) <= set(logged)
    for column in columns:
        np.testing.assert_allclose(logged[column], result.table[column], rtol=RTOL, atol=ATOL,
                                   equal_nan=True, err_msg=column)
    timing = ("prompts_per_second", "forward_seconds")
    for key, value in result.summary.items():
        if not key.startswith(timing):
            np.testing.assert_allclose(logged[key], [value], rtol=RTOL, atol=ATOL,
                                       equal_nan=True, err_msg=key)


def tiny_job(path: Path) -> list[str]:
    return ["model=tiny-pythia", "data=local", f"data.path={path}", "data.n_prompts=12",
            "data.max_tokens=48", f"metrics={METRICS}", "metric.lidar.J=3",
            "extraction.batch_size=4"]


# Rank 0's measuring (a rank-0-only step) fails in the sweep's first job only.
MEASURE_FAULT = "0:measuring the metrics:1"
MEASURE_FAILED = "rank 0 of 2 failed in measuring the metrics: RuntimeError"


@pytest.fixture(scope="module")
def torchrun_sweep(tmp_path_factory):
    """`torchrun --nproc_per_node 2 -m lw.run -m ... seed=0,1`: one launch, two jobs, the
    first failing on rank 0 while rank 1 waits (LW_TEST_FAULT)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    path = data_file(tmp)
    done = launch(TORCHRUN, tmp, "-m", *tiny_job(path), "seed=0,1",
                  LW_TEST_FAULT=MEASURE_FAULT)
    return {"done": done, "tmp": tmp, "path": path}


def test_two_process_sweep_is_one_parent_with_two_children(torchrun_sweep):
    tmp, done = torchrun_sweep["tmp"], torchrun_sweep["done"]
    assert done.returncode == 1, done.stderr[-3000:]  # a job failed
    found = read_runs(tmp)  # one run per job, not one per rank
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    status = {r.data.params["seed"]: r.info.status for r in children}
    assert status == {"0": "FAILED", "1": "FINISHED"}
    (failed,) = [r for r in children if r.info.status == "FAILED"]
    assert MEASURE_FAILED in failed.data.tags["lw.error"]
    # both ranks ended job #0 with the same line, then ran job #1 in step
    lines = [line for line in done.stderr.splitlines() if MEASURE_FAILED in line]
    assert len(lines) == 2 and all(line.startswith("[lw] error in job #0: ") for line in lines)
    # the ranks agreed on one sweep folder: job folders 0 and 1, and rank 0 wrote results
    assert sorted(p.name for p in (tmp / "multirun").iterdir() if p.is_dir()) == ["0", "1"]
    assert (tmp / "multirun" / "1" / "results" / "table.csv").exists()


def test_two_processes_log_what_one_process_logs(torchrun_sweep):
    """Job #1 ran after job #0 failed on rank 0 alone: its values are the 1-process values."""
    tmp, seed = torchrun_sweep["tmp"], "1"
    (run,) = [r for r in read_runs(tmp) if r.data.params.get("seed") == seed]
    assert run.data.metrics["n_prompts"] == 12
    assert_logged_as_one_process(curves(tmp, run), [*tiny_job(torchrun_sweep["path"]),
                                                    f"seed={seed}"])


def test_a_failure_on_one_rank_ends_both_and_fails_the_run(tmp_path):
    """Ranks started by hand, as a launcher would, with rank 1 on a machine whose cache folder
    is broken (a file where the folder should be): loading the tokenizer fails there only."""
    path = data_file(tmp_path)
    broken = tmp_path / "not-a-folder"
    broken.write_text("")
    port = str(free_port())
    processes = []
    for rank in (0, 1):
        env = cli_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                      OMP_NUM_THREADS="1")
        if rank == 1:
            env["LW_CACHE_DIR"] = str(broken)
        processes.append(subprocess.Popen(
            [str(PYTHON), "-m", "lw.run", "model=tiny-pythia", "data=local",
             f"data.path={path}", "data.n_prompts=6", *store_args(tmp_path)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [1, 1], outputs
    for _, stderr in outputs:
        assert "rank 1 of 2 failed in planning the prompts" in stderr
    (run,) = read_runs(tmp_path)
    assert run.info.status == "FAILED"
    assert "rank 1 of 2 failed" in run.data.tags["lw.error"]


def test_bfloat16_weights_give_finite_float_metrics(tmp_path):
    path = data_file(tmp_path, 6)
    base = ["model=tiny-pythia", "data=local", f"data.path={path}", "data.n_prompts=6",
            "data.max_tokens=32"]
    full = compute(compose_job(base)).table
    half = compute(compose_job([*base, "model.dtype=bfloat16"])).table
    for column in ("prompt_entropy/max", "curvature", "dataset_entropy/max"):
        assert np.isfinite(half[column]).all(), column
        # bfloat16 keeps ~3 significant digits: close to float32, and not identical to it
        np.testing.assert_allclose(half[column], full[column], rtol=0.05)
    assert not np.array_equal(half["prompt_entropy/max"], full["prompt_entropy/max"])


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_is_accepted_on_cpu_and_changes_nothing(tmp_path, device_map):
    """The big-model loading path (from_pretrained with a device_map) runs here on the CPU: it
    must place the model whole and give the values the plain path gives."""
    from lw.loading.models import load_model

    job = compose_job(["model=minilm", f"model.device_map={device_map}"])
    loaded = load_model(job.model, torch.device("cpu"))
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    path = data_file(tmp_path, 6)
    base = ["model=minilm", "data=local", f"data.path={path}", "data.n_prompts=6"]
    plain = compute(compose_job(base)).table
    mapped = compute(compose_job([*base, f"model.device_map={device_map}"])).table
    np.testing.assert_allclose(mapped.to_numpy(float), plain.to_numpy(float), rtol=1e-6,
                               equal_nan=True)


def test_shards_balance_tokens_and_cover_every_prompt_once():
    from lw.job.distributed import shard

    lengths = [int(x) for x in np.random.default_rng(0).integers(2, 129, size=101)]
    shares = shard(lengths, 3)
    assert sorted(i for share in shares for i in share) == list(range(101))
    loads = [sum(lengths[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(lengths)
    assert shard([5], 2) == [[0], []]  # fewer prompts than ranks: a rank may have none


def test_max_memory_needs_a_device_map():
    from lw.errors import ConfigError

    with pytest.raises(ConfigError, match="model.max_memory needs model.device_map"):
        compose_job(["model=minilm", "+model.max_memory={cpu: 1GiB}"])
    job = compose_job(["model=minilm", "model.device_map=auto", "+model.max_memory.0=2GiB"])
    from lw.loading.model_sources import placement

    assert placement(job.model)["max_memory"] == {0: "2GiB"}  # GPU indices as ints


def test_accelerate_launch_completes_a_partial_cache_entry(tmp_path, monkeypatch):
    """An entry with the paper-mode spectra only, asked for official mode by a 2-rank job
    (`accelerate launch`, as users launch it): every rank must compute the union (rank 0 alone
    read the entry), so that the rewritten entry holds both modes for every prompt, and the
    job logs what one process computes (uncached)."""
    from lw.job import cache
    from lw.job.identity import forward_hash

    path = data_file(tmp_path)
    job = ["model=minilm", "data=local", f"data.path={path}", "data.n_prompts=12",
           "data.max_tokens=48", "extraction.batch_size=4", "extraction.cache=true"]
    monkeypatch.setenv("LW_CACHE_DIR", str(tmp_path / "cache"))
    compute(compose_job(job))                                       # paper spectra only
    official = [*job, "metric.compat=official"]
    done = launch(ACCELERATE, tmp_path, *official, LW_CACHE_DIR=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lacks spectrum/official" in done.stderr
    held = cache.load(forward_hash(compose_job(official))).prompts.per_prompt
    for mode in ("paper", "official"):
        spectra = held[f"spectrum/{mode}"]                         # (N, L+1, m)
        assert (spectra.sum(-1) > 0).all(), mode                   # no prompt left empty
    (run,) = read_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert (tmp_path / "run" / "results" / "table.csv").exists()
    uncached = [o for o in official if o != "extraction.cache=true"]
    assert_logged_as_one_process(curves(tmp_path, run), uncached)
