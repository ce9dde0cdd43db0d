"""layer_distance (lw.metrics.layer_distance) against a float64 numpy reference (arccos of the
cosine, token by token), on random states and on a real job's forward pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import compose_job
from lw.metrics.layer_distance import angular_distances


def reference(hidden: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """(L+1, B): per prompt, mean over masked tokens of arccos(cos(h_l, h_{l+n})) / pi."""
    states, batch, width = hidden.shape[:3]
    out = np.full((states, batch), np.nan)
    for layer in range(states - n):
        for b in range(batch):
            angles = []
            for t in range(width):
                if mask[b, t]:
                    u, v = hidden[layer, b, t], hidden[layer + n, b, t]
                    cos = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
                    angles.append(math.acos(np.clip(cos, -1, 1)) / math.pi)
            out[layer, b] = np.mean(angles) if angles else np.nan
    return out


@pytest.mark.parametrize("n", [1, 2, 4])
def test_angular_distances_match_numpy_reference(n):
    rng = np.random.default_rng(n)
    hidden = rng.normal(size=(5, 3, 7, 6))
    hidden[2] = hidden[1] * 2.0 + 1e-3 * rng.normal(size=(3, 7, 6))  # nearly parallel states
    mask = np.ones((3, 7), dtype=bool)
    mask[1, 4:] = False
    mask[2, :2] = False
    got = angular_distances(torch.tensor(hidden, dtype=torch.float32), torch.tensor(mask), n)
    np.testing.assert_allclose(got.numpy(), reference(hidden, mask, n), rtol=1e-5, atol=1e-6)
    if n == 1:  # the near-parallel pair: a small distance, got without arccos's float32 loss
        assert got[1].max() < 1e-3


def test_layer_distance_job_matches_plain_forward_pass():
    from lw.job.stages import compute, plan_job
    from lw.loading.models import load_model, load_tokenizer

    job = compose_job(["model=tiny-pythia", "data.n_prompts=6", "data.max_tokens=32",
                       "extraction.skip_first=1", "metrics=[layer_distance]",
                       "metric.layer_distance.max_n=2"])
    result = compute(job)
    plan = plan_job(job, load_tokenizer(job.model))
    model = load_model(job.model, torch.device("cpu"), seed=job.seed).model
    sums, tokens = {1: 0.0, 2: 0.0}, 0
    for prompt in plan.ids:
        with torch.inference_mode():
            states = model(input_ids=torch.tensor([prompt]), output_hidden_states=True)\
                .hidden_states
        hidden = torch.stack(states).double().numpy()[:, :, 1:]          # skip_first=1
        mask = np.ones(hidden.shape[1:3], dtype=bool)
        for n in sums:
            sums[n] = sums[n] + reference(hidden, mask, n)[:, 0] * mask.sum()
        tokens += mask.sum()
    for n in sums:
        np.testing.assert_allclose(result.table[f"layer_distance/n{n}"], sums[n] / tokens,
                                   rtol=1e-4, atol=1e-6)
        curve = result.table[f"layer_distance/n{n}"]
        assert result.summary[f"summary/layer_distance/n{n}/min_layer"] == curve.idxmin()
    start = int(result.summary["summary/layer_distance/n2/min_layer"])
    assert result.tags["lw.layer_distance.prunable"].startswith(
        f"blocks {start + 1}-{start + 2} ")


def test_layer_distance_products_are_cached_and_a_larger_max_n_runs_the_pass(lw_cache,
                                                                             monkeypatch):
    from lw.job.stages import compute

    monkeypatch.setenv("LW_CACHE_DIR", str(lw_cache))
    job = ["model=tiny-pythia", "data.n_prompts=6", "data.max_tokens=32",
           "metrics=[layer_distance]", "extraction.cache=true"]
    first = compute(compose_job([*job, "metric.layer_distance.max_n=2"]))
    again = compute(compose_job([*job, "metric.layer_distance.max_n=1"]))
    assert first.summary["activation_cache_hit"] == 0 and again.summary["activation_cache_hit"]
    np.testing.assert_array_equal(again.table["layer_distance/n1"],
                                  first.table["layer_distance/n1"])
    more = compute(compose_job([*job, "metric.layer_distance.max_n=3"]))
    assert more.summary["activation_cache_hit"] == 0  # n=3 was not in the entry
    np.testing.assert_allclose(more.table["layer_distance/n2"], first.table["layer_distance/n2"],
                               rtol=1e-12)
