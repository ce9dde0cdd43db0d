"""lw.LayerwiseCallback on a real transformers.Trainer (a tiny random GPT-NeoX with dropout,
smollm2's tokenizer, CPU, a temporary SQLite store through transformers' own MLflowCallback) and
in a hand-written loop: the values it logs at a step are lw.measure's on the checkpoint saved at
that step, the training is the same with it as without it, and its runs and artifacts are
where it says."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

import lw
from lw.config.tracking import TrackingConfig
from lw.errors import ConfigError, LwError
from lw.tracking.keys import ARTIFACTS, TAGS, declared
from lw.tracking.store import client_for

PROMPTS = [f"Item {i}: the river runs past the old mill and {word} fields near the town."
           for i, word in enumerate(["green", "wide", "dry", "wet", "open", "quiet", "far",
                                     "high"])]
KNOBS = dict(metrics=["prompt_entropy"], data__max_tokens=24)
EVERY = 3       # the callback's steps = the Trainer's save_steps
MAX_STEPS = 6   # two epochs of 12 texts in batches of 4: the second epoch's shuffle and every
#                 step's dropout draw from the global torch generator


def tiny_model(tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3,
                           num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=128, rotary_pct=0.25,
                           hidden_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer():
    from lw.loading.model_sources import load_tokenizer_of

    return load_tokenizer_of("smollm2")


def train(tokenizer, folder, callbacks=(), report_to=("mlflow",)):
    """MAX_STEPS Trainer steps from the same seed; returns (the trainer's losses, the final
    weights, the trainer)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    texts = [f"Line {i} of a small corpus about rivers, mills and {i % 5} fields." for i in
             range(12)]
    data = Dataset.from_dict({"text": texts}).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=24), remove_columns=["text"])
    args = TrainingArguments(output_dir=str(folder), max_steps=MAX_STEPS,
                             per_device_train_batch_size=4, learning_rate=1e-3, seed=0,
                             logging_steps=1, save_strategy="steps", save_steps=EVERY,
                             save_only_model=True, report_to=list(report_to), use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=tiny_model(tokenizer), args=args, train_dataset=data,
                      processing_class=tokenizer, callbacks=list(callbacks),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    losses = [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return losses, weights, trainer


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """One training with the callback (every EVERY steps) and one without, both logged by
    transformers' MLflowCallback into a temporary store."""
    folder = tmp_path_factory.mktemp("training")
    uri = f"sqlite:///{folder}/mlflow.db"
    client_for(TrackingConfig(uri=uri))  # the store made as lw makes one (MLflow's is slower)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "training")
        patch.chdir(folder)
        callback = lw.LayerwiseCallback(PROMPTS, every_steps=EVERY, **KNOBS)
        with_losses, with_weights, trainer = train(tokenizer, folder / "with", [callback])
        without_losses, without_weights, _ = train(tokenizer, folder / "without")
    return dict(uri=uri, folder=folder, callback=callback, client=MlflowClient(uri),
                with_=(with_losses, with_weights), without=(without_losses, without_weights))


def children(client, parent: str) -> dict[int, object]:
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {int(run.data.tags["lw.train.step"]): run for run in runs}


def logged_table(client, run_id: str, path: str, tmp_path) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, path, str(tmp_path)))


def test_values_at_a_step_are_lw_measure_on_that_steps_checkpoint(trained, tmp_path):
    callback = trained["callback"]
    assert callback.steps == [3, 6]
    values = callback.values
    for step in callback.steps:
        saved = lw.measure(str(trained["folder"] / "with" / f"checkpoint-{step}"), PROMPTS,
                           **KNOBS)
        got = values[values["step"] == step]
        assert len(got) == 4 * (len(saved.columns) - 2)  # embeddings + 3 layers, each series
        for series in saved.columns.drop(["layer", "depth"]):
            curve = got[got["metric"] == series].sort_values("layer")
            assert list(curve["layer"]) == list(saved["layer"])
            np.testing.assert_allclose(curve["value"], saved[series], rtol=1e-5, atol=1e-7)
    first, last = (values[(values["step"] == s) & (values["metric"] == "prompt_entropy/max")]
                   for s in (3, 6))
    assert not np.allclose(first["value"], last["value"])  # the weights moved between them


def test_a_training_with_the_callback_is_the_training_without_it(trained):
    (losses, weights), (losses_0, weights_0) = trained["with_"], trained["without"]
    assert [step for step, _ in losses] == list(range(1, MAX_STEPS + 1))
    assert losses == losses_0  # exactly: same batches, same dropout draws, same gradients
    assert weights.keys() == weights_0.keys()
    assert all(torch.equal(weights[k], weights_0[k]) for k in weights)


def test_a_random_draw_between_steps_would_change_the_training(tokenizer, trained, tmp_path):
    """The comparison above can fail: one draw from the global generator at the callback's
    steps changes the losses after it (dropout, the second epoch's shuffle)."""
    from transformers import TrainerCallback

    class Draw(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % EVERY == 0:
                torch.rand(1)

    losses, _, _ = train(tokenizer, tmp_path / "drawn", [Draw()], report_to=())
    assert losses[:EVERY] == trained["without"][0][:EVERY]
    assert losses[EVERY:] != trained["without"][0][EVERY:]


def test_runs_and_artifacts_under_transformers_mlflow_run(trained, tmp_path):
    client, callback = trained["client"], trained["callback"]
    training = client.get_run(callback_run(trained))
    assert training.info.status == "FINISHED"  # transformers' callback ended its run
    assert "train_loss" in training.data.metrics  # the loss beside the layers: one run
    steps = children(client, training.info.run_id)
    assert sorted(steps) == [3, 6]
    for step, run in steps.items():
        assert run.info.status == "FINISHED" and run.info.run_name == f"step {step}"
        # the model in memory, not the config option that stands in for it when composing
        assert run.data.tags["lw.model"] == "gpt_neox" == run.data.params["model.arch"]
        assert run.data.tags["lw.model.revision"] == "in memory"
        for tag in run.data.tags:
            assert declared(tag, TAGS), tag
        table = logged_table(client, run.info.run_id, "results/table.csv", tmp_path / str(step))
        history = client.get_metric_history(run.info.run_id, "prompt_entropy/max")
        assert [p.step for p in history] == list(table["layer"])  # step = layer, as lw.run
        np.testing.assert_allclose([p.value for p in history], table["prompt_entropy/max"])
        assert client.get_metric_history(run.info.run_id, "depth/prompt_entropy/max")
        mine = callback.values[(callback.values["step"] == step)
                               & (callback.values["metric"] == "prompt_entropy/max")]
        np.testing.assert_allclose(mine["value"], table["prompt_entropy/max"])
    lw_files = artifact_paths(client, training.info.run_id, "layers")
    assert all(declared(path, ARTIFACTS) for path in lw_files), lw_files
    series = set(callback.values["metric"])
    assert lw_files == {"layers/table.csv"} | {f"layers/{s}.png" for s in series}
    table = logged_table(client, training.info.run_id, "layers/table.csv", tmp_path)
    assert list(table.columns) == ["step", "layer", "depth", "metric", "value"]
    pd.testing.assert_frame_equal(table, callback.values.astype(table.dtypes.to_dict()))
    assert (trained["folder"] / "with" / "lw" / "layers" / "table.csv").is_file()  # on disk


def callback_run(trained) -> str:
    """The training run: transformers' run of the experiment that has children."""
    client = trained["client"]
    experiment = client.get_experiment_by_name("training").experiment_id
    parents = {run.data.tags.get("mlflow.parentRunId") for run in client.search_runs(
        [experiment], filter_string="tags.`lw.train.step` != ''")}
    assert len(parents) == 1
    return parents.pop()


def artifact_paths(client, run_id: str, path: str) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_hand_loop_logs_the_same_and_leaves_the_training_as_it_was(tokenizer, tmp_path,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/own.db"
    model = tiny_model(tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = tokenizer(PROMPTS[:4], return_tensors="pt", padding=True)
    callback = lw.LayerwiseCallback(PROMPTS, tracking__uri=uri, **KNOBS)
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    random.seed(5)
    np.random.seed(5)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    table = callback.measure(model, tokenizer, 2)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()
    assert model.training  # back in train mode
    callback.finish()
    rng = torch.get_rng_state()
    expected = lw.measure((model, tokenizer), PROMPTS, **KNOBS)
    assert not torch.equal(torch.get_rng_state(), rng)  # a job seeds the global generator
    assert not model.base_model.training  # lw.measure leaves it in eval mode; the callback not
    for series in expected.columns.drop(["layer", "depth"]):
        np.testing.assert_allclose(table[series], expected[series], rtol=1e-5, atol=1e-7)
    client = MlflowClient(uri)
    training = [run for run in client.search_runs(
        [client.get_experiment_by_name("lw").experiment_id])
        if run.data.tags.get("mlflow.source.name") == "lw.training"]
    assert len(training) == 1 and training[0].info.status == "FINISHED"
    steps = children(client, training[0].info.run_id)
    assert list(steps) == [2] and steps[2].info.run_id == table.attrs["run_id"]
    logged = logged_table(client, table.attrs["run_id"], "results/table.csv", tmp_path)
    np.testing.assert_allclose(logged["prompt_entropy/max"], table["prompt_entropy/max"])
    assert "layers/table.csv" in artifact_paths(client, training[0].info.run_id, "layers")
    assert all(declared(tag, TAGS) for tag in training[0].data.tags), training[0].data.tags


def test_a_store_that_is_away_keeps_the_values_and_training_goes_on(tokenizer, tmp_path,
                                                                    monkeypatch, capfd):
    """every_steps=None through the Trainer's events: a save measures, an evaluation at the
    same step does not again; the store refuses connections: the values stay on disk, one
    line says where, nothing is raised."""
    import socket

    from transformers import TrainerControl, TrainerState, TrainingArguments

    monkeypatch.chdir(tmp_path)
    with socket.socket() as free:  # a port nothing listens on: connections are refused
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    callback = lw.LayerwiseCallback(PROMPTS, tracking__uri=f"http://127.0.0.1:{port}",
                                    **KNOBS)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    state, control = TrainerState(global_step=1), TrainerControl()
    events = dict(model=tiny_model(tokenizer), processing_class=tokenizer)
    callback.on_train_begin(args, state, control, **events)
    callback.on_step_end(args, state, control, **events)
    assert callback.steps == []  # every_steps=None: not at every step
    callback.on_save(args, state, control, **events)
    callback.on_evaluate(args, state, control, **events)
    assert callback.steps == [1]  # once: the save and the evaluation saw the same weights
    callback.on_train_end(args, state, control, **events)  # nothing to end, nothing raised
    assert callback.folder == tmp_path / "out" / "lw"
    kept = pd.read_csv(callback.folder / "layers" / "table.csv")
    assert set(kept["step"]) == {1} and np.isfinite(kept["value"]).all()
    assert (callback.folder / "step1" / "results" / "table.csv").is_file()  # lw.sync's folder
    said = [line for line in capfd.readouterr().err.splitlines()
            if line.startswith("[lw] training step 1:")]
    assert len(said) == 1 and "unreachable" in said[0] and str(callback.folder) in said[0]


def test_bad_arguments_fail_at_construction_in_one_line():
    with pytest.raises(ConfigError, match=r"^data.n_prompts=-5: must be >= 1$"):
        lw.LayerwiseCallback("wiki-vital", data__n_prompts=-5)
    with pytest.raises(ConfigError, match=r"^bogus: Key 'bogus' not in 'LwConfig'"):
        lw.LayerwiseCallback(PROMPTS, bogus=1)
    with pytest.raises(LwError, match=r"^every_steps=0: an integer >= 1, or None"):
        lw.LayerwiseCallback(PROMPTS, every_steps=0)
