"""The activation cache on minilm (real weights) over real text: a cached job with other metric
knobs gives what an uncached job with those knobs gives, without loading the model; entries are
whole or absent, and the cache keeps to its size limit. Also: data errors come before the
model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lw.job
from conftest import compose_job, wiki_records
from lw import cache
from lw.config import LwError
from lw.identity import forward_hash, job_hash
from lw.job import compute

METRICS = "[prompt_entropy,curvature,dataset_entropy,dip,infonce,dime,lidar]"


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "activations"


@pytest.fixture
def job_args(tmp_path):
    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": r["extract"]}) + "\n"
                            for r in wiki_records()[:10]))
    return ["model=minilm", "data=local", f"data.path={path}", "data.n_prompts=10",
            "data.max_tokens=40", f"metrics={METRICS}", "metric.lidar.J=3"]


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


def assert_same_table(a, b):
    assert list(a.columns) == list(b.columns)
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-9, atol=1e-12,
                               equal_nan=True)


def test_cached_rerun_with_other_knobs_equals_an_uncached_run(cache_home, job_args,
                                                              monkeypatch):
    first = compute(compose_job([*job_args, "extraction.cache=true"]))
    assert first.summary["activation_cache_hit"] == 0.0
    knobs = ["metric.prompt_entropy.alpha=2", "metric.normalizations=[raw,logD]",
             "metric.dime.alpha=2", "metric.lidar.J=2", "metric.infonce.tau=0.5"]
    uncached = compute(compose_job([*job_args, *knobs]))
    monkeypatch.setattr(lw.job, "load_model", no_model)  # a hit must not need the model
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
    monkeypatch.setattr(lw.job, "load_model", no_model)
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
    monkeypatch.setattr(lw.job, "load_model", no_model)
    with pytest.warns(UserWarning, match=r"n_prompts=1000000: data 'wiki-vital' holds \d+"):
        with pytest.raises(AssertionError, match="the model was loaded"):
            compute(compose_job(["model=minilm", "data.n_prompts=1000000"]))
