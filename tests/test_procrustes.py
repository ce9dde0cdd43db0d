"""procrustes (lw.metrics.procrustes) against a float64 numpy reference written from the
definition (the minimum over orthogonal maps, by scipy), against Ding et al.'s and netrep's own
computations (followed step by step in numpy), its invariances, a constant layer, and a real
job's matrix, curves, table and heat map."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import compose_job
from lw.metrics.procrustes import procrustes_between


def procrustes_reference(x: np.ndarray, y: np.ndarray) -> float:
    """min over Q with orthonormal columns of ||X - Y Q||_F^2, X and Y centred and scaled to
    unit Frobenius norm, the narrower one zero-padded to the other's width; Q by
    scipy.linalg.orthogonal_procrustes (argmin_Q ||Y Q - X||_F)."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    width = max(x.shape[1], y.shape[1])
    x = np.pad(x, ((0, 0), (0, width - x.shape[1])))
    y = np.pad(y, ((0, 0), (0, width - y.shape[1])))
    q, _ = scipy.linalg.orthogonal_procrustes(y, x)
    return float(np.linalg.norm(x - y @ q) ** 2)


def procrustes_as_ding(rep1: np.ndarray, rep2: np.ndarray) -> float:
    """As Ding et al. compute it (js-d/sim_metric, dists/score_pair.py score_local_pair, then
    dists/scoring.py procrustes): reps are (units, datapoints); centre each row, divide by the
    Frobenius norm, ||A||_F^2 + ||B||_F^2 - 2 ||A B^T||_*."""
    rep1 = rep1 - rep1.mean(axis=1, keepdims=True)
    rep2 = rep2 - rep2.mean(axis=1, keepdims=True)
    rep1, rep2 = rep1 / np.linalg.norm(rep1), rep2 / np.linalg.norm(rep2)
    nuc = np.linalg.norm(rep1 @ rep2.T, ord="nuc")
    return float(np.sum(rep1 ** 2) + np.sum(rep2 ** 2) - 2 * nuc)


def angle_as_netrep(x: np.ndarray, y: np.ndarray) -> float:
    """As netrep computes it: LinearMetric(alpha=1, center_columns=True, zero_pad=True,
    score_method="angular").fit_score(X, Y): zero-pad the narrower, centre the columns, no
    whitening at alpha=1, U, _, Vt = svd(Xw.T @ Yw), Wx = U, Wy = Vt.T, and angular_distance:
    arccos of the normalised Frobenius inner product of the aligned matrices."""
    width = max(x.shape[1], y.shape[1])
    x = np.pad(x, ((0, 0), (0, width - x.shape[1])))
    y = np.pad(y, ((0, 0), (0, width - y.shape[1])))
    xw, yw = x - x.mean(axis=0), y - y.mean(axis=0)
    u, _, vt = np.linalg.svd(xw.T @ yw)
    tx, ty = xw @ u, yw @ vt.T
    normalizer = np.linalg.norm(tx.ravel()) * np.linalg.norm(ty.ravel())
    corr = np.dot(tx.ravel(), ty.ravel()) / normalizer
    return float(np.arccos(np.clip(corr, -1.0, 1.0)))


def related(rng, n: int, layers: int, width: int, base: np.ndarray) -> np.ndarray:
    """``(n, layers, width)``: noisy linear maps of ``base``, more noise deeper."""
    return np.stack([base @ rng.normal(size=(base.shape[1], width))
                     + 0.5 * (layer + 1) * rng.normal(size=(n, width)) + 3.0
                     for layer in range(layers)], axis=1)


def score(x: np.ndarray, y: np.ndarray) -> float:
    return procrustes_between(torch.tensor(x)[:, None], torch.tensor(y)[:, None]).item()


@pytest.mark.parametrize("n", [40, 12])  # more prompts than units, and fewer
def test_procrustes_matches_numpy_reference_within_and_across_models(n):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(n, 5))
    a, b = related(rng, n, 4, 8, base), related(rng, n, 3, 15, base)  # La != Lb, Da != Db
    across = procrustes_between(torch.tensor(a, dtype=torch.float32), torch.tensor(b))
    a32 = a.astype(np.float32).astype(np.float64)
    expected = [[procrustes_reference(a32[:, i], b[:, j]) for j in range(3)] for i in range(4)]
    assert across.shape == (4, 3) and across.dtype == torch.float64
    np.testing.assert_allclose(across.numpy(), expected, atol=1e-10)
    within = procrustes_between(torch.tensor(a), torch.tensor(a)).numpy()
    expected = [[procrustes_reference(a[:, i], a[:, j]) for j in range(4)] for i in range(4)]
    np.testing.assert_allclose(within, expected, atol=1e-10)
    np.testing.assert_allclose(within, within.T, atol=1e-14)
    np.testing.assert_allclose(np.diag(within), 0.0, atol=1e-12)
    assert np.all((within >= 0) & (within <= 2))


def test_procrustes_is_what_ding_et_al_compute_and_netreps_angle_in_another_form():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 6)) + 1.0
    y = np.hstack([x @ rng.normal(size=(6, 4)), rng.normal(size=(30, 5))])
    for a, b in ((x, y), (y, x), (x, 2 * x[:, ::-1] + 5)):
        assert score(a, b) == pytest.approx(procrustes_as_ding(a.T, b.T), abs=1e-10)
        assert score(a, b) == pytest.approx(2 - 2 * np.cos(angle_as_netrep(a, b)), abs=1e-10)
    assert 0.2 < score(x, y) < 1.8  # related layers: neither 0 nor 2


def test_procrustes_is_invariant_to_rotation_scaling_translation_and_unit_order_only():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8))
    y = x @ rng.normal(size=(8, 10)) + 0.8 * rng.normal(size=(40, 10))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    transformed = {"rotated": x @ q, "scaled and moved": 3.5 * x + 2.0,
                   "units permuted": x[:, rng.permutation(8)]}
    base = score(x, y)
    for name, x2 in transformed.items():
        assert score(x, x2) == pytest.approx(0.0, abs=1e-12), name
        assert score(x2, y) == pytest.approx(base, abs=1e-10), name
    wider, _ = np.linalg.qr(rng.normal(size=(12, 8)))  # Y = X Q, Q 8 x 12 orthonormal rows
    assert score(x, x @ wider.T) == pytest.approx(0.0, abs=1e-12)
    assert score(x @ rng.normal(size=(8, 8)), y) != pytest.approx(base, abs=1e-3)  # not CCA
    assert score(x, y[rng.permutation(40)]) > base + 0.2  # prompts of one side shuffled
    assert score(x, x.copy()) == 0.0


def test_a_constant_layer_is_nan():
    rng = np.random.default_rng(2)
    pooled = torch.tensor(np.stack([rng.normal(size=(7, 5)), np.full((7, 5), 0.1)], axis=1))
    got = procrustes_between(pooled, pooled).numpy()
    assert got[0, 0] == 0.0 and np.isnan(got[1]).all() and np.isnan(got[:, 1]).all()
    other = procrustes_between(torch.tensor(rng.normal(size=(7, 2, 3))), pooled).numpy()
    assert np.isfinite(other[:, 0]).all() and np.isnan(other[:, 1]).all()


@pytest.mark.slow
def test_procrustes_job_logs_matrix_curves_table_and_heat_map(tmp_path):
    from lw.job.stages import compute
    from lw.tracking.jobdir import save_result_files

    job = compose_job(["model=tiny-pythia", "data.n_prompts=10", "data.max_tokens=32",
                       "metrics=[procrustes]"])
    result = compute(job)
    matrix = result.tables["procrustes_matrix"]
    n = result.info.n_layers + 1
    assert matrix.shape == (n, n + 1)
    values = matrix.drop(columns="layer").to_numpy()
    np.testing.assert_allclose(np.diag(values), 0.0, atol=1e-9)
    np.testing.assert_allclose(values, values.T, atol=1e-12)
    assert np.all((values >= 0) & (values <= 2))
    np.testing.assert_allclose(result.table["procrustes/to_last"], values[:, -1])
    np.testing.assert_allclose(result.table["procrustes/to_next"][:-1], np.diag(values, 1))
    assert np.isnan(result.table["procrustes/to_next"].iloc[-1])
    figures = {k: v for make in result.figures.values() for k, v in make(result, "t").items()}
    assert list(figures) == ["procrustes_matrix"]
    assert figures["procrustes_matrix"].axes[0].images[0].get_clim() == (0.0, 2.0)
    save_result_files(result, tmp_path)
    assert (tmp_path / "procrustes_matrix.csv").read_text().startswith("layer,0,1")
