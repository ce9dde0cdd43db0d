"""sink_rate (lw.metrics.sink_rate): a GPT-NeoX whose weights make some layers' heads attend to the
first token alone and the others uniformly (the answer known in closed form); a float64 numpy
reference from a separate eager pass with output_attentions=True, per prompt and unpadded,
against the batched, padded pass of the metric on random GPT-NeoX, Llama and BERT; the first
real token found whichever side the padding is on; tiny-mamba says one line and logs nothing;
a job logs the series and leaves the model in SDPA attention with its own hooks only, also when
the pass fails."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import compose_job, load_option, model_option
from lw.job.extract import extract
from lw.loading.models import load_model
from lw.metrics import registry
from lw.metrics.sink_rate import PRODUCT, first_columns, first_mass

CPU = torch.device("cpu")
SINK_LAYERS = (2, 4)                 # of tiny-pythia's 6 blocks (layer l = block l)


def measure(loaded, prompts: list[list[int]], skip_first: int, eps: float = 0.3,
            batch_size: int = 3):
    """The metric through the registry's token function and compute, on ``prompts``."""
    job = compose_job(["model=tiny-pythia", "metrics=[sink_rate]",
                       f"extraction.skip_first={skip_first}", f"metric.sink_rate.eps={eps}"])
    wanted = registry.token_products_needed(job)
    out = extract(loaded, prompts, batch_size=batch_size, skip_first=skip_first,
                  token_metrics=registry.token_functions(job, loaded, wanted), progress=False)
    metric = registry.get("sink_rate")
    inputs = registry.Inputs(job=job, knobs=registry.knobs_of(job, metric), info=loaded.info,
                             pooled=out.pooled, products=out.per_prompt, rows=out.n_tokens,
                             values={}, per_layer={})
    return metric.compute(inputs), out


def hooks(model) -> list[int]:
    """How many forward hooks each module holds (transformers installs its own)."""
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def assert_restored(model, before: list[int]) -> None:
    """After the pass: the model's own attention implementation, and the hooks it had."""
    assert model.config._attn_implementation == "sdpa"
    assert hooks(model) == before


# --- a model whose answer is known ----------------------------------------------------------

@torch.no_grad()
def sink_model(first: int):
    """tiny-pythia (random GPT-NeoX, 6 blocks, 4 heads of 32 dims, 8 of them rotary) edited so
    that the residual stream stays the embeddings (attention and MLP outputs zeroed), token
    ``first``'s embedding is a zero-mean unit vector v that every other embedding is orthogonal
    to, and
    - in SINK_LAYERS every head's query is a constant (bias only) along a non-rotary dimension
      and its key reads v: query t scores 50+ on a key of token ``first``, exactly 0 on others;
    - elsewhere the queries are 0: every score 0, uniform causal attention.
    """
    loaded = load_option("tiny-pythia")
    model = loaded.model
    width, heads = model.config.hidden_size, model.config.num_attention_heads
    size = width // heads
    rotary = model.layers[0].attention.rotary_ndims
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(width, generator=generator, dtype=torch.float64)
    v -= v.mean()
    v /= v.norm()
    table = model.embed_in.weight
    rows = table.double()
    rows -= rows @ v[:, None] * v[None, :]
    rows[first] = v
    table.copy_(rows.float())
    for index, block in enumerate(model.layers):
        attention = block.attention
        attention.dense.weight.zero_()
        attention.dense.bias.zero_()
        block.mlp.dense_4h_to_h.weight.zero_()
        block.mlp.dense_4h_to_h.bias.zero_()
        qkv = attention.query_key_value
        # rows of head h: [q (size) | k (size) | v (size)] at h * 3 * size
        for h in range(heads):
            q, k = h * 3 * size, h * 3 * size + size
            qkv.weight[q:q + size] = 0.0
            qkv.bias[q:q + size] = 0.0
            if index + 1 in SINK_LAYERS:
                qkv.bias[q + rotary] = 30.0 / math.sqrt(width)  # constant query
                qkv.weight[k:k + size] = 0.0
                qkv.bias[k:k + size] = 0.0
                qkv.weight[k + rotary] = torch.as_tensor(v, dtype=torch.float32) * 30.0
    return loaded


def test_layers_made_to_sink_have_rate_one_and_the_others_uniform_attention():
    first, skip_first = 7, 1
    loaded = sink_model(first)
    before = hooks(loaded.model)
    generator = torch.Generator().manual_seed(1)
    lengths = [20, 13, 9, 16, 5]
    prompts = [[first] + (torch.randint(100, 5000, (n - 1,), generator=generator)).tolist()
               for n in lengths]
    out, extraction = measure(loaded, prompts, skip_first=skip_first)
    n_layers, heads = loaded.info.n_layers, loaded.model.config.num_attention_heads
    rate, mass = out.per_layer["sink_rate/rate"], out.per_layer["sink_rate/first_mass"]
    # uniform causal attention: query t (0-based) puts 1 / (t + 1) on the first token
    uniform = np.mean([np.mean([1 / (t + 1) for t in range(skip_first, n)]) for n in lengths])
    assert math.isnan(rate[0]) and math.isnan(mass[0])
    for layer in range(1, n_layers + 1):
        sink = layer in SINK_LAYERS
        assert rate[layer] == (1.0 if sink else 0.0), layer
        assert mass[layer] == pytest.approx(1.0 if sink else uniform, abs=1e-6), layer
    heads_table = out.tables["sink_rate_heads"]
    assert list(heads_table.columns) == ["layer", *map(str, range(heads))]
    assert out.summary["summary/sink_rate/all_layers"] == len(SINK_LAYERS) / n_layers
    assert extraction.per_prompt[PRODUCT].shape == (len(prompts), n_layers + 1, heads)
    assert_restored(loaded.model, before)
    # eps above the uniform mass but below 1: the same; eps = 1 still counts the sinks (>=)
    assert measure(loaded, prompts, skip_first, eps=1.0)[0].per_layer["sink_rate/rate"][2] == 1


# --- an independent float64 reference -------------------------------------------------------

def reference(model, prompts: list[list[int]], skip_first: int, eps: float):
    """a (L+1, H), rate (L+1,), mass (L+1,) in float64 numpy, from each prompt's attention
    probabilities of a separate eager pass (output_attentions=True), one prompt at a time."""
    model.set_attn_implementation("eager")
    per_prompt = []
    try:
        with torch.inference_mode():
            for prompt in prompts:
                out = model(input_ids=torch.tensor([prompt]), output_attentions=True,
                            use_cache=False)
                weights = np.stack([w[0].double().numpy() for w in out.attentions])
                per_prompt.append(weights[:, :, skip_first:, 0].mean(axis=-1))   # (L, H)
    finally:
        model.set_attn_implementation("sdpa")
    a = np.mean(per_prompt, axis=0)
    nan = np.full((1, a.shape[1]), np.nan)
    a = np.concatenate([nan, a])
    rate = (a >= eps).mean(axis=1)
    rate[0] = np.nan
    return a, rate, a.mean(axis=1)


def option(arch: str):
    """A random tiny model of ``arch`` (tiny-pythia's tokenizer and seed)."""
    if arch == "gpt_neox":
        return model_option("tiny-pythia")
    shapes = {"llama": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128,
                            max_position_embeddings=512),
              "bert": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=512)}
    return dataclasses.replace(model_option("tiny-pythia"), name=f"tiny-{arch}", arch=arch,
                               family="encoder" if arch == "bert" else "decoder",
                               arch_config=shapes[arch])


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "bert"])
def test_padded_batched_pass_matches_float64_reference_of_eager_weights(arch):
    loaded = load_model(option(arch), CPU, seed=3)
    before = hooks(loaded.model)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 5000, (n,), generator=generator).tolist()
               for n in (17, 6, 11, 3, 14, 8, 2)]
    # eps between two heads' values, so that the rate is not 0 or 1 by construction
    a, _, _ = reference(loaded.model, prompts, 1, 0.3)
    values = np.sort(a[1:].ravel())
    eps = float(values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    a, rate, mass = reference(loaded.model, prompts, 1, eps)
    out, _ = measure(loaded, prompts, skip_first=1, eps=eps)               # padded batches of 3
    got = out.tables["sink_rate_heads"].drop(columns="layer").to_numpy()
    np.testing.assert_allclose(got, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.per_layer["sink_rate/rate"].numpy(), rate)
    np.testing.assert_allclose(out.per_layer["sink_rate/first_mass"].numpy(), mass,
                               rtol=1e-5, atol=1e-6)
    assert 0 < np.nanmean(rate) < 1
    assert_restored(loaded.model, before)


def test_first_token_is_the_first_real_one_whichever_side_the_padding_is_on():
    rng = np.random.default_rng(0)
    layers, heads, width = 2, 3, 6
    lengths = [6, 4, 2]
    weights = rng.random((layers, len(lengths), heads, width, width))
    right = np.arange(width)[None, :] < np.array(lengths)[:, None]          # (B, T)
    left = right[:, ::-1].copy()
    for mask in (right, left):
        kept = mask & (np.cumsum(mask, axis=1) > 1)                          # skip_first=1
        columns = torch.stack([first_columns(torch.tensor(w), torch.tensor(mask))
                               for w in weights])
        got = first_mass(columns, torch.tensor(kept)).numpy()
        assert np.isnan(got[0]).all()
        for b in range(len(lengths)):
            start = int(np.argmax(mask[b]))
            queries = np.flatnonzero(kept[b])
            expected = weights[:, b][:, :, queries, start].mean(axis=-1)     # (L, H)
            np.testing.assert_allclose(got[1:, b], expected, rtol=1e-12)


# --- no attention ---------------------------------------------------------------------------

def test_mamba_says_one_line_and_logs_nothing(capsys, lw_cache, monkeypatch):
    from lw.job.stages import compute

    monkeypatch.setenv("LW_CACHE_DIR", str(lw_cache))
    job = compose_job(["model=tiny-mamba", "data.n_prompts=4", "data.max_tokens=32",
                       "metrics=[sink_rate,curvature]", "extraction.cache=true"])
    line = "[lw] sink_rate: tiny-mamba has no attention (mamba): not measured"
    for hit in (0.0, 1.0):                          # the pass, then the cache entry it wrote
        capsys.readouterr()
        result = compute(job)
        said = [s for s in capsys.readouterr().err.splitlines() if "sink_rate" in s]
        assert said == [line]
        assert result.summary["activation_cache_hit"] == hit
        assert not [k for k in [*result.table.columns, *result.summary, *result.tables]
                    if "sink_rate" in k]
        assert result.table["curvature"].notna().sum() > 0


# --- a job ----------------------------------------------------------------------------------

def test_job_logs_the_series_and_leaves_the_model_as_it_was():
    from lw.job.stages import _LAST_MODEL, compute, plan_job
    from lw.loading.models import load_tokenizer

    job = compose_job(["model=tiny-pythia", "data.n_prompts=6", "data.max_tokens=32",
                       "extraction.skip_first=1", "extraction.batch_size=4",
                       "metrics=[sink_rate,curvature]"])
    result = compute(job)
    table = result.table
    assert {"sink_rate/rate", "sink_rate/first_mass", "curvature"} <= set(table.columns)
    assert table["sink_rate/rate"].isna().tolist() == [True] + [False] * 6
    assert registry.get("sink_rate").logs.keys() <= set(table.columns)
    assert "summary/sink_rate/all_layers" in result.summary
    # the job's values are the reference's on the job's own prompts
    plan = plan_job(job, load_tokenizer(job.model))
    (model,) = [loaded.model for loaded in _LAST_MODEL.values()]
    assert_restored(model, hooks(load_option("tiny-pythia").model))
    a, rate, mass = reference(model, plan.ids, 1, 0.3)
    np.testing.assert_allclose(result.tables["sink_rate_heads"].drop(columns="layer"), a,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table["sink_rate/rate"], rate)
    np.testing.assert_allclose(table["sink_rate/first_mass"], mass, rtol=1e-5, atol=1e-6)


def test_a_failing_pass_leaves_the_model_as_it_was():
    from lw.metrics.sink_rate import SinkPass

    loaded = load_option("tiny-pythia")
    before = hooks(loaded.model)

    def fails(hidden, kept, ids):
        assert loaded.model.config._attn_implementation == "eager"  # inside the pass
        raise RuntimeError("a token function failed")

    with pytest.raises(RuntimeError, match="a token function failed"):
        extract(loaded, [[5, 6, 7]], batch_size=1, progress=False,
                token_metrics={"sink_rate": SinkPass(loaded), "other": fails})
    assert_restored(loaded.model, before)
