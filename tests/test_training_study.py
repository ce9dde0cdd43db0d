"""The offline training study (lw.training.study): a few steps of a tiny config save loadable,
distinct checkpoints at the log-spaced steps, step 0 is the seeded initialisation, a second
launch does not retrain and a changed knob does; bad train options say one line."""

from __future__ import annotations

import json

import pytest
import torch

from lw.config.training import TrainConfig
from lw.errors import ConfigError
from lw.training.study import MARKER, TrainFirst, train_once

TINY = dict(texts=120, vocab_size=300, hidden_size=16, layers=2, heads=2, intermediate_size=32,
            steps=4, batch_size=4, seq_len=16, learning_rate=0.01, seed=3, watch_prompts=8)


def _weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.slow
def test_checkpoints_saved_loadable_distinct_watched_and_not_retrained(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # the watcher's run: lw's store rule
    cfg = TrainConfig(out=str(tmp_path / "run"), **TINY)
    assert cfg.checkpoint_steps() == [0, 1, 2, 4]
    assert train_once(cfg) is True
    out = tmp_path / "run"
    # watched while training (lw.LayerwiseCallback): one run per saved step under a training
    # run, which holds the long table and a heat map
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    training = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(training) == 1 and training[0].info.status == "FINISHED"
    steps = sorted(int(r.data.tags["lw.train.step"]) for r in runs
                   if r.data.tags.get("mlflow.parentRunId") == training[0].info.run_id)
    assert steps == [0, 1, 2, 4]
    import pandas as pd

    table = pd.read_csv(out / "lw" / "layers" / "table.csv")
    entropy = table[table.metric.str.startswith("prompt_entropy/")]
    assert len(entropy) and entropy.groupby("metric").size().eq(4 * 3).all()  # steps x layers
    assert sorted(entropy.step.unique()) == [0, 1, 2, 4]
    assert (out / "lw" / "layers" / f"{entropy.metric.iloc[0]}.png").is_file()
    weights = {step: _weights(out / f"step{step}") for step in (0, 1, 2, 4)}
    for a, b in [(0, 1), (1, 2), (2, 4)]:
        assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)

    # step 0 is the seeded initialisation: the same config built under the same seed
    torch.manual_seed(3)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "step0"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights[0].items())

    # the saved tokenizer is the model's: its ids fit the embedding
    tokenizer = AutoTokenizer.from_pretrained(out / "step4")
    ids = tokenizer("The moon is a satellite.", return_tensors="pt")["input_ids"]
    assert int(ids.max()) < weights[4]["gpt_neox.embed_in.weight"].shape[0]
    assert json.loads((out / MARKER).read_text())["train"]["steps"] == 4

    # a second launch (the Hydra callback, same keys) trains nothing: files untouched
    stamp = (out / "step4" / "model.safetensors").stat().st_mtime_ns
    TrainFirst(out=cfg.out, **TINY).on_run_start(config=None)
    assert (out / "step4" / "model.safetensors").stat().st_mtime_ns == stamp

    # a changed knob trains afresh: another final model, the marker says the new value
    TrainFirst(out=cfg.out, **{**TINY, "learning_rate": 0.02, "watch": []}).on_run_start(
        config=None)
    assert json.loads((out / MARKER).read_text())["train"]["learning_rate"] == 0.02
    changed = _weights(out / "step4")
    assert any(not torch.equal(changed[k], weights[4][k]) for k in changed)
    assert torch.equal(_weights(out / "step0")["gpt_neox.embed_in.weight"],
                       weights[0]["gpt_neox.embed_in.weight"])  # same seed, same start


@pytest.mark.slow
def test_seq_vcr_with_pause_tokens_trains(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "vcr"), **{**TINY, "steps": 2}, checkpoints=[2], watch=[],
                      seq_vcr={"on": True, "layer": 1, "projection_size": 8, "pause_tokens": 2})
    train_once(cfg)
    out = tmp_path / "vcr"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "step2")
    assert "<|pause|>" in tokenizer.get_vocab()
    assert _weights(out / "step2")["gpt_neox.embed_in.weight"].shape[0] == len(tokenizer)


@pytest.mark.slow
def test_the_experiment_trains_watched_inside_its_sweep_then_measures_the_revisions(tmp_path):
    """+experiment=training_dynamics_offline through lw.run, where Hydra runs TrainFirst as its
    callback (Hydra turns a callback's exception into a warning: a training that failed there
    once let every job fail on checkpoints never saved): the watched training runs before the
    jobs, the revisions swept on the command line are measured from its folder, and one it did
    not save is one line before any job."""
    from mlflow.tracking import MlflowClient

    from conftest import lw_cli

    tiny = [f"++hydra.callbacks.train_first.{key}={value}" for key, value in TINY.items()
            if key != "seed"]
    store = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["+experiment=training_dynamics_offline", *tiny, "data.n_prompts=16",
              "data.max_tokens=16", "data.min_tokens=8", "metrics=[prompt_entropy]",
              f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/multirun"]
    done = lw_cli(tmp_path, "-m", *common, "model.revision=step0,step4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GlobalHydra" not in done.stderr and "2 of 2 jobs finished" in done.stdout
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    watched = sorted(int(r.data.tags["lw.train.step"]) for r in runs
                     if "lw.train.step" in r.data.tags)
    assert watched == [0, 1, 2, 4]
    jobs = sorted(r.data.params["model.revision"] for r in runs
                  if r.data.params.get("model.revision") and "lw.train.step" not in r.data.tags)
    assert jobs == ["step0", "step4"]
    refused = lw_cli(tmp_path, "-m", *common, "model.revision=step0,step3")
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("[lw] error")]
    assert errors == ["[lw] error: model.revision=step3: not saved by the training in "
                      "training/tiny-neox; it saves step0,step1,step2,step4"], refused.stderr
    assert "Launching" not in refused.stderr


@pytest.mark.parametrize("bad, match", [
    ({"hidden_size": 10, "heads": 4}, "train.hidden_size=10 is not a multiple"),
    ({"batch_size": 1}, r"train.batch_size=1: must be >= 2"),
    ({"checkpoints": [0, 999]}, r"train.checkpoints=\[0, 999\]"),
    ({"vocab_size": 100}, "train.vocab_size=100"),
    ({"seq_vcr": {"layer": 7}}, r"train.seq_vcr.layer=7: the model has hidden states 0..4"),
    ({"seq_vcr": {"eta": 0}}, "train.seq_vcr.eta=0: must be > 0"),
    ({"seq_vcr": {"pause_at": 1.0}}, "train.seq_vcr.pause_at=1.0"),
])
def test_bad_train_options_say_one_line(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)
