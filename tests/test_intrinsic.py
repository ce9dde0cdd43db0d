"""intrinsic_dimension (TwoNN) against a float64 numpy reference written from Facco et al. /
dadapy's compute_id_2NN, on data of known dimension, and as a data-set metric of a job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from conftest import compose_job
from lw.metrics.functional.intrinsic import twonn


def twonn_reference(x: np.ndarray, fraction: float = 0.9) -> float:
    """One data set, loops: mu_i = r2/r1, sorted; fit -ln(1 - i/N) = d ln mu over the first
    floor(fraction N) by least squares through the origin (dadapy's "base" algorithm)."""
    distances = cdist(x, x)
    mus = []
    for i in range(len(x)):
        others = np.sort(np.delete(distances[i], i))
        if others[0] > 0:
            mus.append(others[1] / others[0])
    mus = np.sort(np.log(mus))
    n = len(mus)
    kept = int(np.floor(fraction * n))
    y = -np.log(1 - np.arange(1, kept + 1) / n)
    return float(np.linalg.lstsq(mus[:kept, None], y, rcond=None)[0][0])


def test_twonn_matches_the_reference_batched_over_layers():
    generator = np.random.default_rng(0)
    layers = generator.normal(size=(3, 120, 16)) * np.array([1.0, 0.1, 5.0])[:, None, None]
    layers[1] = layers[1] @ generator.normal(size=(16, 16))
    found = twonn(torch.tensor(layers), fraction=0.8)
    for layer in range(3):
        assert found[layer] == pytest.approx(twonn_reference(layers[layer], 0.8), rel=1e-10)


@pytest.mark.parametrize("dimension", [1, 3, 6])
def test_twonn_finds_the_dimension_of_a_linear_manifold(dimension):
    generator = np.random.default_rng(dimension)
    latent = generator.uniform(size=(1500, dimension))
    embedded = latent @ generator.normal(size=(dimension, 40))       # a d-plane in 40-D
    assert twonn(torch.tensor(embedded)).item() == pytest.approx(dimension, rel=0.12)


def test_twonn_over_several_blocks_of_rows_matches_the_reference():
    """4,500 points: the distances are taken in 2 blocks of rows (2**24 // N rows each)."""
    points = np.random.default_rng(5).normal(size=(4500, 3))
    assert twonn(torch.tensor(points)).item() == pytest.approx(twonn_reference(points),
                                                               rel=1e-10)


@pytest.mark.parametrize("n", [1, 2])
def test_twonn_needs_three_points(n):
    from lw.errors import LwError

    with pytest.raises(LwError, match=f"at least 3 points, got {n}"):
        twonn(torch.zeros(2, n, 4))


def test_duplicates_are_left_out():
    generator = np.random.default_rng(3)
    points = generator.normal(size=(200, 4))
    doubled = np.concatenate([points, points[:20]])                   # 20 points twice
    assert twonn(torch.tensor(doubled)).item() == pytest.approx(
        twonn_reference(doubled), rel=1e-10)
    assert np.isfinite(twonn(torch.tensor(doubled)).item())


def test_intrinsic_dimension_is_a_per_layer_curve_of_a_job():
    from lw.job.stages import compute

    job = compose_job(["model=tiny-pythia", "data=wiki-vital", "data.n_prompts=24",
                       "data.max_tokens=32", "metrics=[intrinsic_dimension]",
                       "extraction.cache=false"])
    result = compute(job)
    curve = result.table["intrinsic_dimension"].to_numpy()
    assert len(curve) == result.info.n_layers + 1 and np.isfinite(curve).all()
    assert (curve > 0).all()
