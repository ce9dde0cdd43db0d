"""svcca (lw.metrics.svcca) against a float64 numpy reference written from the definition,
against google/svcca's own computation (followed step by step in numpy), its invariances, what
it does with few prompts or a constant layer, its knob, and a real job's matrix, curves, table
and heat map."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import compose_job
from lw.errors import ConfigError
from lw.metrics.svcca import SVCCAKnobs, svcca_between


def kept(s: np.ndarray, keep: float) -> int:
    """The fewest leading directions whose variances make up ``keep`` of the total (a loop)."""
    total, running = float(np.sum(s ** 2)), 0.0
    for k, value in enumerate(s, start=1):
        running += value ** 2
        if running >= keep * total:
            return k
    return len(s)


def cca_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations of full-rank centred x, y from the covariances:
    singular values of Sxx^-1/2 Sxy Syy^-1/2 (scipy's matrix square root)."""
    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y
    wx = np.linalg.inv(scipy.linalg.sqrtm(sxx).real)
    wy = np.linalg.inv(scipy.linalg.sqrtm(syy).real)
    return np.linalg.svd(wx @ sxy @ wy, compute_uv=False)


def svcca_reference(x: np.ndarray, y: np.ndarray, keep: float) -> float:
    """Centre, keep the top directions holding ``keep`` of the variance, CCA, mean correlation."""
    reduced = []
    for z in (x, y):
        z = z - z.mean(axis=0)
        u, s, _ = np.linalg.svd(z, full_matrices=False)
        k = kept(s, keep)
        reduced.append(u[:, :k] * s[:k])
    return float(np.mean(cca_correlations(*reduced)))


def svcca_as_google(acts1: np.ndarray, acts2: np.ndarray, k1: int, k2: int) -> float:
    """As google/svcca computes it (tutorials/001_Introduction.ipynb, "Results using SVCCA
    keeping 20 dims", then cca_core.get_cca_similarity with epsilon=0): acts are (units,
    datapoints); centre each unit, np.linalg.svd, keep s[:k] * eye(k) @ V[:k]; then the
    covariance by np.cov, rescaled by its largest entry, remove_small (nothing at epsilon 0),
    epsilon * eye added, pinv, matrix square roots by eigh (positivedef_matrix_sqrt), the SVD of
    invsqrt_xx sigma_xy invsqrt_yy, and np.mean(cca_coef1)."""
    def reduce(acts, k):
        cacts = acts - np.mean(acts, axis=1, keepdims=True)
        _, s, v = np.linalg.svd(cacts, full_matrices=False)
        return np.dot(s[:k] * np.eye(k), v[:k])

    def sqrtm_eigh(array):
        w, v = np.linalg.eigh(array)
        return v @ np.diag(np.sqrt(w)) @ v.conj().T

    sv1, sv2 = reduce(acts1, k1), reduce(acts2, k2)
    epsilon = 0.0
    covariance = np.cov(sv1, sv2)
    sxx, sxy, syy = covariance[:k1, :k1], covariance[:k1, k1:], covariance[k1:, k1:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    sxx = sxx + epsilon * np.eye(k1)
    syy = syy + epsilon * np.eye(k2)
    invsqrt_xx = sqrtm_eigh(np.linalg.pinv(sxx))
    invsqrt_yy = sqrtm_eigh(np.linalg.pinv(syy))
    s = np.abs(np.linalg.svd(invsqrt_xx @ sxy @ invsqrt_yy, compute_uv=False))
    return float(np.mean(s))


def related(rng, n: int, layers: int, width: int, base: np.ndarray) -> np.ndarray:
    """``(n, layers, width)``: noisy linear maps of ``base``, more noise deeper, units of
    unequal scales (so that the SVD step keeps fewer directions than units)."""
    scales = np.geomspace(3, 0.1, width)
    return np.stack([(base @ rng.normal(size=(base.shape[1], width))
                      + 0.5 * (layer + 1) * rng.normal(size=(n, width))) * scales
                     for layer in range(layers)], axis=1)


def score(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    return svcca_between(torch.tensor(x)[:, None], torch.tensor(y)[:, None], keep=keep).item()


@pytest.mark.parametrize("keep", [0.9, 0.99, 1.0])
def test_svcca_matches_numpy_reference_within_and_across_models(keep):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 5))
    a, b = related(rng, 60, 4, 8, base), related(rng, 60, 3, 11, base)  # La != Lb, Da != Db
    across = svcca_between(torch.tensor(a, dtype=torch.float32), torch.tensor(b), keep=keep)
    expected = [[svcca_reference(a[:, i].astype(np.float32).astype(np.float64), b[:, j], keep)
                 for j in range(3)] for i in range(4)]
    assert across.shape == (4, 3) and across.dtype == torch.float64
    np.testing.assert_allclose(across.numpy(), expected, atol=1e-10)
    within = svcca_between(torch.tensor(a), torch.tensor(a), keep=keep).numpy()
    expected = [[svcca_reference(a[:, i], a[:, j], keep) for j in range(4)] for i in range(4)]
    np.testing.assert_allclose(within, expected, atol=1e-10)
    np.testing.assert_allclose(within, within.T, atol=1e-14)
    np.testing.assert_allclose(np.diag(within), 1.0, atol=1e-12)


def test_svcca_is_what_google_svcca_computes():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6)) * [5, 4, 3, 0.3, 0.2, 0.1]   # 3 strong directions, 3 weak
    y = np.hstack([x[:, :3] @ rng.normal(size=(3, 4)), 0.1 * rng.normal(size=(50, 4))])
    y = y + 0.3 * rng.normal(size=(50, 8))
    sx = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    sy = np.linalg.svd(y - y.mean(axis=0), compute_uv=False)
    # the tutorials fix k by hand: here the k that keep gives, counted in numpy
    ks = {keep: (kept(sx, keep), kept(sy, keep)) for keep in (0.99, 0.999, 0.9995, 1.0)}
    assert list(ks.values()) == [(3, 2), (4, 6), (5, 7), (6, 8)]
    for keep, (k1, k2) in ks.items():
        google = svcca_as_google(x.T, y.T, k1, k2)   # google/svcca takes (units, datapoints)
        assert score(x, y, keep) == pytest.approx(google, abs=1e-9), keep


def test_svcca_is_invariant_to_rotation_scaling_translation_and_unit_order_not_prompt_order():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8)) * np.geomspace(3, 0.1, 8)
    y = x @ rng.normal(size=(8, 10)) + 0.8 * rng.normal(size=(40, 10))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    transformed = {"rotated": x @ q, "scaled and moved": 3.5 * x + 2.0,
                   "units permuted": x[:, rng.permutation(8)]}
    base = score(x, y)
    for name, x2 in transformed.items():
        assert score(x, x2) == pytest.approx(1.0, abs=1e-12), name
        assert score(x2, y) == pytest.approx(base, abs=1e-10), name
    assert score(x, y[rng.permutation(40)]) < base - 0.2  # prompts of one side shuffled
    assert score(x, x.copy()) == pytest.approx(1.0, abs=1e-12)
    # any invertible map of the units: plain CCA (keep=1) does not see it, the SVD step does
    stretch = rng.normal(size=(8, 8)) @ np.diag(np.geomspace(10, 0.01, 8))
    assert score(x @ stretch, y, keep=1.0) == pytest.approx(score(x, y, keep=1.0), abs=1e-9)
    assert abs(score(x @ stretch, y) - base) > 0.01


def test_few_prompts_push_svcca_to_one_and_a_constant_layer_is_nan():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 20)), rng.normal(size=(8, 30))   # unrelated, N - 1 = 7 < widths
    assert score(x, y, keep=1.0) == pytest.approx(1.0, abs=1e-9)  # kx + ky - 7 shared directions
    assert score(x, y, keep=0.5) < 0.9                            # few kept directions: below 1
    pooled = torch.tensor(np.stack([rng.normal(size=(7, 5)), np.full((7, 5), 0.1)], axis=1))
    got = svcca_between(pooled, pooled).numpy()
    assert got[0, 0] == pytest.approx(1.0) and np.isnan(got[1]).all() and np.isnan(got[:, 1]).all()


def test_keep_must_be_in_zero_one():
    assert SVCCAKnobs().keep == 0.99
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match=rf"metric.svcca.keep={bad}: must be in \(0, 1\]"):
            SVCCAKnobs(keep=bad)
    with pytest.raises(ConfigError, match=r"metric\.svcca\.keep=-1"):
        compose_job(["metric.svcca.keep=-1"])


@pytest.mark.slow
def test_svcca_job_logs_matrix_curves_table_and_heat_map(tmp_path):
    from lw.job.stages import compute
    from lw.tracking.jobdir import save_result_files

    job = compose_job(["model=tiny-pythia", "data.n_prompts=10", "data.max_tokens=32",
                       "metrics=[svcca]", "metric.svcca.keep=0.5"])
    result = compute(job)
    matrix = result.tables["svcca_matrix"]
    n = result.info.n_layers + 1
    assert matrix.shape == (n, n + 1)
    values = matrix.drop(columns="layer").to_numpy()
    np.testing.assert_allclose(np.diag(values), 1.0, atol=1e-9)
    np.testing.assert_allclose(values, values.T, atol=1e-12)
    assert np.all((values > 0) & (values <= 1 + 1e-9))
    np.testing.assert_allclose(result.table["svcca/to_last"], values[:, -1])
    np.testing.assert_allclose(result.table["svcca/to_next"][:-1], np.diag(values, 1))
    assert np.isnan(result.table["svcca/to_next"].iloc[-1])
    figures = {k: v for make in result.figures.values() for k, v in make(result, "t").items()}
    assert list(figures) == ["svcca_matrix"]
    save_result_files(result, tmp_path)
    assert (tmp_path / "svcca_matrix.csv").read_text().startswith("layer,0,1")
