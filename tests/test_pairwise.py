"""Pairwise measures (lw.metrics.pairwise): calibration against the permutation null, checked
with a float64 numpy reference of linear CKA, and a job with calibrate=true logging the raw,
null and calibrated curves and matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose_job
from lw.metrics.cka import cka_between
from lw.metrics.pairwise import calibrated, null_of


def cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2
                 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_the_null_is_the_score_on_shuffled_prompts_and_calibration_maps_it_to_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(24, 3, 5))
    b = rng.normal(size=(24, 2, 7))
    null = null_of(cka_between, torch.tensor(a), torch.tensor(b), permutations=6, seed=3)
    generator = torch.Generator().manual_seed(3)
    for p in range(6):
        order = torch.randperm(24, generator=generator).numpy()
        expected = [[cka_reference(a[:, i], b[order, j]) for j in range(2)] for i in range(3)]
        np.testing.assert_allclose(null[p].numpy(), expected, rtol=1e-10)
    score = cka_between(torch.tensor(a), torch.tensor(b))
    mean = null.mean(dim=0)
    scaled = calibrated(score, mean, best=1.0).numpy()
    np.testing.assert_allclose(scaled, (score.numpy() - mean.numpy()) / (1 - mean.numpy()))
    assert np.all(calibrated(mean, mean, 1.0).numpy() == 0)
    assert np.all(calibrated(torch.ones(3, 2, dtype=torch.float64), mean, 1.0).numpy() == 1)


def test_biased_cka_of_independent_data_is_far_above_zero_and_calibrated_near_zero():
    """The bias Gröger et al. point at: CKA reads well above 0 on independent vectors at small
    N; against its permutation null it reads about 0."""
    rng = np.random.default_rng(1)
    a, b = torch.tensor(rng.normal(size=(32, 1, 64))), torch.tensor(rng.normal(size=(32, 1, 64)))
    raw = cka_between(a, b)
    null = null_of(cka_between, a, b, permutations=50, seed=0).mean(dim=0)
    assert raw.item() > 0.5
    assert abs(calibrated(raw, null, 1.0).item()) < 0.1


@pytest.mark.slow
def test_a_job_with_calibration_logs_raw_null_and_calibrated_curves_and_matrices():
    from lw.job.stages import compute

    job = compose_job(["model=tiny-pythia", "data=wiki-vital", "data.n_prompts=12",
                       "metrics=[cka]", "metric.cka.calibrate=true",
                       "metric.cka.permutations=3"])
    result = compute(job)
    table = result.table
    for suffix in ("", "_null", "_calibrated"):
        assert f"cka/to_last{suffix}" in table and f"cka/to_next{suffix}" in table
        assert f"cka_matrix{suffix}" in result.tables
    raw = result.tables["cka_matrix"].drop(columns="layer").to_numpy()
    null = result.tables["cka_matrix_null"].drop(columns="layer").to_numpy()
    scaled = result.tables["cka_matrix_calibrated"].drop(columns="layer").to_numpy()
    np.testing.assert_allclose(scaled, (raw - null) / (1 - null), rtol=1e-9)
    np.testing.assert_allclose(np.diag(scaled), 1.0)  # a layer against itself
    assert table["cka/to_last_calibrated"].iloc[-1] == pytest.approx(1.0)
