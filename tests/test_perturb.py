"""lw.perturb on real tokenizers (MiniLM's BERT WordPiece, SmolLM2's BPE) and real nlpaug: no
mocks. Statistical checks use thousands of tokens and tolerances of several standard errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lw.config.schema import PerturbationConfig
from lw.errors import ConfigError
from lw.job.perturb import (
    allowed_ids,
    augment_views,
    perturb,
    perturbation_tags,
    random_prompts,
    randomness,
    repetition,
    special_ids,
)
from lw.loading.model_sources import load_tokenizer_of

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Interest rates were raised again by the central bank on Tuesday morning.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def bert():
    return load_tokenizer_of("minilm")


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer_of("smollm2")


@pytest.fixture(scope="module")
def prompts(bert) -> list[list[int]]:
    """200 prompts of [CLS] + 48 distinct non-special ids + [SEP]: changes are countable."""
    allowed = allowed_ids(bert)
    g = gen(123)
    body = [allowed[torch.randperm(len(allowed), generator=g)[:48]].tolist() for _ in range(200)]
    return [[bert.cls_token_id, *ids, bert.sep_token_id] for ids in body]


def non_special_positions(prompt: list[int], special: set[int]) -> list[int]:
    return [k for k, i in enumerate(prompt) if i not in special]


def replaced(before: list[list[int]], after: list[list[int]]) -> list[int]:
    """The new ids at every position where a token changed (prompts of equal lengths)."""
    pairs = zip(before, after, strict=True)
    return [b for p, q in pairs for a, b in zip(p, q, strict=True) if a != b]


def test_special_ids_include_added_special_tokens(bert, smollm2):
    assert special_ids(bert) == {0, 100, 101, 102, 103}  # [PAD] [UNK] [CLS] [SEP] [MASK]
    # SmolLM2 lists 3 ids in all_special_ids but marks ids 0..16 special.
    assert set(smollm2.all_special_ids) < special_ids(smollm2)
    assert special_ids(smollm2) == set(range(17))


def test_allowed_ids_are_vocab_minus_special(bert, smollm2):
    for tok in (bert, smollm2):
        allowed = allowed_ids(tok)
        assert allowed.dtype == torch.long and allowed.ndim == 1
        assert len(allowed) == len(tok) - len(special_ids(tok))
        assert not set(allowed.tolist()) & special_ids(tok)
        assert int(allowed.max()) == len(tok) - 1


def test_repetition_p0_identical_and_lengths_kept(bert, prompts):
    assert repetition(prompts, 0.0, special_ids(bert), gen(0)) == prompts
    out = repetition(prompts, 0.5, special_ids(bert), gen(0))
    assert [len(p) for p in out] == [len(p) for p in prompts]


def test_repetition_p1_single_own_id_specials_untouched(bert):
    special = special_ids(bert)
    batch = bert(TEXTS + ["", "a b"], add_special_tokens=True)["input_ids"]
    out = repetition(batch, 1.0, special, gen(1))
    for before, after in zip(batch, out, strict=True):
        assert len(after) == len(before)
        assert (after[0], after[-1]) == (bert.cls_token_id, bert.sep_token_id)
        body = [after[k] for k in non_special_positions(before, special)]
        if not body:  # "" is [CLS] [SEP]: nothing to replace
            assert after == before
            continue
        assert len(set(body)) == 1 and body[0] in before and body[0] not in special


def test_repetition_fraction_changed_close_to_p(bert, prompts):
    out = repetition(prompts, 0.5, special_ids(bert), gen(2))
    changed = len(replaced(prompts, out))
    # Body ids are distinct, so a hit changes the token unless it lands on t* itself (1 in 48).
    fraction = changed / sum(len(p) - 2 for p in prompts)
    assert abs(fraction - 0.5 * 47 / 48) < 0.03
    assert all(p[0] == q[0] and p[-1] == q[-1] for p, q in zip(prompts, out, strict=True))


def test_repetition_seeded(bert, prompts):
    special = special_ids(bert)
    a = repetition(prompts, 0.5, special, gen(7))
    assert a == repetition(prompts, 0.5, special, gen(7))
    assert a != repetition(prompts, 0.5, special, gen(8))


def test_randomness_draws_allowed_ids_at_rate_p(bert, prompts):
    special, allowed = special_ids(bert), allowed_ids(bert)
    out = randomness(prompts, 0.3, allowed, special, gen(3))
    assert [len(p) for p in out] == [len(p) for p in prompts]
    allowed_set = set(allowed.tolist())
    new = replaced(prompts, out)
    assert new and all(i in allowed_set and i not in special for i in new)
    assert abs(len(new) / sum(len(p) - 2 for p in prompts) - 0.3) < 0.03
    assert all(p[0] == q[0] and p[-1] == q[-1] for p, q in zip(prompts, out, strict=True))
    assert randomness(prompts, 0.0, allowed, special, gen(3)) == prompts


def test_randomness_seeded(bert, prompts):
    special, allowed = special_ids(bert), allowed_ids(bert)
    a = randomness(prompts, 0.3, allowed, special, gen(7))
    assert a == randomness(prompts, 0.3, allowed, special, gen(7))
    assert a != randomness(prompts, 0.3, allowed, special, gen(8))


def test_random_prompts_shape_range_uniform(smollm2):
    allowed = allowed_ids(smollm2)
    out = random_prompts(50, 40, allowed, gen(4))
    assert len(out) == 50 and all(len(p) == 40 for p in out)
    ids = [i for p in out for i in p]
    assert set(ids) <= set(allowed.tolist()) and not set(ids) & special_ids(smollm2)
    # 2000 uniform draws from ~49k ids: ~1960 distinct expected; a skewed sampler gives fewer.
    assert len(set(ids)) > 1900
    assert np.mean(ids) == pytest.approx(float(allowed.float().mean()), rel=0.05)
    assert out == random_prompts(50, 40, allowed, gen(4))
    assert out != random_prompts(50, 40, allowed, gen(5))


def test_perturb_dispatch(bert, prompts):
    def cfg(name, **kw):
        return PerturbationConfig(name=name, **kw)

    assert perturb(prompts, cfg("none"), bert, gen(0)) == prompts
    assert perturb(prompts, cfg("augment", views=3), bert, gen(0)) == prompts
    assert perturb(prompts, cfg("repetition", p=0.5), bert, gen(0)) == repetition(
        prompts, 0.5, special_ids(bert), gen(0))
    assert perturb(prompts, cfg("randomness", p=0.5), bert, gen(0)) == randomness(
        prompts, 0.5, allowed_ids(bert), special_ids(bert), gen(0))
    out = perturb(prompts, cfg("random", T=16), bert, gen(0))
    assert len(out) == len(prompts) and {len(p) for p in out} == {16}


def test_augment_views_strings_differ_deterministic_no_rng_leak():
    random.seed(99)
    np.random.seed(99)
    py_state, np_state = random.getstate(), np.random.get_state()
    out = augment_views(TEXTS, views=2, seed=0)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]

    assert len(out) == 2 and all(len(view) == len(TEXTS) for view in out)
    for view in out:
        for text, augmented in zip(TEXTS, view, strict=True):
            assert isinstance(augmented, str) and not augmented.startswith("[")
            assert augmented != text
    assert out[0] != out[1]
    assert out == augment_views(TEXTS, views=2, seed=0)
    assert out != augment_views(TEXTS, views=2, seed=1)


def test_augment_views_short_and_empty_texts():
    out = augment_views(["", "a", "   "], views=2, seed=0)
    assert out == [["", "a", "   "], ["", "a", "   "]]


def test_tags_sort_as_numbers():
    def tag(key, **kw):
        return perturbation_tags(PerturbationConfig(**kw))[key]

    ps = [tag("lw.perturbation.p", name="repetition", p=p) for p in (0.1, 0.25, 1.0)]
    assert ps == sorted(ps) == ["0.100", "0.250", "1.000"]
    assert tag("lw.perturbation.T", name="random", T=16) < tag("lw.perturbation.T",
                                                              name="random", T=1024)
    assert perturbation_tags(PerturbationConfig(name="none")) == {"lw.perturbation": "none"}
    assert perturbation_tags(PerturbationConfig(name="augment", views=4)) == {
        "lw.perturbation": "augment", "lw.perturbation.views": "004"}
    assert set(perturbation_tags(PerturbationConfig(name="randomness", p=0.5))) == {
        "lw.perturbation", "lw.perturbation.p"}


def test_config_rejects_p_outside_unit_interval():
    with pytest.raises(ConfigError, match=r"perturbation\.p"):
        PerturbationConfig(name="repetition", p=1.5)
