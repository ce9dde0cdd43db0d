"""The activation cache on minilm (real weights) over real text: a cached job with other metric
knobs gives what an uncached job with those knobs gives, without loading the model; entries are
whole or absent, and the cache keeps to its size limit. Also: data errors come before the
model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lw.job.stages
from conftest import compose_job, wiki_records
from lw.errors import LwError
from lw.job import cache
from lw.job.identity import forward_hash, job_hash
from lw.job.stages import compute

METRICS = "[prompt_entropy,curvature,dataset_entropy,dip,infonce,dime,lidar]"


@pytest.fixture
def cache_home(lw_cache, monkeypatch):
    monkeypatch.setenv("LW_CACHE_DIR", str(lw_cache))
    return lw_cache / "activations"


@pytest.fixture
def job_args(tmp_path):
    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": r["extract"]}) + "\n"
                            for r in wiki_records()[:10]))
    return ["model=minilm", "data=local", f"data.path={path}", "data.n_prompts=10",
            "data.max_tokens=40", f"metrics={METRICS}", "metric.lidar.J=3"]


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


# Tables from forward passes batched differently: another metric.lidar.J batches the view
# prompts otherwise (a cached J=3 pass serves a J=2 job), the workers below run one thread.
# float32 matmul kernels block, and so sum, by the batch's shape and thread count: hidden
# states agree to a few ulps (float32 eps 1.2e-7), a metric of them to that times its
# conditioning (seen: 4e-7 relative on some CPUs; one ulp on every weight of minilm moves
# dip/pvalue by 4.5e-6 relative). 1e-5 is ~80 float32 ulps.
RTOL = 1e-5


def assert_same_table(a, b):
    assert list(a.columns) == list(b.columns)
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=RTOL, atol=1e-12,
                               equal_nan=True)


def test_cached_rerun_with_other_knobs_equals_an_uncached_run(cache_home, job_args,
                                                              monkeypatch):
    first = compute(compose_job([*job_args, "extraction.cache=true"]))
    assert first.summary["activation_cache_hit"] == 0.0
    knobs = ["metric.prompt_entropy.alpha=2", "metric.normalizations=[raw,logD]",
             "metric.dime.alpha=2", "metric.lidar.J=2", "metric.infonce.tau=0.5"]
    uncached = compute(compose_job([*job_args, *knobs]))
    monkeypatch.setattr(lw.job.stages, "load_model", no_model)  # a hit must not need the model
    cached = compute(compose_job([*job_args, *knobs, "extraction.cache=true"]))
    assert cached.summary["activation_cache_hit"] == 1.0
    assert "prompt_entropy/logD" in cached.table and "prompt_entropy/max" not in cached.table
    assert_same_table(cached.table, uncached.table)
    assert_same_table(cached.per_prompt, uncached.per_prompt)
    assert len(list(cache_home.iterdir())) == 1  # one forward key for both jobs


def test_a_missing_product_reruns_the_forward_pass_and_keeps_both(cache_home, job_args,
                                                                  capfd):
    compute(compose_job([*job_args, "extraction.cache=true"]))                # paper spectra
    official = [*job_args, "metric.compat=official", "extraction.cache=true"]
    result = compute(compose_job(official))
    assert result.summary["activation_cache_hit"] == 0.0
    assert "lacks spectrum/official" in capfd.readouterr().err
    key = forward_hash(compose_job(official))
    held = cache.load(key).prompts.per_prompt
    assert {"spectrum/paper", "spectrum/official"} <= set(held)
    again = compute(compose_job(official))
    assert again.summary["activation_cache_hit"] == 1.0
    assert_same_table(again.table, result.table)


def test_keys_ignore_where_results_go_but_not_what_they_are(job_args):
    base = compose_job(job_args)
    assert forward_hash(base) == forward_hash(compose_job([*job_args, "extraction.batch_size=3",
                                                           "tracking.experiment=other"]))
    assert job_hash(base) != job_hash(compose_job([*job_args, "metric.prompt_entropy.alpha=2"]))
    assert forward_hash(base) == forward_hash(compose_job([*job_args, "metric.compat=official"]))
    for change in ("extraction.skip_first=1", "extraction.pooling=last", "seed=1",
                   "data.max_tokens=30", "perturbation=repetition"):
        assert forward_hash(compose_job([*job_args, change])) != forward_hash(base), change


def test_a_half_written_entry_is_a_miss_and_gets_rewritten(cache_home, job_args):
    job = compose_job([*job_args, "extraction.cache=true"])
    half = cache_home / forward_hash(job)
    half.mkdir(parents=True)
    (half / "products.pt").write_bytes(b"cut short")  # no meta.json: the write never ended
    assert cache.load(forward_hash(job)) is None
    compute(job)
    assert cache.load(forward_hash(job)) is not None
    assert not [p for p in cache_home.iterdir() if p.name.startswith(".")]  # no temp left


def test_the_cache_keeps_to_its_size_limit(cache_home, job_args, monkeypatch):
    compute(compose_job([*job_args, "extraction.cache=true"]))
    (first,) = list(cache_home.iterdir())
    monkeypatch.setenv("LW_CACHE_MAX_GB", str(1.5 * cache.entry_bytes(first) / 2**30))
    compute(compose_job([*job_args, "extraction.cache=true", "seed=1"]))
    kept = [p.name for p in cache_home.iterdir()]
    assert len(kept) == 1 and kept[0] != first.name  # the least recently used went


def test_data_errors_come_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(lw.job.stages, "load_model", no_model)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "Hi."}) + "\n")
    cases = {f"data.path={tmp_path}/missing.jsonl": "no such file",
             f"data.path={tmp_path}/empty.jsonl": "the file is empty",
             f"data.path={tmp_path}/short.jsonl data.text_field=body": "text_field='body'",
             f"data.path={tmp_path}/short.jsonl data.min_tokens=20": "min_tokens=20"}
    for overrides, message in cases.items():
        with pytest.raises(LwError, match=message):
            compute(compose_job(["model=minilm", "data=local", *overrides.split()]))


def test_more_prompts_than_records_says_so_at_once(monkeypatch):
    monkeypatch.setattr(lw.job.stages, "load_model", no_model)
    with pytest.warns(UserWarning, match=r"n_prompts=1000000: data 'wiki-vital' holds \d+"):
        with pytest.raises(AssertionError, match="the model was loaded"):
            compute(compose_job(["model=minilm", "data.n_prompts=1000000"]))


# --- corrupt entries, bad settings, many processes ------------------------------------------

def corrupt_bytes(entry):
    products = entry / "products.pt"
    data = bytearray(products.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)  # 4 KB inside, same size: as in the issue
    products.write_bytes(bytes(data))


def drop_meta_field(entry):
    meta = json.loads((entry / "meta.json").read_text())
    del meta["n_views"]
    (entry / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, said", [(corrupt_bytes, "does not match its sha256"),
                                          (drop_meta_field, "meta.json lacks n_views")])
def test_a_corrupt_entry_is_a_miss_that_says_so_and_is_rewritten(cache_home, job_args, capfd,
                                                                  damage, said):
    job = compose_job([*job_args, "extraction.cache=true"])
    first = compute(job)
    damage(cache_home / forward_hash(job))
    capfd.readouterr()
    again = compute(job)
    err = capfd.readouterr().err
    assert f"entry {forward_hash(job)} is unusable: " in err and said in err, err
    assert again.summary["activation_cache_hit"] == 0.0  # never a hit
    assert_same_table(again.table, first.table)
    hit = compute(job)  # rewritten: whole again
    assert hit.summary["activation_cache_hit"] == 1.0
    assert_same_table(hit.table, first.table)


def test_bad_cache_settings_fail_before_the_model_loads(tmp_path, job_args, monkeypatch):
    monkeypatch.setattr(lw.job.stages, "load_model", no_model)
    monkeypatch.setattr(lw.job.stages, "load_tokenizer", no_model)
    (tmp_path / "a-file").write_text("")
    cases = {("LW_CACHE_MAX_GB", "20GB"): "LW_CACHE_MAX_GB='20GB': .* positive number of GiB",
             ("LW_CACHE_MAX_GB", "-1"): "LW_CACHE_MAX_GB='-1'",
             ("LW_CACHE_DIR", str(tmp_path / "a-file" / "lw")): "cannot be written"}
    for (name, value), message in cases.items():
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(LwError, match=message):
                compute(compose_job([*job_args, "extraction.cache=true"]))


def test_a_read_only_cache_folder_is_one_error_line(tmp_path):
    """A folder its user may not write (under root: root without capabilities, which writes
    anywhere otherwise)."""
    import subprocess

    from conftest import PYTHON, cli_env, without_privileges

    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    code = ("from lw import errors\nfrom lw.job import cache\n"
            "try:\n    cache.check()\n"
            "except errors.LwError as error:\n    print(f'[lw] error: {error}')\n")
    done = subprocess.run(without_privileges([str(PYTHON), "-c", code]), capture_output=True,
                          text=True, env=cli_env(LW_CACHE_DIR=str(folder)), timeout=300, cwd="/")
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"[lw] error: LW_CACHE_DIR={folder}: "), lines
    assert "cannot be written" in lines[0] and "extraction.cache=false" in lines[0]


def test_the_cli_says_a_bad_cache_size_in_one_line_before_the_model_loads(tmp_path, job_args):
    from conftest import lw_cli

    done = lw_cli(tmp_path, *job_args, "extraction.cache=true",
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                  f"tracking.artifact_location={tmp_path}/a", f"hydra.run.dir={tmp_path}/run",
                  env={"LW_CACHE_MAX_GB": "20GB", "LW_CACHE_DIR": str(tmp_path / "c")})
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("[lw] error")]
    assert errors == ["[lw] error: LW_CACHE_MAX_GB='20GB': the activation cache's size limit "
                      "must be a positive number of GiB, without a unit (e.g. "
                      "LW_CACHE_MAX_GB=20 or 0.5)"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "results").exists()  # no pass ran


def test_stale_temporary_folders_go_and_young_ones_count(cache_home, monkeypatch):
    import os
    import time

    def folder_of(name, size, age_s=0.0):
        path = cache_home / name
        path.mkdir(parents=True)
        (path / "products.pt").write_bytes(bytes(size))
        then = time.time() - age_s
        for where in (path / "products.pt", path):
            os.utime(where, (then, then))
        return path

    entry = folder_of("entry", 1000, age_s=10)
    (entry / "meta.json").write_text("{}")
    folder_of(".other.abc", 2000)                                  # being written now
    folder_of(".killed.def", 5000, age_s=cache.STALE_TMP_S + 60)   # its writer was killed
    monkeypatch.setenv("LW_CACHE_MAX_GB", str(10_000 / 2**30))
    assert cache.evict() == [".killed.def"]  # 3002 bytes left: within the limit
    monkeypatch.setenv("LW_CACHE_MAX_GB", str(2500 / 2**30))
    assert cache.evict() == ["entry"]  # the young temporary counts, and is not removed
    assert [p.name for p in cache_home.iterdir()] == [".other.abc"]


WORKER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import compose_job
from lw.job.stages import compute
args, seeds, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
jobs = [compose_job([*args, "extraction.cache=true", f"seed={{s}}"]) for s in seeds]
(out / "ready").write_text("")
while not (out.parent / "go").exists():  # every worker starts its first job at once
    time.sleep(0.01)
tables = [compute(job).table.to_dict(orient="list") for job in jobs]
(out / "tables.json").write_text(json.dumps(tables))
"""


@pytest.mark.slow
def test_many_processes_storing_and_evicting_at_once(cache_home, job_args, tmp_path):
    """2 processes on the same job and 1 on another, each job three times, with a limit so
    small that every store evicts every other entry: all exit 0 with an uncached run's values.
    (More processes race no harder on 2 cores; each costs seconds of imports.)"""
    import subprocess
    import time

    from conftest import PYTHON, ROOT, cli_env

    plans = [[0, 0, 0]] * 2 + [[1, 1, 1]]
    job_args = [*job_args, "metrics=[prompt_entropy,curvature,dataset_entropy]"]  # light
    workers = []
    for n, seeds in enumerate(plans):
        out = tmp_path / "workers" / str(n)
        out.mkdir(parents=True)
        workers.append((subprocess.Popen(
            [str(PYTHON), "-c", WORKER.format(tests=str(ROOT / "tests")), json.dumps(job_args),
             json.dumps(seeds), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=cli_env(LW_CACHE_DIR=str(cache_home.parent), OMP_NUM_THREADS="1",
                                   LW_CACHE_MAX_GB="1e-9")), out, seeds))
    deadline = time.monotonic() + 600
    while not all((out / "ready").exists() for _, out, _ in workers):
        assert all(p.poll() is None for p, _, _ in workers), [p.communicate() for p, _, _
                                                              in workers if p.poll()]
        assert time.monotonic() < deadline, "workers never got ready"
        time.sleep(0.05)
    (tmp_path / "workers" / "go").write_text("")
    expected = {}
    for process, out, seeds in workers:
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        for seed, table in zip(seeds, json.loads((out / "tables.json").read_text()),
                               strict=True):
            if seed not in expected:  # an uncached run of the same job, in this process
                expected[seed] = compute(compose_job([*job_args, f"seed={seed}"])).table
            got = expected[seed].__class__(table)
            assert_same_table(got, expected[seed])
    left = list(cache_home.iterdir())
    assert len(left) <= 1 and not [p for p in left if p.name.startswith(".")], left
