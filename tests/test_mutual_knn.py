"""mutual_knn (lw.metrics.mutual_knn) against a float64 numpy reference written from the
definition, against platonic-rep's own computation (followed step by step in numpy), its
invariances, the check of k against the number of prompts, and a real job's matrix, curves,
table and heat map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose_job
from lw.errors import ConfigError
from lw.metrics.mutual_knn import MutualKNNKnobs, mutual_knn_between


def neighbour_sets(x: np.ndarray, k: int) -> list[set[int]]:
    """S(i): the k prompts j != i with the largest cosine similarity to prompt i (loops)."""
    n = len(x)
    unit = [row / np.linalg.norm(row) for row in x]
    sets = []
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: -float(unit[i] @ unit[j]))
        sets.append(set(others[:k]))
    return sets


def mutual_knn_reference(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """(1/N) sum_i |S_X(i) ∩ S_Y(i)| / k."""
    sx, sy = neighbour_sets(x, k), neighbour_sets(y, k)
    return sum(len(a & b) / k for a, b in zip(sx, sy, strict=True)) / len(x)


def mutual_knn_as_platonic_rep(feats_a: np.ndarray, feats_b: np.ndarray, topk: int) -> float:
    """As platonic-rep computes it: measure_alignment.compute_score L2-normalises the rows
    (F.normalize, normalize=True), then metrics.AlignmentMetrics.mutual_knn:
    compute_nearest_neighbors = the first topk of each row of
    (feats @ feats.T).fill_diagonal_(-1e8).argsort(descending=True), 0/1 masks scattered
    from those indices, acc = (mask_a * mask_b).sum(1) / topk, its mean."""
    def nearest(feats):
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        sims = feats @ feats.T
        np.fill_diagonal(sims, -1e8)
        return np.argsort(-sims, axis=1, kind="stable")[:, :topk]

    knn_a, knn_b = nearest(feats_a), nearest(feats_b)
    n = len(knn_a)
    rows = np.arange(n)[:, None]
    mask_a, mask_b = np.zeros((n, n)), np.zeros((n, n))
    mask_a[rows, knn_a] = 1.0
    mask_b[rows, knn_b] = 1.0
    return float(((mask_a * mask_b).sum(axis=1) / topk).mean())


def related(rng, n: int, layers: int, width: int, base: np.ndarray) -> np.ndarray:
    """``(n, layers, width)``: noisy linear maps of ``base``, more noise deeper."""
    return np.stack([base @ rng.normal(size=(base.shape[1], width))
                     + 0.4 * (layer + 1) * rng.normal(size=(n, width))
                     for layer in range(layers)], axis=1)


@pytest.mark.parametrize("k", [1, 4])
def test_mutual_knn_matches_numpy_reference_within_and_across_models(k):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(16, 5))
    a, b = related(rng, 16, 4, 6, base), related(rng, 16, 3, 9, base)  # La != Lb, Da != Db
    within = mutual_knn_between(torch.tensor(a), torch.tensor(a), k=k).numpy()
    across = mutual_knn_between(torch.tensor(a, dtype=torch.float32), torch.tensor(b), k=k)
    expected = [[mutual_knn_reference(a[:, i], b[:, j], k) for j in range(3)] for i in range(4)]
    assert across.shape == (4, 3) and across.dtype == torch.float64
    np.testing.assert_allclose(across.numpy(), expected, atol=1e-12)
    expected = [[mutual_knn_reference(a[:, i], a[:, j], k) for j in range(4)] for i in range(4)]
    np.testing.assert_allclose(within, expected, atol=1e-12)
    np.testing.assert_allclose(within, within.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(within), 1.0)


def test_mutual_knn_is_what_platonic_rep_computes():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(32, 12)), rng.normal(size=(32, 20))
    y[:, :12] += 2 * x
    for topk in (1, 5, 10):
        got = mutual_knn_between(torch.tensor(x)[:, None], torch.tensor(y)[:, None], k=topk)
        assert got.item() == pytest.approx(mutual_knn_as_platonic_rep(x, y, topk), abs=1e-12)
    # a case by hand: 2-d vectors at angles (degrees), k = 1, self never a neighbour
    angles = np.radians
    x = np.stack([np.cos(angles([0, 10, 90, 100])), np.sin(angles([0, 10, 90, 100]))], axis=1)
    y = np.stack([np.cos(angles([0, 10, 100, 200])), np.sin(angles([0, 10, 100, 200]))], axis=1)
    # nearest in x: 0->1, 1->0, 2->3, 3->2; in y: 0->1, 1->0, 2->1, 3->2: prompts 0, 1, 3 agree
    assert mutual_knn_as_platonic_rep(x, y, 1) == 0.75
    got = mutual_knn_between(torch.tensor(x)[:, None], torch.tensor(y)[:, None], k=1)
    assert got.item() == 0.75


def test_mutual_knn_is_invariant_to_rotation_scaling_and_unit_order_not_prompt_order():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8))
    y = x @ rng.normal(size=(8, 10)) + 0.5 * rng.normal(size=(30, 10))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    transformed = {"rotated": x @ q, "scaled": 3.5 * x, "units permuted": x[:, rng.permutation(8)],
                   "prompts rescaled": x * rng.uniform(0.1, 10, size=(30, 1))}

    def score(a, b):
        return mutual_knn_between(torch.tensor(a)[:, None], torch.tensor(b)[:, None], k=5).item()

    base = score(x, y)
    for name, x2 in transformed.items():
        assert score(x, x2) == pytest.approx(1.0, abs=1e-12), name
        assert score(x2, y) == pytest.approx(base, abs=1e-12), name
    assert base > 0.5
    assert score(x, y[rng.permutation(30)]) < base - 0.3  # prompts of one side shuffled
    assert mutual_knn_between(torch.tensor(x)[:, None], torch.tensor(x.copy())[:, None]).item() == 1


def test_k_must_be_at_least_1_and_below_the_number_of_prompts():
    with pytest.raises(ConfigError, match="metric.mutual_knn.k=0: must be >= 1"):
        MutualKNNKnobs(k=0)
    with pytest.raises(ConfigError, match=r"metric.mutual_knn.k=8: must be below the number of "
                                          r"prompts N=8"):
        mutual_knn_between(torch.randn(8, 2, 3), torch.randn(8, 2, 3), k=8)
    assert mutual_knn_between(torch.randn(8, 2, 3), torch.randn(8, 1, 3), k=7).eq(1).all()


def test_a_job_checks_k_against_the_prompts_before_the_model_loads():
    from lw.job.stages import compute

    job = compose_job(["model=tiny-pythia", "data.n_prompts=6", "metrics=[mutual_knn]"])
    with pytest.raises(ConfigError, match=r"metric.mutual_knn.k=10: must be below the number "
                                          r"of prompts N=6") as error:
        compute(job)
    assert "_check_plan" in [entry.name for entry in error.traceback]


def test_mutual_knn_job_logs_matrix_curves_table_and_heat_map(tmp_path):
    from lw.job.stages import compute
    from lw.tracking.jobdir import save_result_files

    job = compose_job(["model=tiny-pythia", "data.n_prompts=10", "data.max_tokens=32",
                       "metrics=[mutual_knn]", "metric.mutual_knn.k=3"])
    result = compute(job)
    matrix = result.tables["mutual_knn_matrix"]
    n = result.info.n_layers + 1
    assert matrix.shape == (n, n + 1)
    values = matrix.drop(columns="layer").to_numpy()
    np.testing.assert_allclose(np.diag(values), 1.0)
    assert np.all((values >= 0) & (values <= 1))
    np.testing.assert_allclose(values * 30, np.round(values * 30), atol=1e-9)  # counts / (N k)
    np.testing.assert_allclose(result.table["mutual_knn/to_last"], values[:, -1])
    np.testing.assert_allclose(result.table["mutual_knn/to_next"][:-1], np.diag(values, 1))
    assert np.isnan(result.table["mutual_knn/to_next"].iloc[-1])
    figures = {k: v for make in result.figures.values() for k, v in make(result, "t").items()}
    assert list(figures) == ["mutual_knn_matrix"]
    save_result_files(result, tmp_path)
    assert (tmp_path / "mutual_knn_matrix.csv").read_text().startswith("layer,0,1")
