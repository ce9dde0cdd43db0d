"""What the view metrics' augmented copies are of: under token perturbations the measured ids
are decoded to text and nlpaug copies that text; the result says so, with the measured share of
prompts whose text re-tokenizes to the ids measured."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import compose_job


@pytest.mark.parametrize("perturbation, views_of", [("none", "text"),
                                                    ("randomness", "decoded_ids")])
def test_views_say_what_they_are_copies_of(perturbation, views_of):
    """Under randomness the measured ids are decoded to text, and nlpaug copies that text: the
    result names it and reports the measured share of prompts whose text re-tokenizes to the
    ids measured (the decode/encode round trip)."""
    from lw.job.stages import compute, plan_job
    from lw.loading.models import load_tokenizer
    from lw.loading.prompts import tokenize

    overrides = ["model=tiny-pythia", "data=wiki-vital", "data.n_prompts=8", "data.max_tokens=32",
                 "metrics=[infonce]", f"perturbation={perturbation}"]
    if perturbation == "randomness":
        overrides.append("perturbation.p=1.0")
    job = compose_job(overrides)
    tokenizer = load_tokenizer(job.model)
    plan = plan_job(job, tokenizer)
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in plan.ids]
    again = tokenize(tokenizer, decoded, job.data.max_tokens)
    share = np.mean([a == b for a, b in zip(again, plan.ids, strict=True)])
    result = compute(job)
    assert result.tags["lw.views.of"] == views_of
    assert result.summary["views/roundtrip_share"] == pytest.approx(share)
    if perturbation == "none":
        assert share == 1.0
    else:
        assert share < 1.0  # random ids do not survive decode/encode: the views are of text
