"""lw.metrics against independent float64 numpy references (tests/reference.py), closed forms,
invariances and degenerate inputs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import diptest
import numpy as np
import pytest
import torch

from lw.metrics.dip import dip_test
from lw.metrics.functional.curvature import curvature
from lw.metrics.functional.entropy import dataset_entropy, matrix_entropy, prep, prompt_entropy
from lw.metrics.functional.views import dime, infonce, lidar, random_permutations

sys.path.insert(0, str(Path(__file__).parent))
import reference as ref  # noqa: E402

RTOL, ATOL = 1e-6, 1e-12
NORMS = ("raw", "max", "logN", "logD")
LAYERS = 2
# (T, D, per-prompt real lengths, padding side). T > D batches hold prompts with rows <= D too,
# so the official per-matrix Gram orientation is exercised.
SHAPES = {
    "T<D": (7, 12, [7, 5, 3, 2], ["right", "left", "right", "left"]),
    "T>D": (15, 5, [15, 11, 5, 4], ["left", "right", "left", "right"]),
}


def padded_batch(seed: int, shape: str):
    """h (LAYERS, B, T, D) with garbage in the padding, mask (B, T), and the real rows."""
    t, d, lengths, sides = SHAPES[shape]
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(LAYERS, len(lengths), t, d)) + rng.normal(size=d)  # non-zero mean
    mask = np.zeros((len(lengths), t), dtype=bool)
    for b, (n, side) in enumerate(zip(lengths, sides, strict=True)):
        if side == "right":
            mask[b, :n] = True
        else:
            mask[b, t - n:] = True
    h[:, ~mask] = 1e3 * rng.normal(size=h[:, ~mask].shape)  # padding must not leak
    real = [[h[layer, b][mask[b]] for b in range(len(lengths))] for layer in range(LAYERS)]
    return torch.from_numpy(h), torch.from_numpy(mask), real


def close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q


# ---------------------------------------------------------------- prep


@pytest.mark.parametrize("shape", SHAPES)
def test_prep_matches_reference_and_zeroes_padding(shape):
    h, mask, real = padded_batch(0, shape)
    z = prep(h, mask)
    assert z.dtype == torch.float64
    for layer in range(LAYERS):
        for b in range(mask.shape[0]):
            close(z[layer, b][mask[b]], ref.prep(real[layer][b]))
            assert torch.all(z[layer, b][~mask[b]] == 0)


# ---------------------------------------------------------------- entropy vs reference


@pytest.mark.parametrize("compat", ["paper", "official"])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5, 3.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_prompt_entropy_matches_reference(shape, alpha, compat):
    h, mask, real = padded_batch(1, shape)
    got = prompt_entropy(h, mask, alpha=alpha, compat=compat)
    assert set(got) == set(NORMS)
    d = h.shape[-1]
    for layer in range(LAYERS):
        for b, rows in enumerate(real[layer]):
            s = ref.entropy(ref.prep(rows), alpha, compat)
            want = ref.normalized(s, len(rows), d)
            for name in NORMS:
                close(got[name][layer, b], want[name])


@pytest.mark.parametrize("compat", ["paper", "official"])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("n,d", [(9, 16), (40, 6)])
def test_dataset_entropy_matches_reference(n, d, alpha, compat):
    pooled = np.random.default_rng(2).normal(size=(3, n, d)) + 0.5
    got = dataset_entropy(torch.from_numpy(pooled), alpha=alpha, compat=compat)
    for layer in range(3):
        want = ref.normalized(ref.entropy(ref.prep(pooled[layer]), alpha, compat), n, d)
        for name in NORMS:
            close(got[name][layer], want[name])


def test_official_and_paper_differ_where_the_authors_code_did():
    h, mask, _ = padded_batch(3, "T<D")
    paper = prompt_entropy(h, mask, alpha=2.0)["raw"]
    official = prompt_entropy(h, mask, alpha=2.0, compat="official")["raw"]
    assert torch.all(official > paper + 0.5)  # the repitl shortcut adds ~2 ln n


def test_official_orientation_does_not_depend_on_batch_padding():
    # A prompt with rows <= D alone (row Gram) and inside a T > D batch must agree.
    h, mask, real = padded_batch(4, "T>D")
    batched = prompt_entropy(h, mask, compat="official")["raw"]
    for b, rows in enumerate(real[0]):
        alone = prompt_entropy(torch.from_numpy(rows), None, compat="official")["raw"]
        close(batched[0, b], alone)


def test_float32_input_and_mask_of_ints():
    h, mask, _ = padded_batch(5, "T<D")
    got = prompt_entropy(h.float(), mask.long())["raw"]
    assert got.dtype == torch.float64
    close(got, prompt_entropy(h.float().double(), mask)["raw"])


# ---------------------------------------------------------------- entropy closed forms


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5, 3.0])
def test_rank_one_rows_have_zero_entropy(alpha):
    # Rows c_i v: after centering every row is +-v/|v| -> rank 1 -> S = 0.
    v = torch.randn(10, dtype=torch.float64)
    c = torch.tensor([0.0, 1.0, 2.5, 4.0, -3.0], dtype=torch.float64)
    got = prompt_entropy((c[:, None] * v)[None], None, alpha=alpha)
    close(got["raw"], [0.0])
    close(got["max"], [0.0])


def test_rank_one_rows_under_official_clamp():
    # Official: the row Gram of +-u is +-1; the clamp keeps two all-ones blocks, so the
    # spectrum is (n+/n, n-/n): here 3 rows on one side of the mean and 1 on the other.
    v = torch.randn(10, dtype=torch.float64)
    c = torch.tensor([1.0, 1.1, 1.2, -5.0], dtype=torch.float64)
    got = prompt_entropy((c[:, None] * v)[None], None, compat="official")["raw"]
    close(got, [-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5, 3.0])
@pytest.mark.parametrize("t,d", [(5, 5), (6, 11)])
def test_orthonormal_rows_have_log_t_entropy(t, d, alpha):
    q = random_orthogonal(d, 7)[:t]
    got = matrix_entropy(q[None], None, alpha=alpha)
    close(got["raw"], [math.log(t)])
    close(got["max"], [1.0])


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
def test_simplex_rows_through_prep_have_log_t_minus_one(alpha):
    # prep(I_T) = rows of I - J/T, renormalized: eigenvalues T/(T-1) (T-1 times) and 0.
    t, d = 6, 9
    x = torch.zeros(t, d, dtype=torch.float64)
    x[:, :t] = random_orthogonal(t, 8)  # rows of I_T, rotated
    close(prompt_entropy(x[None], None, alpha=alpha)["raw"], [math.log(t - 1)])


# ---------------------------------------------------------------- entropy properties


@pytest.mark.parametrize("shape", SHAPES)
def test_entropy_rotation_invariant(shape):
    h, mask, _ = padded_batch(9, shape)
    rot = random_orthogonal(h.shape[-1], 10)
    for alpha in (1.0, 2.0):
        close(prompt_entropy(h @ rot, mask, alpha=alpha)["raw"],
              prompt_entropy(h, mask, alpha=alpha)["raw"])
    pooled = h[:, :, 0, :]
    close(dataset_entropy(pooled @ rot)["raw"], dataset_entropy(pooled)["raw"])


@pytest.mark.parametrize("compat", ["paper", "official"])
def test_entropy_row_order_invariant(compat):
    h, mask, _ = padded_batch(11, "T>D")
    perm = torch.randperm(h.shape[-2], generator=torch.Generator().manual_seed(0))
    close(prompt_entropy(h[..., perm, :], mask[:, perm], compat=compat)["raw"],
          prompt_entropy(h, mask, compat=compat)["raw"])
    pooled = h[0, 0]
    close(dataset_entropy(pooled[perm], compat=compat)["raw"],
          dataset_entropy(pooled, compat=compat)["raw"])


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_max_normalized_entropy_in_unit_interval(alpha):
    for shape in SHAPES:
        h, mask, _ = padded_batch(12, shape)
        got = prompt_entropy(h, mask, alpha=alpha)["max"]
        assert torch.all((got >= -1e-12) & (got <= 1 + 1e-12))


# ---------------------------------------------------------------- entropy degenerate


def test_entropy_degenerate_inputs_give_nan():
    d = 6
    x = torch.randn(5, 4, d, dtype=torch.float64)
    mask = torch.ones(5, 4, dtype=torch.bool)
    x[0] = 0.0                                  # all rows zero
    x[1] = torch.randn(d, dtype=torch.float64)  # identical rows: zero after centering
    mask[2] = False                             # padding only
    mask[3, 1:] = False                         # one real row
    for compat in ("paper", "official"):
        for alpha in (1.0, 2.0):
            got = prompt_entropy(x, mask, alpha=alpha, compat=compat)
            for name in NORMS:
                assert torch.isnan(got[name][:4]).all(), (compat, alpha, name)
                assert torch.isfinite(got[name][4]), (compat, alpha, name)
    assert torch.isnan(dataset_entropy(torch.randn(1, d))["raw"])
    assert torch.isnan(matrix_entropy(torch.zeros(3, 4, d))["max"]).all()


# ---------------------------------------------------------------- curvature


@pytest.mark.parametrize("compat", ["paper", "official"])
@pytest.mark.parametrize("shape", SHAPES)
def test_curvature_matches_reference(shape, compat):
    h, mask, real = padded_batch(13, shape)
    # A repeated token makes a zero-length step: its pairs must be skipped.
    first = mask[0].nonzero()[0, 0]
    h[:, 0, first + 1] = h[:, 0, first]
    real = [[h[layer, b][mask[b]].numpy() for b in range(mask.shape[0])]
            for layer in range(LAYERS)]
    got = curvature(h, mask, compat=compat)
    for layer in range(LAYERS):
        for b, rows in enumerate(real[layer]):
            close(got[layer, b], ref.curvature(ref.prep(rows), compat))


def test_curvature_ranges_and_degenerate():
    h, mask, _ = padded_batch(14, "T>D")
    paper, official = curvature(h, mask), curvature(h, mask, compat="official")
    assert torch.all((paper >= 0) & (paper <= math.pi))
    assert torch.all((official >= 0) & (official <= math.pi / 2))
    assert torch.all(official <= paper + 1e-12)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 2:] = False   # T = 2
    mask[1] = False       # padding only
    x[2] = torch.randn(3, dtype=torch.float64)  # all steps zero -> no valid pair
    got = curvature(x, mask)
    assert torch.isnan(got[:3]).all() and torch.isfinite(got[3])
    assert torch.isnan(curvature(torch.randn(2, 8), None))


def test_curvature_regular_polygons_and_reversals():
    # N points evenly spaced on a circle stay a regular N-gon after prep: every step turns by
    # 2 pi / N. Back-and-forth steps turn by pi (official: arccos|cos| = 0).
    def polygon(n):
        angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
        plane = torch.stack([torch.cos(angle), torch.sin(angle)], -1)
        return 3.0 * plane @ random_orthogonal(5, n)[:2] + 7.0

    close(curvature(polygon(8), None), math.pi / 4)
    close(curvature(polygon(3), None), 2 * math.pi / 3)
    close(curvature(polygon(3), None, compat="official"), math.pi / 3)
    zigzag = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]) + 3.0
    close(curvature(zigzag, None), math.pi)
    close(curvature(zigzag, None, compat="official"), 0.0)


def test_curvature_skips_steps_that_vanish_after_prep():
    # Collinear points collapse to +-u after prep; the rounding residues between equal unit rows
    # must count as zero-length steps, leaving no valid pair.
    line = torch.arange(6, dtype=torch.float64)[:, None] * torch.tensor([1.0, 2.0, 0.5]) + 1.3
    assert torch.isnan(curvature(line, None))


# ---------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("n,d", [(6, 10), (20, 4)])
def test_infonce_matches_reference(n, d):
    rng = np.random.default_rng(15)
    a = rng.normal(size=(3, n, d))
    b = a + 0.5 * rng.normal(size=a.shape)
    got = infonce(torch.from_numpy(a), torch.from_numpy(b), tau=0.1)
    for layer in range(3):
        want = ref.infonce(a[layer], b[layer], 0.1)
        for key in ("loss", "mi_bound", "normalized"):
            close(got[key][layer], want[key])


def test_infonce_identical_separated_views_reach_log_n():
    # prep(I_N) rows have cosine -1/(N-1) to each other: closed-form loss, mi_bound ~ ln N.
    n = 8
    x = torch.eye(n, 16, dtype=torch.float64)
    got = infonce(x, x, tau=0.1)
    loss = math.log1p((n - 1) * math.exp(-(10 + 10 / (n - 1))))
    close(got["loss"], loss)
    assert got["loss"] < 1e-3
    assert abs(got["mi_bound"] - math.log(n)) < 1e-3
    assert torch.isnan(infonce(x[:1], x[:1])["mi_bound"])


# ---------------------------------------------------------------- DiME


@pytest.mark.parametrize("compat", ["paper", "official"])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("n,d", [(7, 12), (12, 4)])
def test_dime_matches_reference(n, d, alpha, compat):
    rng = np.random.default_rng(16)
    a = rng.normal(size=(2, n, d))
    b = a + 0.7 * rng.normal(size=a.shape)
    perms = random_permutations(n, 5, torch.Generator().manual_seed(3))
    got = dime(torch.from_numpy(a), torch.from_numpy(b), alpha=alpha, compat=compat,
               perms=perms)
    for layer in range(2):
        close(got[layer], ref.dime(a[layer], b[layer], alpha, perms.numpy(), compat))


def test_dime_generator_is_the_permutation_source():
    a = torch.randn(3, 10, 6, dtype=torch.float64)
    b = a + 0.3 * torch.randn_like(a)
    seeded = dime(a, b, r=4, generator=torch.Generator().manual_seed(5))
    explicit = dime(a, b, perms=random_permutations(10, 4, torch.Generator().manual_seed(5)))
    close(seeded, explicit)
    other = dime(a, b, r=4, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(seeded, other)


def test_dime_rotation_invariant_and_positive_for_dependent_views():
    a = torch.randn(2, 12, 8, dtype=torch.float64)
    b = a + 0.1 * torch.randn_like(a)
    rot = random_orthogonal(8, 17)
    perms = random_permutations(12, 6, torch.Generator().manual_seed(0))
    close(dime(a @ rot, b @ rot, perms=perms), dime(a, b, perms=perms))
    assert torch.all(dime(a, b, perms=perms) > 0)
    assert torch.isnan(dime(a[:, :1], b[:, :1], r=2)).all()


# ---------------------------------------------------------------- LiDAR


@pytest.mark.parametrize("n,j,d", [(6, 4, 5), (3, 3, 8)])
def test_lidar_matches_reference(n, j, d):
    rng = np.random.default_rng(18)
    x = rng.normal(size=(2, n, 1, d)) + 0.5 * rng.normal(size=(2, n, j, d))
    got = lidar(torch.from_numpy(x), delta=1e-4)
    for layer in range(2):
        s, rank = ref.lidar(x[layer], 1e-4)
        want = ref.normalized(s, n, d)
        for name in NORMS:
            close(got[name][layer], want[name])
        close(got["effective_rank"][layer], rank)
        assert 1.0 <= got["effective_rank"][layer] <= d


def test_lidar_degenerate_single_prompt_is_nan():
    got = lidar(torch.randn(1, 4, 6, dtype=torch.float64))
    assert torch.isnan(got["raw"]) and torch.isnan(got["effective_rank"])


# ---------------------------------------------------------------- dip test


def test_dip_test_matches_diptest_and_detects_bimodality():
    rng = np.random.default_rng(19)
    unimodal = rng.normal(size=300)
    bimodal = np.concatenate([rng.normal(-4, 1, 150), rng.normal(4, 1, 150)])
    with_nan = unimodal.copy()
    with_nan[:10] = np.nan
    values = np.stack([unimodal, bimodal, with_nan, np.full(300, np.nan)], axis=1)
    values[3:, 3] = np.nan
    values[:3, 3] = [1.0, 2.0, 3.0]  # only 3 finite values
    dips, pvals = dip_test(torch.from_numpy(values))
    for col, sample in enumerate([unimodal, bimodal, unimodal[10:]]):
        want_dip, want_p = diptest.diptest(sample)
        close(dips[col], want_dip)
        close(pvals[col], want_p)
    assert pvals[1] < 0.01
    assert pvals[0] > 0.2
    assert np.isnan(dips[3]) and np.isnan(pvals[3])


# ---------------------------------------------------------------- robustness


def test_non_finite_inputs_give_nan_not_exceptions():
    h = torch.randn(3, 6, 4, dtype=torch.float64)
    h[0, 2, 1] = math.nan
    h[1, 0, 0] = math.inf
    for compat in ("paper", "official"):
        got = prompt_entropy(h, None, compat=compat)["raw"]
        assert torch.isnan(got[:2]).all() and torch.isfinite(got[2])
        assert torch.isnan(curvature(h, None, compat=compat)[:2]).all()
    assert torch.isnan(dime(h, h, r=2)[:2]).all()
    views = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    views[0, 1, 2, 3] = math.nan
    got = lidar(views)["raw"]
    assert torch.isnan(got[0]) and torch.isfinite(got[1])


def test_unknown_compat_is_rejected():
    with pytest.raises(ValueError, match="compat"):
        prompt_entropy(torch.randn(4, 3), None, compat="paper2")
