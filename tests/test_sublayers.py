"""Sub-layer states (extraction.sublayers, lw.job.sublayers): the residual stream after each
block's attention addition and after its MLP addition, captured by hooks in the batched, padded
pass, against an independent float64 recomputation from each block's modules, unbatched (Llama:
sequential; GPT-NeoX: parallel, and sequential when use_parallel_residual is off; BERT:
post-norm); the logged prompt_entropy (every normalization) and curvature at those points
against float64 numpy references; tiny-mamba says one line and logs nothing; a job through
lw.job.stages.compute, its identity, and the model left with its own hooks only."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

import reference as ref
from conftest import compose_job, model_option
from lw.errors import LwError
from lw.job import sublayers
from lw.job.extract import extract
from lw.job.identity import forward_hash, forward_identity, job_hash
from lw.loading.architectures import ARCHITECTURES, block_list
from lw.loading.models import load_model
from lw.metrics import registry

CPU = torch.device("cpu")
LENGTHS = (17, 6, 11, 3, 14, 8)
SHAPE = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=512)
KINDS = ["llama", "gpt_neox", "gpt_neox_sequential", "bert"]


def option(kind: str):
    """A random tiny model of ``kind`` (tiny-pythia's tokenizer and seed)."""
    base = model_option("tiny-pythia")
    if kind == "gpt_neox":
        return base
    if kind == "gpt_neox_sequential":
        return dataclasses.replace(base, name="tiny-pythia-sequential",
                                   arch_config={**base.arch_config,
                                                "use_parallel_residual": False})
    shape = {**SHAPE, "num_key_value_heads": 2} if kind == "llama" else SHAPE
    return dataclasses.replace(base, name=f"tiny-{kind}", arch=kind,
                               family="encoder" if kind == "bert" else "decoder",
                               arch_config=shape)


@pytest.fixture(scope="module", params=KINDS)
def loaded(request):
    return request.param, load_model(option(request.param), CPU, seed=3)


def prompts(seed: int = 2) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 5000, (n,), generator=generator).tolist() for n in LENGTHS]


def hooks(model) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


# --- the reference: each block recomputed from its modules, float64, one prompt at a time -----

@torch.no_grad()
def reference_points(model, kind: str, prompt: list[int]):
    """``attn`` (L, T, D): after block l's attention addition; ``out`` (L, T, D): after its MLP
    addition (block outputs, the last before the final norm); ``states`` the model's own
    L + 1 hidden states, all float64, of one unpadded prompt."""
    model = copy.deepcopy(model).double()
    model.set_attn_implementation("eager")
    ids = torch.tensor([prompt])
    count = len(prompt)
    causal = torch.full((count, count), -math.inf, dtype=torch.float64).triu(1)[None, None]
    positions = torch.arange(count)[None]
    h = model.get_input_embeddings()(ids) if kind != "bert" else model.embeddings(input_ids=ids)
    attn, out = [], []
    for block in block_list(model, ARCHITECTURES["bert" if kind == "bert" else
                                                 "gpt_neox" if "gpt_neox" in kind else kind]):
        if kind == "llama":
            added = block.self_attn(block.input_layernorm(h), attention_mask=causal,
                                    position_embeddings=model.rotary_emb(h, positions))[0]
            mid = h + added
            h = mid + block.mlp(block.post_attention_layernorm(mid))
        elif kind.startswith("gpt_neox"):
            added = block.attention(block.input_layernorm(h), attention_mask=causal,
                                    position_embeddings=model.rotary_emb(h, positions))[0]
            mid = h + added
            mlp_in = h if kind == "gpt_neox" else mid          # parallel: ln2 reads h_in
            h = mid + block.mlp(block.post_attention_layernorm(mlp_in))
        else:                                                  # post-norm: LN after each
            mid = block.attention(h)[0]
            h = block.output(block.intermediate(mid), mid)
        attn.append(mid[0])
        out.append(h[0])
    states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    return torch.stack(attn), torch.stack(out), torch.stack([s[0] for s in states])


def captured(loaded_model, batch: list[list[int]], batch_size: int = 4):
    """Each prompt's (L+1, T, D) states as the hooks captured them in the padded, batched pass
    (rows 0..L-1 after the attention additions, row L block L's raw output)."""
    seen: dict[tuple, torch.Tensor] = {}

    def keep(states, kept, ids):
        for b in range(ids.shape[0]):
            seen[tuple(ids[b][kept[b]].tolist())] = states[:, b][:, kept[b]].clone()
        return {}

    with_hooks = sublayers.SublayerPass(loaded_model, [], reduce=keep)
    extract(loaded_model, batch, batch_size=batch_size, token_metrics={"sub": with_hooks},
            progress=False)
    return [seen[tuple(p)] for p in batch]


# --- 1, 3: the points ---------------------------------------------------------------------------

def test_captured_points_are_the_blocks_recomputed_from_their_modules(loaded):
    kind, model = loaded
    before = hooks(model.model)
    batch = prompts()
    got = captured(model, batch)
    n_layers = model.info.n_layers
    for prompt, states in zip(batch, got, strict=True):
        attn, out, hidden = reference_points(model.model, kind, prompt)
        # the reference is the model: its block outputs are the model's states 1..L-1
        np.testing.assert_allclose(out[:-1].numpy(), hidden[1:-1].numpy(), rtol=1e-10,
                                   atol=1e-10)
        np.testing.assert_allclose(states[:n_layers].double().numpy(), attn.numpy(),
                                   rtol=1e-5, atol=5e-6)
        np.testing.assert_allclose(states[n_layers].double().numpy(), out[-1].numpy(),
                                   rtol=1e-5, atol=5e-6)
        # the after-attention point is not a state of lw's: the MLP changes the stream
        assert not torch.allclose(attn, out, atol=1e-3)
    assert hooks(model.model) == before
    assert model.model.config._attn_implementation == "sdpa"


def test_gpt_neox_is_declared_parallel_and_its_switch_makes_it_sequential():
    from lw.loading.architectures import residual_of

    neox = ARCHITECTURES["gpt_neox"]
    assert neox.residual == "parallel" and neox.parallel_switch == "use_parallel_residual"
    parallel = load_model(option("gpt_neox"), CPU, seed=3).model.config
    sequential = load_model(option("gpt_neox_sequential"), CPU, seed=3).model.config
    assert residual_of(neox, parallel) == "parallel"
    assert residual_of(neox, sequential) == "sequential"
    assert [ARCHITECTURES[a].residual for a in ("llama", "bert", "mamba", "mamba2")] == [
        "sequential", "post-norm", "", ""]


def test_a_misdeclared_point_fails_and_a_failing_pass_removes_the_hooks(monkeypatch):
    model = load_model(option("llama"), CPU, seed=3)
    before = hooks(model.model)
    wrong = dataclasses.replace(ARCHITECTURES["llama"], mlp_norm="ln_2")
    monkeypatch.setitem(ARCHITECTURES, "llama", wrong)
    with pytest.raises(LwError, match="declared mlp_norm 'ln_2' is not a module"):
        extract(model, [[5, 6, 7]], batch_size=1, progress=False,
                token_metrics={"sub": sublayers.SublayerPass(model, ["spectrum/paper"])})
    assert hooks(model.model) == before
    monkeypatch.undo()

    def fails(hidden, kept, ids):
        raise RuntimeError("a token function failed")

    with pytest.raises(RuntimeError, match="a token function failed"):
        extract(model, [[5, 6, 7]], batch_size=1, progress=False,
                token_metrics={"sub": sublayers.SublayerPass(model, ["spectrum/paper"]),
                               "other": fails})
    assert hooks(model.model) == before


# --- 2: the metrics at the points ---------------------------------------------------------------

def measured(model, batch, skip_first: int):
    """prompt_entropy and curvature through the pass's token functions and the registry."""
    job = compose_job(["model=tiny-pythia", "metrics=[prompt_entropy,curvature]",
                       "extraction.sublayers=true", f"extraction.skip_first={skip_first}"])
    wanted = registry.token_products_needed(job)
    out = extract(model, batch, batch_size=4, skip_first=skip_first, progress=False,
                  token_metrics=sublayers.token_functions(job, model, wanted))
    values = {}
    for name in ("prompt_entropy", "curvature"):
        metric = registry.get(name)
        inputs = registry.Inputs(job=job, knobs=registry.knobs_of(job, metric), info=model.info,
                                 pooled=out.pooled, products=out.per_prompt,
                                 rows=out.n_tokens - skip_first, values={}, per_layer={},
                                 sublayers=True)
        values.update(metric.compute(inputs).per_prompt)
    return values


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_prompt_entropy_and_curvature_at_the_points_match_float64_numpy(kind):
    model = load_model(option(kind), CPU, seed=3)
    batch, skip = prompts(5), 1
    values = measured(model, batch, skip)
    n_layers, dim = model.info.n_layers, model.info.hidden_size
    for i, prompt in enumerate(batch):
        attn, out, _ = reference_points(model.model, kind, prompt)
        for layer in range(1, n_layers + 1):
            points = {"attn": attn[layer - 1], "mlp": out[layer - 1]}
            for where, states in points.items():
                z = ref.prep(states[skip:].numpy())
                expected = ref.normalized(ref.entropy(z, 1.0), len(z), dim)
                for norm in ref.NORMS:
                    got = float(values[f"prompt_entropy/{norm}/{where}"][i, layer])
                    assert got == pytest.approx(expected[norm], rel=1e-4, abs=1e-6), (
                        kind, where, norm, layer)
                got = float(values[f"curvature/{where}"][i, layer])
                assert got == pytest.approx(ref.curvature(z), rel=1e-4, abs=1e-6, nan_ok=True)
    for series in ("prompt_entropy/max", "prompt_entropy/logD", "curvature"):
        attn, mlp, plain = (values[f"{series}/attn"], values[f"{series}/mlp"], values[series])
        assert attn[:, 0].isnan().all() and mlp[:, 0].isnan().all()
        # after block l's MLP = lw's state l, but for l = L: block L before the final norm
        torch.testing.assert_close(mlp[:, 1:-1], plain[:, 1:-1], rtol=0, atol=0,
                                   equal_nan=True)
        assert not torch.allclose(mlp[:, -1], plain[:, -1])


# --- 4, 5: jobs ---------------------------------------------------------------------------------

def test_mamba_says_one_line_and_logs_nothing(capsys, lw_cache, monkeypatch):
    from lw.job.stages import compute

    monkeypatch.setenv("LW_CACHE_DIR", str(lw_cache))
    job = compose_job(["model=tiny-mamba", "data.n_prompts=4", "data.max_tokens=32",
                       "metrics=[prompt_entropy,curvature]", "extraction.sublayers=true",
                       "extraction.cache=true"])
    line = ("[lw] extraction.sublayers: tiny-mamba has no attention / MLP split (mamba): "
            "no sub-layer series")
    for hit in (0.0, 1.0):                          # the pass, then the cache entry it wrote
        capsys.readouterr()
        result = compute(job)
        said = [s for s in capsys.readouterr().err.splitlines() if "sublayers" in s]
        assert said == [line]
        assert result.summary["activation_cache_hit"] == hit
        assert not [k for k in [*result.table.columns, *result.summary]
                    if k.endswith(("/attn", "/mlp")) or "/attn/" in k or "/mlp/" in k]
        assert result.table["prompt_entropy/max"].notna().sum() > 0


def test_a_job_logs_the_series_at_the_points(capsys):
    from lw.job.stages import _LAST_MODEL, compute

    overrides = ["model=tiny-pythia", "data.n_prompts=6", "data.max_tokens=32",
                 "extraction.skip_first=1", "extraction.batch_size=4",
                 "metrics=[prompt_entropy,curvature]", "metric.normalizations=[max,logN]"]
    job = compose_job([*overrides, "extraction.sublayers=true"])
    plain_job = compose_job(overrides)
    before = hooks(load_model(job.model, CPU, seed=job.seed).model)
    result, plain = compute(job), compute(plain_job)
    table = result.table
    n_layers = len(table) - 1
    added = [f"{s}/{w}" for s in ("prompt_entropy/max", "prompt_entropy/logN", "curvature")
             for w in ("attn", "mlp")]
    assert set(added) <= set(table.columns)
    assert not set(added) & set(plain.table.columns)
    for name in added:
        assert table[name].isna().tolist() == [True] + [False] * n_layers, name
        series = name.rsplit("/", 1)[0]
        # the plain series are the job's without sublayers; /mlp is them but at layer L
        np.testing.assert_allclose(table[series], plain.table[series], rtol=1e-6)
        if name.endswith("/mlp"):
            np.testing.assert_allclose(table[name][1:n_layers], table[series][1:n_layers],
                                       rtol=0, atol=0)
    assert (table["prompt_entropy/max/attn"][1:] != table["prompt_entropy/max/mlp"][1:]).all()
    assert "sublayers" not in capsys.readouterr().err
    (model,) = [loaded.model for loaded in _LAST_MODEL.values()]
    assert hooks(model) == before
    # a product-adding knob: the forward pass's identity, counted only when on
    assert forward_hash(job) != forward_hash(plain_job) and job_hash(job) != job_hash(plain_job)
    assert "sublayers" not in forward_identity(plain_job)["extraction"]
    assert forward_identity(job)["extraction"]["sublayers"] is True


def test_sublayers_without_a_metric_measured_there_says_so(capsys):
    from lw.job.stages import compute

    job = compose_job(["model=tiny-pythia", "data.n_prompts=4", "data.max_tokens=32",
                       "metrics=[dataset_entropy]", "extraction.sublayers=true"])
    compute(job)
    said = [s for s in capsys.readouterr().err.splitlines() if "sublayers" in s]
    assert said == ["[lw] extraction.sublayers: none of the job's metrics is measured at the "
                    "sub-layer points (prompt_entropy and curvature are)"]
