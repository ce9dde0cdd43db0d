"""lw.architectures: one layer convention for every architecture (state 0 = embedding output,
state l = block l, state L = last block after the final norm), checked on every load.

tiny-mamba2 (random-init transformers Mamba2) runs a real ``python -m lw.run`` job whose logged
values match float64 metrics of states built block by block, unbatched; a mis-declared or
unregistered architecture fails loudly; an LLM2Vec-style model (bidirectional Llama + merged
LoRA adapters) is built from local folders; the hub options fail fast offline naming their ids.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import reference as ref
from conftest import compose_job, load_option, lw_cli, model_option, option_yaml, wiki_records
from lw.config.schema import ModelConfig
from lw.errors import LwError
from lw.job.extract import all_layers
from lw.loading.architectures import ARCHITECTURES, architecture, check_layer_convention
from lw.loading.model_sources import load_tokenizer_of
from lw.loading.models import load_model

CPU = torch.device("cpu")
N_PROMPTS = 5
MAX_TOKENS = 40


@torch.no_grad()
def blockwise_states(model, ids: list[int]) -> list[torch.Tensor]:
    """One prompt's L+1 states from a Mamba/Mamba2 base model run block by block (no
    output_hidden_states): embeddings, each block's output, the last one through norm_f."""
    h = model.get_input_embeddings()(torch.tensor([ids]))
    states = [h]
    for block in model.layers:
        h = block(h)
        h = h[0] if isinstance(h, tuple) else h
        states.append(h)
    states[-1] = model.norm_f(states[-1])
    return [s[0] for s in states]


def texts() -> list[str]:
    """Wikipedia leads cut to different lengths: batches of one length, several batches."""
    leads = [r["extract"] for r in wiki_records()[:N_PROMPTS]]
    return [lead[:60 + 40 * i] for i, lead in enumerate(leads)]


@pytest.fixture(scope="module")
def tiny_mamba2():
    return load_option("tiny-mamba2")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mamba2")
    data = tmp / "wiki.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()))
    command = ["-m", "model=tiny-mamba2", "data=local",
               f"data.path={data}", f"data.n_prompts={N_PROMPTS}",
               f"data.max_tokens={MAX_TOKENS}", "extraction.batch_size=4",
               "metrics=[prompt_entropy,curvature,dataset_entropy]",
               f"tracking.uri=sqlite:///{tmp}/mlflow.db",
               f"tracking.artifact_location={tmp}/artifacts", f"hydra.sweep.dir={tmp}/multirun"]
    done = lw_cli(tmp, *command)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    return {"done": done, "client": client,
            "run": next((r for r in runs if "mlflow.parentRunId" in r.data.tags), None)}


# --- tiny-mamba2 ------------------------------------------------------------------------------

def test_tiny_mamba2_job_matches_unbatched_blockwise_states(job):
    """The job's per-layer values equal float64 metrics of states built block by block, one
    prompt at a time: so every logged layer l is block l (state 0 the embeddings)."""
    assert job["done"].returncode == 0, job["done"].stderr[-3000:]
    run = job["run"]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["lw.model.architecture"], tags["lw.model.family"]) == ("mamba2", "ssm")
    assert tags["lw.model.n_layers"] == "4"
    loaded = load_option("tiny-mamba2", seed=0)
    entropy, curvature, pooled = [], [], []
    for text in texts():
        ids = loaded.tokenizer(text)["input_ids"][:MAX_TOKENS]
        layers = [s.double().numpy() for s in blockwise_states(loaded.model, ids)]
        entropy.append([ref.normalized(ref.entropy(ref.prep(h), 1.0), len(ids),
                                       h.shape[-1])["max"] for h in layers])
        curvature.append([ref.curvature(ref.prep(h)) for h in layers])
        pooled.append([h.mean(axis=0) for h in layers])
    pooled = np.array(pooled)                                           # (N, L+1, D)
    expected = {
        "prompt_entropy/max": np.mean(entropy, axis=0),
        "curvature": np.mean(curvature, axis=0),
        "dataset_entropy/max": [ref.normalized(ref.entropy(ref.prep(pooled[:, k]), 1.0),
                                               *pooled[:, k].shape)["max"]
                                for k in range(pooled.shape[1])]}
    for name, values in expected.items():
        history = job["client"].get_metric_history(run.info.run_id, name)
        logged = np.array([m.value for m in sorted(history, key=lambda m: m.step)])
        assert len(logged) == 5, name
        np.testing.assert_allclose(logged, values, rtol=1e-5, err_msg=name)


@torch.no_grad()
def test_tiny_mamba2_batched_states_equal_blockwise_states(tiny_mamba2):
    """all_layers on a batch of equal-length prompts = the block-by-block states of each."""
    ids = torch.tensor([tiny_mamba2.tokenizer(t)["input_ids"][:12] for t in texts()[:3]])
    assert ids.shape == (3, 12)
    hidden = all_layers(tiny_mamba2, ids, torch.ones_like(ids, dtype=torch.bool))
    assert hidden.shape == (5, 3, 12, 128)
    for row in range(3):
        expected = torch.stack(blockwise_states(tiny_mamba2.model, ids[row].tolist()))
        torch.testing.assert_close(hidden[:, row], expected, rtol=1e-5, atol=1e-5)
    info = tiny_mamba2.info
    assert (info.architecture, info.n_layers, info.last_state_after_final_norm) == (
        "mamba2", 4, True)


def test_tiny_mamba2_is_seeded_and_must_be_family_ssm():
    a, b = load_option("tiny-mamba2", seed=0), load_option("tiny-mamba2", seed=1)
    assert not torch.equal(a.model.get_input_embeddings().weight,
                           b.model.get_input_embeddings().weight)
    cfg = dataclasses.replace(model_option("tiny-mamba2"), family="decoder")
    with pytest.raises(LwError, match="family='decoder'.*mamba2.*'ssm'"):
        load_model(cfg, CPU)


# --- the check on every load ----------------------------------------------------------------

def test_a_misdeclared_architecture_fails_on_load(monkeypatch, tiny_mamba2, tiny_pythia):
    """Mamba2 declared like a transformer (hidden_states taken as-is): state 0 would be block
    1's output, every layer shifted by one. The load itself fails."""
    wrong = dataclasses.replace(ARCHITECTURES["mamba2"], layout="embeddings-first")
    with pytest.raises(LwError, match="mamba2.*state 0 is not the embedding output"):
        check_layer_convention(tiny_mamba2.model, wrong)
    monkeypatch.setitem(ARCHITECTURES, "mamba2", wrong)
    with pytest.raises(LwError, match="state 0"):
        load_option("tiny-mamba2")
    # A transformer declared like Mamba: state 0 is right by construction, state 1 is not.
    wrong = dataclasses.replace(ARCHITECTURES["gpt_neox"], layout="blocks+norm")
    with pytest.raises(LwError, match="gpt_neox.*state 1 is not block 1's output"):
        check_layer_convention(tiny_pythia.model, wrong)
    wrong = dataclasses.replace(ARCHITECTURES["gpt_neox"], blocks="encoder.layer")
    with pytest.raises(LwError, match="'encoder.layer' are not a module list"):
        check_layer_convention(tiny_pythia.model, wrong)


def test_an_unregistered_architecture_is_named_with_the_registered_ones(tmp_path, hub_down):
    with pytest.raises(LwError, match=r"'rwkv' is not registered.*gpt_neox, mamba, mamba2"):
        architecture("rwkv")
    import transformers

    folder = tmp_path / "gpt2"
    transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2)).save_pretrained(folder)
    load_tokenizer_of("smollm2").save_pretrained(folder)
    cfg = ModelConfig(name="local-gpt2", source="hub", id=str(folder))
    with pytest.raises(LwError, match="'gpt2' is not registered.*llama, bert"):
        load_model(cfg, CPU)


# --- LLM2Vec: bidirectional attention + merged LoRA adapters -------------------------------

@pytest.fixture(scope="module")
def llm2vec_folders(tmp_path_factory):
    """A tiny random Llama (the base) and two LoRA adapters with non-zero weights, in folders."""
    import transformers
    from peft import LoraConfig, get_peft_model

    tmp = tmp_path_factory.mktemp("llm2vec")
    config = transformers.LlamaConfig(vocab_size=len(load_tokenizer_of("smollm2")),
                                      hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaModel(config).save_pretrained(tmp / "base")
    load_tokenizer_of("smollm2").save_pretrained(tmp / "base")
    for seed, name in enumerate(["mntp", "simcse"]):
        torch.manual_seed(seed + 1)
        base = transformers.LlamaModel.from_pretrained(tmp / "base")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(tmp / name)
    return tmp


def hand_merged(folders) -> dict[str, torch.Tensor]:
    """The base weights plus scaling * B @ A of each adapter, from the saved files."""
    import transformers
    from safetensors.torch import load_file

    weights = transformers.LlamaModel.from_pretrained(folders / "base").state_dict()
    for name in ["mntp", "simcse"]:
        lora = load_file(folders / name / "adapter_model.safetensors")
        scaling = 8 / 4
        for key, a in lora.items():
            if ".lora_A." in key:
                b = lora[key.replace(".lora_A.", ".lora_B.")]
                target = key.split("base_model.model.")[1].replace(".lora_A.weight", ".weight")
                weights[target] = weights[target] + scaling * b @ a
    return weights


@torch.no_grad()
def test_llm2vec_style_model_merges_adapters_and_attends_both_ways(llm2vec_folders, hub_down):
    """Loaded offline from folders as a hub model would be: weights = base + every adapter's
    scaling * B @ A; token 0's state sees the last token; right padding changes nothing."""
    cfg = ModelConfig(name="tiny-llm2vec", source="hub", id=str(llm2vec_folders / "base"),
                      family="encoder", bidirectional=True,
                      adapters=[str(llm2vec_folders / "mntp"), str(llm2vec_folders / "simcse")])
    loaded = load_model(cfg, CPU)
    merged = loaded.model.state_dict()
    expected = hand_merged(llm2vec_folders)
    assert merged.keys() == expected.keys()  # no lora_A / lora_B left: merged and unloaded
    for key, weight in expected.items():
        torch.testing.assert_close(merged[key], weight, rtol=1e-5, atol=1e-6, msg=key)
    base = transformers_weights(llm2vec_folders)
    assert not torch.equal(merged["layers.0.self_attn.q_proj.weight"],
                           base["layers.0.self_attn.q_proj.weight"])
    ids = torch.tensor([[11, 12, 13, 14], [11, 12, 13, 99]])
    hidden = all_layers(loaded, ids, torch.ones_like(ids, dtype=torch.bool))
    assert hidden.shape == (3, 2, 4, 32)
    assert not torch.allclose(hidden[1:, 0, 0], hidden[1:, 1, 0])  # token 0 sees token 3
    torch.testing.assert_close(hidden[0, 0, :3], hidden[0, 1, :3])  # embeddings do not
    padded = torch.tensor([[11, 12, 13, 14, 0, 0]])
    mask = torch.tensor([[True] * 4 + [False] * 2])
    torch.testing.assert_close(all_layers(loaded, padded, mask)[:, 0, :4], hidden[:, 0],
                               rtol=1e-5, atol=1e-5)


def test_an_adapter_missing_offline_is_named(llm2vec_folders, hub_down):
    """The base is at hand (a folder) but the adapter is a hub id not in the cache."""
    adapter = "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp"
    cfg = ModelConfig(name="tiny-llm2vec", source="hub", id=str(llm2vec_folders / "base"),
                      family="encoder", bidirectional=True, adapters=[adapter])
    with pytest.raises(LwError, match=f"with adapters {adapter} .*unreachable"):
        load_model(cfg, CPU)


def transformers_weights(folders) -> dict[str, torch.Tensor]:
    import transformers

    return transformers.LlamaModel.from_pretrained(folders / "base").state_dict()


# --- hub options, without the hub -----------------------------------------------------------

@pytest.mark.parametrize("name, ids", [
    ("mamba2", ["AntonV/mamba2-2.7b-hf"]),
    ("mamba2-370m", ["AntonV/mamba2-370m-hf"]),
    ("llm2vec", ["meta-llama/Meta-Llama-3-8B-Instruct",
                 "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
                 "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised"]),
    ("llm2vec-unsup", ["McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-unsup-simcse"]),
])
def test_hub_options_fail_fast_offline_naming_their_ids(name, ids, hub_down):
    cfg = model_option(name)
    with pytest.raises(LwError) as error:
        load_model(cfg, CPU)
    message = str(error.value)
    assert all(i in message for i in ids), message
    assert "unreachable" in message and "tiny-mamba2" in message


def test_architectures_experiment_sweeps_mamba2_and_llm2vec():
    sweep = option_yaml("experiment", "architectures")["hydra"]["sweeper"]["params"]["model"]
    assert {"pythia", "mamba", "mamba2", "bert", "llm2vec"} <= set(sweep.split(","))
    for name in sweep.split(","):  # each composes with the experiment
        assert compose_job(["+experiment=architectures", f"model={name}"]).model.name == name
    llm2vec = model_option("llm2vec")
    assert llm2vec.bidirectional and llm2vec.family == "encoder" and len(llm2vec.adapters) == 2
    assert (model_option("mamba2").family, model_option("tiny-mamba2").arch) == ("ssm", "mamba2")
