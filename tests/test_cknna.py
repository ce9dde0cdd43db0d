"""cknna (lw.metrics.cknna) against a float64 numpy reference written from the definition (with
loops), against platonic-rep's own computation (followed step by step in numpy), against
unbiased CKA at k = N-1, its invariances, the checks of k, and a real job's matrix, curves,
table and heat map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose_job
from lw.errors import ConfigError
from lw.metrics.cka import cka_between
from lw.metrics.cknna import CKNNAKnobs, cknna_between


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def knn_mask_reference(kernel: np.ndarray, k: int) -> np.ndarray:
    """P[i, j] = 1 for the k prompts j != i with the largest kernel[i, j] (loops)."""
    n = len(kernel)
    mask = np.zeros((n, n))
    for i in range(n):
        for j in sorted((j for j in range(n) if j != i), key=lambda j: -kernel[i, j])[:k]:
            mask[i, j] = 1.0
    return mask


def hsic_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased HSIC of zero-diagonal A, B, term by term with loops: tr(A B) = sum_ij A_ij B_ji,
    1^T A B 1 = sum_ijl A_ij B_jl (A, B need not be symmetric)."""
    n = len(a)
    trace = sum(a[i, j] * b[j, i] for i in range(n) for j in range(n))
    middle = sum(a[i, j] * b[j, m] for i in range(n) for j in range(n) for m in range(n))
    return (trace + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 * middle / (n - 2)) / (n * (n - 3))


def cknna_reference(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """HSIC(M∘K, M∘L) / sqrt(HSIC(P∘K, P∘K) HSIC(Q∘L, Q∘L)) on row-normalised x, y."""
    kx, ly = unit(x) @ unit(x).T, unit(y) @ unit(y).T
    p, q = knn_mask_reference(kx, k), knn_mask_reference(ly, k)
    m = p * q
    return hsic_reference(m * kx, m * ly) / np.sqrt(hsic_reference(p * kx, p * kx)
                                                    * hsic_reference(q * ly, q * ly))


def cknna_as_platonic_rep(feats_a: np.ndarray, feats_b: np.ndarray, topk: int,
                          eps: float = 1e-6) -> float:
    """As platonic-rep computes it: measure_alignment.compute_score L2-normalises the rows,
    then metrics.AlignmentMetrics.cknna(unbiased=True): K = A A^T, L = B B^T (not centered);
    similarity(K, L): the diagonals of K, L set to -inf, torch.topk rows -> 0/1 masks mask_K,
    mask_L, mask = mask_K * mask_L, hsic_unbiased(mask * K, mask * L) with hsic_unbiased =
    [sum(K~ * L~.T) + sum(K~) sum(L~) / ((m-1)(m-2)) - 2 sum(K~ @ L~) / (m-2)] / (m (m-3)),
    K~, L~ with zero diagonals; score = sim_kl / (sqrt(sim_kk * sim_ll) + 1e-6)."""
    feats_a = feats_a / np.maximum(np.linalg.norm(feats_a, axis=1, keepdims=True), 1e-12)
    feats_b = feats_b / np.maximum(np.linalg.norm(feats_b, axis=1, keepdims=True), 1e-12)
    big_k, big_l = feats_a @ feats_a.T, feats_b @ feats_b.T
    n = len(big_k)

    def hsic_unbiased(kk, ll):
        kt, lt = kk.copy(), ll.copy()
        np.fill_diagonal(kt, 0)
        np.fill_diagonal(lt, 0)
        value = (np.sum(kt * lt.T) + np.sum(kt) * np.sum(lt) / ((n - 1) * (n - 2))
                 - 2 * np.sum(kt @ lt) / (n - 2))
        return value / (n * (n - 3))

    def similarity(kk, ll):
        k_hat, l_hat = kk.copy(), ll.copy()
        np.fill_diagonal(k_hat, -np.inf)
        np.fill_diagonal(l_hat, -np.inf)
        rows = np.arange(n)[:, None]
        mask_k, mask_l = np.zeros((n, n)), np.zeros((n, n))
        mask_k[rows, np.argsort(-k_hat, axis=1)[:, :topk]] = 1
        mask_l[rows, np.argsort(-l_hat, axis=1)[:, :topk]] = 1
        mask = mask_k * mask_l
        return hsic_unbiased(mask * kk, mask * ll)

    sim_kl, sim_kk, sim_ll = similarity(big_k, big_l), similarity(big_k, big_k), \
        similarity(big_l, big_l)
    return sim_kl / (np.sqrt(sim_kk * sim_ll) + eps)


def related(rng, n: int, layers: int, width: int, base: np.ndarray) -> np.ndarray:
    """``(n, layers, width)``: noisy linear maps of ``base``, more noise deeper."""
    return np.stack([base @ rng.normal(size=(base.shape[1], width))
                     + 0.4 * (layer + 1) * rng.normal(size=(n, width))
                     for layer in range(layers)], axis=1)


@pytest.mark.parametrize("k", [2, 5])
def test_cknna_matches_numpy_reference_within_and_across_models(k):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(12, 5))
    a, b = related(rng, 12, 4, 6, base), related(rng, 12, 3, 9, base)  # La != Lb, Da != Db
    across = cknna_between(torch.tensor(a, dtype=torch.float32), torch.tensor(b), k=k)
    expected = [[cknna_reference(a[:, i].astype(np.float32).astype(float), b[:, j], k)
                 for j in range(3)] for i in range(4)]
    assert across.shape == (4, 3) and across.dtype == torch.float64
    np.testing.assert_allclose(across.numpy(), expected, rtol=1e-9, atol=1e-12)
    within = cknna_between(torch.tensor(a), torch.tensor(a), k=k).numpy()
    expected = [[cknna_reference(a[:, i], a[:, j], k) for j in range(4)] for i in range(4)]
    np.testing.assert_allclose(within, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.diag(within), 1.0, atol=1e-12)
    # within a model (b is a) and across (a copy): the same numbers
    copy = cknna_between(torch.tensor(a), torch.tensor(a.copy()), k=k).numpy()
    np.testing.assert_allclose(copy, within, rtol=1e-12, atol=1e-14)


def test_cknna_is_what_platonic_rep_computes():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(24, 12)), rng.normal(size=(24, 20))
    y[:, :12] += 1.5 * x
    for topk in (2, 5, 10):
        got = cknna_between(torch.tensor(x)[:, None], torch.tensor(y)[:, None], k=topk).item()
        # platonic-rep's score divides by sqrt(...) + 1e-6; lw by sqrt(...) alone
        assert got == pytest.approx(cknna_as_platonic_rep(x, y, topk, eps=0.0), rel=1e-10)
        assert got == pytest.approx(cknna_as_platonic_rep(x, y, topk), rel=1e-3)
        # not symmetric in platonic-rep either (its 1^T A B 1 term): lw keeps the order
        back = cknna_between(torch.tensor(y)[:, None], torch.tensor(x)[:, None], k=topk).item()
        assert back == pytest.approx(cknna_as_platonic_rep(y, x, topk, eps=0.0), rel=1e-10)
    # the fixed case's value, as platonic-rep's code gives it (eps included)
    assert cknna_as_platonic_rep(x, y, 10) == pytest.approx(0.715457, abs=1e-6)


def test_with_every_other_prompt_a_neighbour_cknna_is_unbiased_cka_of_normalised_vectors():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(15, 4))
    a, b = related(rng, 15, 3, 6, base), related(rng, 15, 2, 8, base)
    normalised = [torch.nn.functional.normalize(torch.tensor(v), dim=-1) for v in (a, b)]
    np.testing.assert_allclose(cknna_between(torch.tensor(a), torch.tensor(b), k=14).numpy(),
                               cka_between(*normalised, debiased=True).numpy(), atol=1e-12)


def test_cknna_is_invariant_to_rotation_scaling_and_unit_order_not_prompt_order():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8))
    y = x @ rng.normal(size=(8, 10)) + 0.5 * rng.normal(size=(30, 10))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    transformed = {"rotated": x @ q, "scaled": 3.5 * x, "units permuted": x[:, rng.permutation(8)],
                   "prompts rescaled": x * rng.uniform(0.1, 10, size=(30, 1))}

    def score(a, b):
        return cknna_between(torch.tensor(a)[:, None], torch.tensor(b)[:, None], k=5).item()

    base = score(x, y)
    for name, x2 in transformed.items():
        assert score(x, x2) == pytest.approx(1.0, abs=1e-10), name
        assert score(x2, y) == pytest.approx(base, abs=1e-10), name
    assert base > 0.5
    assert score(x, y[rng.permutation(30)]) < base - 0.3  # prompts of one side shuffled
    assert cknna_between(torch.tensor(x)[:, None], torch.tensor(x.copy())[:, None]).item() == \
        pytest.approx(1.0, abs=1e-12)


def test_k_must_be_at_least_2_and_below_the_number_of_prompts():
    with pytest.raises(ConfigError, match="metric.cknna.k=1: must be >= 2"):
        CKNNAKnobs(k=1)
    with pytest.raises(ConfigError, match="metric.cknna.k=8: must be below the number of "
                                          "prompts N=8"):
        cknna_between(torch.randn(8, 2, 3), torch.randn(8, 2, 3), k=8)
    assert cknna_between(torch.randn(3, 2, 3), torch.randn(3, 2, 3), k=2).isnan().all()  # N < 4


def test_a_job_checks_k_against_the_prompts_before_the_model_loads():
    from lw.job.stages import compute

    job = compose_job(["model=tiny-pythia", "data.n_prompts=8", "metrics=[cknna]"])
    with pytest.raises(ConfigError, match=r"metric.cknna.k=10: must be below the number of "
                                          r"prompts N=8") as error:
        compute(job)
    assert "_check_plan" in [entry.name for entry in error.traceback]


def test_cknna_job_logs_matrix_curves_table_and_heat_map(tmp_path):
    from lw.job.stages import compute
    from lw.tracking.jobdir import save_result_files

    job = compose_job(["model=tiny-pythia", "data.n_prompts=10", "data.max_tokens=32",
                       "metrics=[cknna]", "metric.cknna.k=3"])
    result = compute(job)
    matrix = result.tables["cknna_matrix"]
    n = result.info.n_layers + 1
    assert matrix.shape == (n, n + 1)
    values = matrix.drop(columns="layer").to_numpy()
    np.testing.assert_allclose(np.diag(values), 1.0, atol=1e-9)
    np.testing.assert_allclose(result.table["cknna/to_last"], values[:, -1])
    np.testing.assert_allclose(result.table["cknna/to_next"][:-1], np.diag(values, 1))
    assert np.isnan(result.table["cknna/to_next"].iloc[-1])
    figures = {k: v for make in result.figures.values() for k, v in make(result, "t").items()}
    assert list(figures) == ["cknna_matrix"]
    save_result_files(result, tmp_path)
    assert (tmp_path / "cknna_matrix.csv").read_text().startswith("layer,0,1")
