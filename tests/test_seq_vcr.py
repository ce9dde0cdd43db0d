"""Seq-VCR (lw.training.seq_vcr) against a float64 reference written with plain loops from the
formula in docs/how-to/training-study.md, its gradient, its two terms apart, and pause tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lw.errors import ConfigError
from lw.training.seq_vcr import SeqVCRProjection, seq_vcr_loss, with_pause_tokens


def reference(z: np.ndarray, lambda_var: float, lambda_cov: float, eta: float) -> float:
    """One position, one pair of dimensions at a time; covariance with 1/(B-1)."""
    batch, positions, dims = z.shape
    total = 0.0
    for t in range(positions):
        means = [sum(z[b, t, k] for b in range(batch)) / batch for k in range(dims)]
        for k in range(dims):
            var = sum((z[b, t, k] - means[k]) ** 2 for b in range(batch)) / (batch - 1)
            total += lambda_var * max(0.0, 1.0 - math.sqrt(var + eta))
            for j in range(dims):
                if j != k:
                    cov = sum((z[b, t, k] - means[k]) * (z[b, t, j] - means[j])
                              for b in range(batch)) / (batch - 1)
                    total += lambda_cov * cov * cov
    return total / (positions * dims)


@pytest.mark.parametrize("scale", [0.3, 2.0])   # under and over the unit-std hinge
def test_matches_float64_loops(scale):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64) * scale
    z[:, :, 2] += 0.7 * z[:, :, 0]                 # correlated dimensions: a real covariance term
    for lv, lc, eta in [(1.0, 0.004, 0.001), (0.5, 2.0, 0.1)]:
        got = seq_vcr_loss(z, lv, lc, eta).item()
        assert got == pytest.approx(reference(z.numpy(), lv, lc, eta), rel=1e-12)


def test_terms_apart_and_float32():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64) * 0.5
    zn = z.numpy()
    assert seq_vcr_loss(z, 1.0, 0.0, 0.001).item() == pytest.approx(
        reference(zn, 1.0, 0.0, 0.001), rel=1e-12)
    assert seq_vcr_loss(z, 0.0, 1.0, 0.001).item() == pytest.approx(
        reference(zn, 0.0, 1.0, 0.001), rel=1e-12)
    assert seq_vcr_loss(z.float(), 1.0, 0.004, 0.001).item() == pytest.approx(
        reference(zn, 1.0, 0.004, 0.001), rel=1e-5)


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(2)
    z = (torch.randn(4, 2, 3, generator=gen, dtype=torch.float64) * 0.4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: seq_vcr_loss(x, 1.0, 0.5, 0.01), (z,))


def test_collapsed_states_cost_most():
    """All rows equal at a position: zero variance, the hinge at its maximum 1 - sqrt(eta)."""
    z = torch.ones(3, 2, 4, dtype=torch.float64)
    assert seq_vcr_loss(z, 1.0, 0.004, 0.01).item() == pytest.approx(1 - math.sqrt(0.01))


def test_bad_shapes_say_one_line():
    with pytest.raises(ConfigError, match="batch of 1"):
        seq_vcr_loss(torch.zeros(1, 3, 2))
    with pytest.raises(ConfigError, match=r"expected \(batch, positions, dims\)"):
        seq_vcr_loss(torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="projection_size=1"):
        SeqVCRProjection(8, 1)


def test_projection_shape():
    proj = SeqVCRProjection(8, 5)
    assert proj(torch.zeros(2, 3, 8)).shape == (2, 3, 5)


def test_pause_tokens_inserted_with_ignored_labels():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    out_ids, out_labels = with_pause_tokens(ids, ids.clone(), 2, 99, at=2)
    assert out_ids.tolist() == [[1, 2, 99, 99, 3, 4], [5, 6, 99, 99, 7, 8]]
    assert out_labels.tolist() == [[1, 2, -100, -100, 3, 4], [5, 6, -100, -100, 7, 8]]
    same_ids, _ = with_pause_tokens(ids, ids, 0, 99, at=2)
    assert same_ids is ids
