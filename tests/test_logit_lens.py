"""logit_lens (lw.metrics.logit_lens) against a float64 numpy reference on random states, and
on a real offline model (smollm2) against the causal-LM model's own logits and loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from conftest import compose_job
from lw.metrics.logit_lens import LensPass, _final_norm, lens_products


def rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-6) * weight


def reference(hidden, kept, ids, weight, head, last_normed):
    """Token by token: (L+1, B) mean CE, KL(p_L || p_l), top-1 agreement, count."""
    states, batch, width, _ = hidden.shape
    out = {k: np.full((states, batch), np.nan) for k in ("ce", "kl", "top1")}
    count = np.zeros(batch)
    for b in range(batch):
        ce, kl, top1 = [[] for _ in range(states)], [[] for _ in range(states)], \
            [[] for _ in range(states)]
        for t in range(width - 1):
            if not (kept[b, t] and kept[b, t + 1]):
                continue
            count[b] += 1
            logps = []
            for layer in range(states):
                x = hidden[layer, b, t]
                if not (last_normed and layer == states - 1):
                    x = rms(x, weight)
                logps.append(log_softmax(head @ x))
            final = logps[-1]
            for layer, logp in enumerate(logps):
                ce[layer].append(-logp[ids[b, t + 1]])
                kl[layer].append(float(np.sum(np.exp(final) * (final - logp))))
                top1[layer].append(float(np.argmax(logp) == np.argmax(final)))
        for layer in range(states):
            if count[b]:
                out["ce"][layer, b] = np.mean(ce[layer])
                out["kl"][layer, b] = np.mean(kl[layer])
                out["top1"][layer, b] = np.mean(top1[layer])
    return out, count


@pytest.mark.parametrize("last_normed", [True, False])
def test_lens_products_match_numpy_reference(last_normed):
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(4, 3, 6, 5))
    kept = np.ones((3, 6), dtype=bool)
    kept[0, 0] = False          # skip_first
    kept[1, 4:] = False         # padding
    kept[2, :] = False
    kept[2, 0] = True           # one real token: nothing predicted
    ids = rng.integers(0, 9, size=(3, 6))
    head = rng.normal(size=(9, 5))
    weight = rng.uniform(0.5, 1.5, size=5)
    wt = torch.tensor(weight, dtype=torch.float32)

    def norm(x):
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + 1e-6) * wt

    f32 = torch.float32
    got = lens_products(torch.tensor(hidden, dtype=f32), torch.tensor(kept), torch.tensor(ids),
                        norm, torch.tensor(head, dtype=f32), last_normed, chunk_elements=40)
    expected, count = reference(hidden, kept, ids, weight, head, last_normed)
    for name, values in expected.items():
        np.testing.assert_allclose(got[f"logit_lens/{name}"].numpy(), values, rtol=1e-4,
                                   atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got["logit_lens/n"][0].numpy(), count)
    if last_normed:
        np.testing.assert_allclose(got["logit_lens/kl"][-1, :2].numpy(), 0.0, atol=1e-12)


def test_the_lens_pass_chunks_tokens_across_batches_and_gives_each_prompt_its_own(tiny_pythia):
    """extract hands the pass its batches (longest first, so not in prompt order); the pass
    projects chunks of 3 tokens that straddle batches and hands each batch its products after
    the last: each prompt's values equal the lens of that prompt alone."""
    from lw.job.extract import extract

    texts = ["The cat sat on the mat.", "Rain fell.", "A longer sentence about the river "
             "and the valley below it.", "Seven words are in this sentence here.", "Hi."]
    prompts = [tiny_pythia.tokenizer(text).input_ids for text in texts]
    module = _final_norm(tiny_pythia.model)
    config = tiny_pythia.model.config   # random weights, untied: any head will do
    head = torch.randn(config.vocab_size, config.hidden_size,
                       generator=torch.Generator().manual_seed(0))
    last_normed = tiny_pythia.info.last_state_after_final_norm
    states = tiny_pythia.info.n_layers + 1

    def lens(chunk_tokens):
        return LensPass(module, head, last_normed, tokens=2, seed=4,
                        chunk_elements=chunk_tokens * states * head.shape[0])

    together = extract(tiny_pythia, prompts, batch_size=2, progress=False,
                       token_metrics={"logit_lens": lens(3)})
    assert together.per_prompt["logit_lens/n"][:, 0].tolist() == [2, 2, 2, 2, 1]
    for row, prompt in enumerate(prompts):
        alone = extract(tiny_pythia, [prompt], batch_size=1, progress=False,
                        token_metrics={"logit_lens": lens(1000)})
        for name in ("ce", "kl", "top1", "n"):
            torch.testing.assert_close(together.per_prompt[f"logit_lens/{name}"][row],
                                       alone.per_prompt[f"logit_lens/{name}"][0],
                                       rtol=1e-4, atol=1e-5, msg=f"{name}, prompt {row}")


@pytest.mark.slow
def test_logit_lens_on_smollm2_ends_at_the_models_own_loss_and_its_sample_stays_near_it():
    """Every predicted token (tokens=0) against the causal LM's own loss; then the default
    sample (one token from half the prompts) on the same prompts and weights: fewer tokens
    counted, the last layer still the model's own prediction, and each layer's means within
    what a sample of ~30 tokens allows of the full lens's (README says what it measured)."""
    from transformers import AutoModelForCausalLM

    from lw.job.stages import compute, plan_job
    from lw.loading.model_sources import model_source
    from lw.loading.models import load_tokenizer

    base = ["model=smollm2", "data.n_prompts=64", "data.max_tokens=8", "data.min_tokens=8",
            "metrics=[logit_lens]"]
    job = compose_job([*base, "metric.logit_lens.tokens=0"])
    result = compute(job)
    table = result.table
    last = table.iloc[-1]
    assert last["logit_lens/kl"] == pytest.approx(0.0, abs=1e-6)
    assert last["logit_lens/top1"] == 1.0
    assert (table["logit_lens/kl"].iloc[:-1] > 0).all()
    # the causal LM, loaded independently, on the same prompts: its own mean next-token loss
    plan = plan_job(job, load_tokenizer(job.model))
    lm = AutoModelForCausalLM.from_pretrained(model_source(job.model).folder()[0]).eval()
    losses, tokens = 0.0, 0
    with torch.inference_mode():
        for prompt in plan.ids:
            ids = torch.tensor([prompt])
            losses += float(lm(input_ids=ids, labels=ids).loss) * (len(prompt) - 1)
            tokens += len(prompt) - 1
    assert result.summary["logit_lens/predicted_tokens"] == tokens
    assert last["logit_lens/ce"] == pytest.approx(losses / tokens, rel=1e-4)
    assert result.summary["logit_lens/model_loss"] == pytest.approx(losses / tokens, rel=1e-4)
    # an early layer is far from the final prediction
    assert table["logit_lens/ce"].iloc[1] > last["logit_lens/ce"]
    sampled = compute(compose_job(base))       # the default: a token from half the prompts
    assert 0 < sampled.summary["logit_lens/predicted_tokens"] < len(plan.ids)
    assert sampled.table["logit_lens/kl"].iloc[-1] == pytest.approx(0.0, abs=1e-6)
    assert sampled.table["logit_lens/top1"].iloc[-1] == 1.0
    # measured (28 tokens sampled): CE moved by up to 3.4 nats of ~20 (3.8 at the embeddings,
    # whose CE is 112), KL by up to 0.8 (1.9 of 110 at the embeddings), top-1 by up to 0.1
    for name, slack in (("ce", 2.5), ("kl", 4.0), ("top1", 0.3)):
        full = table[f"logit_lens/{name}"]
        gap = (sampled.table[f"logit_lens/{name}"] - full).abs()
        assert (gap < slack + 0.1 * full.abs()).all(), (name, gap.round(3).tolist())


def test_the_token_sample_is_seeded_by_the_prompt_at_most_k_per_prompt_and_batch_free():
    from lw.metrics.logit_lens import sample_predicted

    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (4, 12), generator=rng)
    predicts = torch.ones(4, 11, dtype=torch.bool)
    predicts[1, 3:] = False                              # a short prompt: 3 predicted tokens
    got = sample_predicted(predicts, ids, tokens=5, seed=7)
    assert got.sum(dim=1).tolist() == [5, 3, 5, 5]
    assert (got <= predicts).all() and got[1, :3].all()
    again = sample_predicted(predicts.flip(0), ids.flip(0), tokens=5, seed=7).flip(0)
    assert torch.equal(got, again)                       # the same prompts in another order
    assert not torch.equal(got, sample_predicted(predicts, ids, tokens=5, seed=8))
    assert torch.equal(sample_predicted(predicts, ids, tokens=0, seed=7), predicts)
    # a share of the prompts, one token each: about that share, nested, batch-free
    ids = torch.randint(5, 100, (400, 12), generator=rng)
    predicts = torch.ones(400, 11, dtype=torch.bool)
    half = sample_predicted(predicts, ids, tokens=0.5, seed=7)
    quarter = sample_predicted(predicts, ids, tokens=0.25, seed=7)
    assert set(half.sum(dim=1).tolist()) == {0, 1} == set(quarter.sum(dim=1).tolist())
    assert 160 < half.sum() < 240 and 60 < quarter.sum() < 140   # binomial: 5 sd either side
    assert (quarter.any(dim=1) <= half.any(dim=1)).all()
    assert torch.equal(half, sample_predicted(predicts.flip(0), ids.flip(0), tokens=0.5,
                                              seed=7).flip(0))
