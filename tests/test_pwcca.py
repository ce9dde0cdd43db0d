"""pwcca (lw.metrics.pwcca) against a float64 numpy reference written from the definition,
against google/svcca's own computation (followed step by step in numpy, where it agrees and
where its pwcca.py does not), its invariances, its epsilon, what it does with few prompts or a
constant layer, and a real job's matrix, curves, table and heat map."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import compose_job
from lw.errors import ConfigError
from lw.metrics.pwcca import PWCCAKnobs, pwcca_between


def pwcca_reference(x: np.ndarray, y: np.ndarray) -> float:
    """From the definition, for more prompts than units: centre; weight the variates of the
    layer of lower rank (x on a tie); CCA from the covariances, whitening by scipy's matrix
    square root; h_i = X Sxx^-1/2 u_i scaled to unit length; a_i = sum_j |<h_i, x_j>|."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    if np.linalg.matrix_rank(y) < np.linalg.matrix_rank(x):
        x, y = y, x
    wx = np.linalg.inv(scipy.linalg.sqrtm(x.T @ x).real)
    wy = np.linalg.inv(scipy.linalg.sqrtm(y.T @ y).real)
    u, rho, _ = np.linalg.svd(wx @ (x.T @ y) @ wy)
    total = weighted = 0.0
    for i in range(len(rho)):
        h = x @ wx @ u[:, i]
        h = h / np.linalg.norm(h)
        a_i = sum(abs(h @ x[:, j]) for j in range(x.shape[1]))
        total, weighted = total + a_i, weighted + a_i * rho[i]
    return weighted / total


def google_cca(acts1: np.ndarray, acts2: np.ndarray, epsilon: float) -> dict:
    """cca_core.get_cca_similarity(acts1, acts2, epsilon, compute_coefs=True) as google/svcca
    computes it: acts are (units, datapoints); np.cov, rescaled by the largest entries,
    remove_small (units whose rescaled variance is below epsilon dropped), epsilon * eye added,
    pinv, square roots by eigh (positivedef_matrix_sqrt), np.linalg.svd."""
    def sqrtm_eigh(array):
        w, v = np.linalg.eigh(array)
        return v @ np.diag(np.sqrt(w)) @ v.conj().T

    numx = len(acts1)
    covariance = np.cov(acts1, acts2)
    sxx, sxy = covariance[:numx, :numx], covariance[:numx, numx:]
    syx, syy = covariance[numx:, :numx], covariance[numx:, numx:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy = sxx / xmax, syy / ymax
    sxy, syx = sxy / np.sqrt(xmax * ymax), syx / np.sqrt(xmax * ymax)
    x_idxs, y_idxs = np.abs(np.diagonal(sxx)) >= epsilon, np.abs(np.diagonal(syy)) >= epsilon
    sxx, sxy, syy = sxx[x_idxs][:, x_idxs], sxy[x_idxs][:, y_idxs], syy[y_idxs][:, y_idxs]
    sxx = sxx + epsilon * np.eye(len(sxx))
    syy = syy + epsilon * np.eye(len(syy))
    invsqrt_xx = sqrtm_eigh(np.linalg.pinv(sxx))
    invsqrt_yy = sqrtm_eigh(np.linalg.pinv(syy))
    u, s, v = np.linalg.svd(invsqrt_xx @ sxy @ invsqrt_yy)
    return {"coef_x": u.T, "coef_y": v, "invsqrt_xx": invsqrt_xx, "invsqrt_yy": invsqrt_yy,
            "x_idxs": x_idxs, "y_idxs": y_idxs, "cca_coef1": np.abs(s),
            "neuron_means1": acts1.mean(axis=1, keepdims=True),
            "neuron_means2": acts2.mean(axis=1, keepdims=True)}


def pwcca_as_google(acts1: np.ndarray, acts2: np.ndarray, epsilon: float = 0.0,
                    whiten: bool = True) -> float:
    """pwcca.compute_pwcca as google/svcca computes it: the side with fewer kept units (acts1
    on a tie), its directions orthonormalised by np.linalg.qr, weights sum_j |<p_i, act_j>| over
    the kept units' activations, normalised, against cca_coef1.

    ``whiten=False``: the directions of its current pwcca.py,
    ``coef_x @ (acts - mean) + mean``; ``whiten=True``: those of get_cca_similarity's
    compute_dirns branch, ``cca_dirns1 = coef_x @ invsqrt_xx @ (acts - mean) + mean`` (the
    canonical variates; written on the kept units, which is what full_coef_x @ full_invsqrt_xx
    does when none is dropped)."""
    r = google_cca(acts1, acts2, epsilon)
    if np.sum(r["x_idxs"]) <= np.sum(r["y_idxs"]):
        coef, invsqrt, acts, idxs, means = (r["coef_x"], r["invsqrt_xx"], acts1, r["x_idxs"],
                                            r["neuron_means1"])
    else:
        coef, invsqrt, acts, idxs, means = (r["coef_y"], r["invsqrt_yy"], acts2, r["y_idxs"],
                                            r["neuron_means2"])
    mixing = coef @ invsqrt if whiten else coef
    dirns = mixing @ (acts[idxs] - means[idxs]) + means[idxs]
    p, _ = np.linalg.qr(dirns.T)
    weights = np.sum(np.abs(np.dot(p.T, acts[idxs].T)), axis=1)
    weights = weights / np.sum(weights)
    return float(np.sum(weights * r["cca_coef1"]))


def related(rng, n: int, layers: int, width: int, base: np.ndarray) -> np.ndarray:
    """``(n, layers, width)``: noisy linear maps of ``base``, more noise deeper."""
    return np.stack([base @ rng.normal(size=(base.shape[1], width))
                     + 0.6 * (layer + 1) * rng.normal(size=(n, width))
                     for layer in range(layers)], axis=1)


def score(x: np.ndarray, y: np.ndarray, epsilon: float = 0.0) -> float:
    return pwcca_between(torch.tensor(x)[:, None], torch.tensor(y)[:, None],
                         epsilon=epsilon).item()


def test_pwcca_matches_numpy_reference_within_and_across_models():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 5))
    a, b = related(rng, 60, 4, 8, base), related(rng, 60, 3, 11, base)  # La != Lb, Da != Db
    across = pwcca_between(torch.tensor(a, dtype=torch.float32), torch.tensor(b))
    a32 = a.astype(np.float32).astype(np.float64)
    expected = [[pwcca_reference(a32[:, i], b[:, j]) for j in range(3)] for i in range(4)]
    assert across.shape == (4, 3) and across.dtype == torch.float64
    np.testing.assert_allclose(across.numpy(), expected, atol=1e-10)
    # the other way round: the narrower layer (now the second) is still the weighted one
    back = pwcca_between(torch.tensor(b), torch.tensor(a)).numpy()
    np.testing.assert_allclose(back, [[pwcca_reference(b[:, i], a[:, j]) for j in range(4)]
                                      for i in range(3)], atol=1e-10)
    np.testing.assert_allclose(back, np.array(expected).T, atol=1e-5)
    within = pwcca_between(torch.tensor(a), torch.tensor(a)).numpy()
    expected = [[pwcca_reference(a[:, i], a[:, j]) for j in range(4)] for i in range(4)]
    np.testing.assert_allclose(within, expected, atol=1e-10)
    np.testing.assert_allclose(np.diag(within), 1.0, atol=1e-12)
    assert np.abs(within - within.T).max() > 1e-3  # (l, m) weights layer l's variates


def test_pwcca_is_what_google_svcca_computes_with_its_canonical_directions():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))          # correlated units
    y = np.hstack([x @ rng.normal(size=(5, 3)), rng.normal(size=(40, 4))])
    y = y + 0.5 * rng.normal(size=(40, 7))
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)  # google/svcca adds the units' means back
    for epsilon in (0.0, 0.01):  # 0.01: the ridge only (every unit's variance is above it)
        google = pwcca_as_google(x.T, y.T, epsilon)                  # x: fewer units, weighted
        assert score(x, y, epsilon) == pytest.approx(google, abs=1e-9), epsilon
        google = pwcca_as_google(y.T, x.T, epsilon)                  # x weighted, second
        assert score(y, x, epsilon) == pytest.approx(google, abs=1e-9), epsilon
    assert score(x, y, 0.01) < score(x, y) - 1e-3  # the ridge shrinks the correlations
    # google/svcca's current pwcca.py forms the directions without invsqrt_xx: with X's units
    # uncorrelated and of equal variance (X^T X = c I) that changes nothing and it agrees ...
    white = 3 * np.linalg.qr(x)[0]
    assert np.allclose(white.T @ white, 9 * np.eye(5))
    assert score(white, y) == pytest.approx(pwcca_as_google(white.T, y.T, whiten=False),
                                            abs=1e-9)
    # ... but its directions are not the canonical variates otherwise, and it differs: lw
    # follows the paper, the compute_dirns branch and Ding et al. (see lw.metrics.pwcca)
    assert abs(score(x, y) - pwcca_as_google(x.T, y.T, whiten=False)) > 1e-3


def test_epsilon_leaves_out_units_below_it():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 6))
    y = x[:, :4] @ rng.normal(size=(4, 8)) + rng.normal(size=(40, 8))
    tiny = np.hstack([x, 1e-3 * rng.normal(size=(40, 1))])  # variance 1e-6 of the others'
    assert score(tiny, y, 1e-4) == pytest.approx(score(x, y, 1e-4), abs=1e-12)
    assert score(tiny, y) != pytest.approx(score(x, y), abs=1e-6)  # kept without epsilon
    assert score(x, x, 0.05) < 1 - 1e-3  # ridge CCA: a layer with itself is below 1
    assert PWCCAKnobs().epsilon == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=rf"metric.pwcca.epsilon={bad}: must be in"):
            PWCCAKnobs(epsilon=bad)
    with pytest.raises(ConfigError, match=r"metric\.pwcca\.epsilon=2"):
        compose_job(["metric.pwcca.epsilon=2"])


def test_pwcca_invariances_and_what_it_is_not_invariant_to():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    y = x @ rng.normal(size=(6, 9)) + 1.5 * rng.normal(size=(50, 9))  # wider: x is weighted
    base = score(x, y)
    flips = rng.choice([-1.0, 1.0], size=6)
    same = {"scaled and moved": (3.5 * x + 2.0, y), "units permuted": (x[:, rng.permutation(6)], y),
            "units' signs flipped": (x * flips, y), "other side scaled": (x, 0.2 * y - 1),
            "other side mixed": (x, y @ rng.normal(size=(9, 9)))}  # any invertible map
    for name, (x2, y2) in same.items():
        assert score(x2, y2) == pytest.approx(base, abs=1e-9), name
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert abs(score(x @ q, y) - base) > 1e-3  # weights are taken in the basis of units
    assert score(x, x @ q) == pytest.approx(1.0, abs=1e-9)  # but all correlations are 1
    assert score(x, y[rng.permutation(50)]) < base - 0.2  # prompts of one side shuffled
    assert score(x, x.copy()) == pytest.approx(1.0, abs=1e-12)


def test_few_prompts_make_pwcca_one_and_a_constant_layer_is_nan():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 20)), rng.normal(size=(8, 30))   # unrelated, N <= widths
    assert score(x, y) == pytest.approx(1.0, abs=1e-9)          # every correlation is 1
    # a ridge pulls it below 1, a little: a share of one unit's variance is small against the
    # variance along each of the 7 directions of 20 or 30 units
    assert 0.9 < score(x, y, epsilon=0.05) < 0.99
    pooled = torch.tensor(np.stack([rng.normal(size=(7, 5)), np.full((7, 5), 0.1)], axis=1))
    got = pwcca_between(pooled, pooled).numpy()
    assert got[0, 0] == pytest.approx(1.0) and np.isnan(got[1]).all() and np.isnan(got[:, 1]).all()


@pytest.mark.slow
def test_pwcca_job_logs_matrix_curves_table_and_heat_map(tmp_path):
    from lw.job.stages import compute
    from lw.tracking.jobdir import save_result_files

    job = compose_job(["model=tiny-pythia", "data.n_prompts=10", "data.max_tokens=32",
                       "metrics=[pwcca]", "metric.pwcca.epsilon=0.01"])
    result = compute(job)
    matrix = result.tables["pwcca_matrix"]
    n = result.info.n_layers + 1
    assert matrix.shape == (n, n + 1)
    values = matrix.drop(columns="layer").to_numpy()
    assert np.all((values > 0) & (values < 1))  # 10 prompts, 128 units: the ridge keeps it < 1
    np.testing.assert_allclose(result.table["pwcca/to_last"], values[:, -1])
    np.testing.assert_allclose(result.table["pwcca/to_next"][:-1], np.diag(values, 1))
    assert np.isnan(result.table["pwcca/to_next"].iloc[-1])
    figures = {k: v for make in result.figures.values() for k, v in make(result, "t").items()}
    assert list(figures) == ["pwcca_matrix"]
    save_result_files(result, tmp_path)
    assert (tmp_path / "pwcca_matrix.csv").read_text().startswith("layer,0,1")
