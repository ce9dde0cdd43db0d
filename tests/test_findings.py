"""The extreme-prompt findings on real weights (smollm2, a few wiki-vital prompts): token
repetition lowers mid-depth prompt entropy, token randomness raises early-layer prompt entropy.
Checked with the first token in (k = 0) and out (k = 1); see docs/FINDINGS.md."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from conftest import compose_job
from lw.job.stages import compute

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

BASE = ["model=smollm2", "data=wiki-vital", "data.n_prompts=8", "data.min_tokens=32",
        "data.max_tokens=32", "metrics=[prompt_entropy]", "metric.normalizations=[max]"]


@cache
def entropy_curve(perturbation: str, p: float, skip_first: int) -> np.ndarray:
    job = compose_job(BASE + [f"perturbation={perturbation}", f"perturbation.p={p}",
                              f"extraction.skip_first={skip_first}"])
    return compute(job).table["prompt_entropy/max"].to_numpy()


@pytest.mark.parametrize("skip_first", [0, 1])
def test_repetition_lowers_mid_depth_prompt_entropy(skip_first):
    clean = entropy_curve("none", 0.0, skip_first)
    repeated = entropy_curve("repetition", 0.75, skip_first)
    n_layers = len(clean) - 1
    middle = slice(n_layers // 4, 3 * n_layers // 4 + 1)
    assert np.nanmean(repeated[middle]) < np.nanmean(clean[middle]) - 0.02
    assert np.nanmean(repeated[middle] < clean[middle]) >= 0.9  # layer by layer, not on average


@pytest.mark.parametrize("skip_first", [0, 1])
def test_randomness_raises_early_layer_prompt_entropy(skip_first):
    clean = entropy_curve("none", 0.0, skip_first)
    noisy = entropy_curve("randomness", 0.75, skip_first)
    early = slice(1, 6)
    assert (noisy[early] > clean[early] + 0.02).all()
