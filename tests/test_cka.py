"""cka (lw.metrics.cka) against a float64 numpy reference written from the definitions, its
invariances, and a real job's matrix, curves, table and heat map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose_job
from lw.metrics.cka import cka_matrix


def hsic_biased(x: np.ndarray, y: np.ndarray) -> float:
    """||Y^T X||_F^2 on centered features (the feature-space form of tr(K L))."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2)


def hsic_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012), term by term, with explicit loops for the sums."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    n = len(x)
    k, l_ = x @ x.T, y @ y.T
    for i in range(n):
        k[i, i] = l_[i, i] = 0.0
    trace = sum(k[i, j] * l_[j, i] for i in range(n) for j in range(n))
    sum_k, sum_l = k.sum(), l_.sum()
    cross = sum(k[i, :] @ l_[:, j] for i in range(n) for j in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def reference(pooled: np.ndarray, debiased: bool) -> np.ndarray:
    hsic = hsic_unbiased if debiased else hsic_biased
    layers = pooled.shape[1]
    out = np.zeros((layers, layers))
    for a in range(layers):
        for b in range(layers):
            x, y = pooled[:, a], pooled[:, b]
            out[a, b] = hsic(x, y) / np.sqrt(hsic(x, x) * hsic(y, y))
    return out


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matches_numpy_reference(debiased):
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(12, 4, 6))
    pooled[:, 1] = pooled[:, 0] @ rng.normal(size=(6, 6)) + 0.3 * rng.normal(size=(12, 6))
    got = cka_matrix(torch.tensor(pooled, dtype=torch.float32), debiased=debiased).numpy()
    np.testing.assert_allclose(got, reference(pooled, debiased), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, got.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(got), 1.0, atol=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_one_under_orthogonal_transform_and_isotropic_scaling(debiased):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    pooled = np.stack([x, 3.5 * x @ q + 2.0, rng.normal(size=(20, 8))], axis=1)
    got = cka_matrix(torch.tensor(pooled), debiased=debiased).numpy()
    assert got[0, 1] == pytest.approx(1.0, abs=1e-9)
    assert got[0, 2] < 0.9  # unrelated vectors are not 1
    if debiased:  # unbiased: unrelated vectors come out near 0, the biased estimate does not
        assert abs(got[0, 2]) < abs(reference(pooled, False)[0, 2])


def test_cka_job_logs_matrix_curves_table_and_heat_map(tmp_path):
    from lw.job.stages import compute
    from lw.tracking.jobdir import save_result_files

    job = compose_job(["model=tiny-pythia", "data.n_prompts=10", "data.max_tokens=32",
                       "metrics=[cka]", "metric.cka.debiased=true"])
    result = compute(job)
    matrix = result.tables["cka_matrix"]
    n = result.info.n_layers + 1
    assert matrix.shape == (n, n + 1)
    values = matrix.drop(columns="layer").to_numpy()
    np.testing.assert_allclose(np.diag(values), 1.0, atol=1e-9)
    np.testing.assert_allclose(result.table["cka/to_last"], values[:, -1])
    np.testing.assert_allclose(result.table["cka/to_next"][:-1], np.diag(values, 1))
    assert np.isnan(result.table["cka/to_next"].iloc[-1])
    figures = {k: v for make in result.figures.values() for k, v in make(result, "t").items()}
    assert list(figures) == ["cka_matrix"]
    save_result_files(result, tmp_path)
    assert (tmp_path / "cka_matrix.csv").read_text().startswith("layer,0,1")
