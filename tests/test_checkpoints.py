"""Checkpoints of one training run: the step x depth heat map, local revisions as subfolders of a
model folder, revisions that hold identical weights, and the report on a checkpoints sweep."""

import shutil

import numpy as np
import pandas as pd
import pytest
import safetensors.torch

from conftest import lw_cli
from lw.config.schema import ModelConfig
from lw.errors import LwError
from lw.job.plots import plt, step_depth_heatmap
from lw.loading.checkpoints import same_weights, weights_fingerprint


def test_step_depth_heatmap_puts_steps_in_columns_depth_upwards_and_blanks_nan():
    steps, layers = [0, 1, 2, 4, 16, 128], 5
    rows = pd.DataFrame([(step, layer / (layers - 1), step + 10.0 * layer)
                         for step in steps for layer in range(layers)],
                        columns=["step", "depth", "value"])
    rows.loc[(rows["step"] == 2) & (rows["depth"] == 0.5), "value"] = np.nan
    fig = step_depth_heatmap(rows.sample(frac=1, random_state=0), "prompt_entropy/max")
    ax = fig.axes[0]
    cells = ax.collections[0].get_array()
    assert cells.shape == (layers, len(steps))  # one row per layer, one column per step
    # steps in numeric order (not as they came), depth 0 in the bottom row
    expected = np.array([[step + 10.0 * layer for step in steps] for layer in range(layers)])
    np.testing.assert_array_equal(cells.filled(np.nan)[~cells.mask], expected[~cells.mask])
    assert cells.mask.sum() == 1 and cells.mask[2, steps.index(2)]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(s) for s in steps]
    assert ax.get_ylim()[0] < 0 < 1 < ax.get_ylim()[1]
    assert fig.axes[1].get_ylabel() == "prompt_entropy/max"  # the colour bar
    plt.close(fig)


# --- a local folder of checkpoints: one Hugging Face model folder per revision -------------

VOCAB = 49152  # smollm2's tokenizer, which the checkpoints are saved with


def save_checkpoint(folder, seed: int) -> None:
    """A tiny random GPT-NeoX (Pythia's architecture) saved as a training run saves one."""
    import torch
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(seed)
    transformers.GPTNeoXModel(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, shared_models):
    """step0, step1, and step2 a byte-identical copy of step1 (a checkpoint that is not what
    its name says); the tokenizer saved once beside them."""
    from lw.loading.model_sources import load_tokenizer_of

    folder = tmp_path_factory.mktemp("run") / "checkpoints"
    save_checkpoint(folder / "step0", seed=0)
    save_checkpoint(folder / "step1", seed=1)
    shutil.copytree(folder / "step1", folder / "step2")
    tokenizer = load_tokenizer_of("smollm2")
    assert len(tokenizer) == VOCAB
    tokenizer.save_pretrained(folder)
    return folder


def revision(folder, name: str) -> ModelConfig:
    return ModelConfig(name="local-run", source="hub", id=str(folder), revision=name)


def test_a_revision_loads_its_subfolder_and_its_content_is_the_jobs_identity(
        checkpoints, hub_offline, tmp_path):
    import torch

    from lw.loading.models import load_model, weights_identity

    loaded = load_model(revision(checkpoints, "step1"), torch.device("cpu"))
    saved = safetensors.torch.load_file(checkpoints / "step1" / "model.safetensors")
    name = next(k for k in saved if k.endswith("query_key_value.weight"))
    torch.testing.assert_close(loaded.model.state_dict()[name], saved[name], rtol=0, atol=0)
    assert loaded.info.n_layers == 2 and loaded.tokenizer("a b").input_ids
    step = {r: weights_identity(revision(checkpoints, r)) for r in ("step0", "step1", "step2")}
    assert step["step1"]["folder"] == str(checkpoints / "step1")
    assert step["step0"]["sha256"] != step["step1"]["sha256"]
    assert step["step1"]["sha256"] == step["step2"]["sha256"]  # same content, same weights
    assert "tokenizer_config.json" in step["step1"]["tokenizer"]  # the shared tokenizer counts
    # changed weights in a revision's folder are another job
    moved = tmp_path / "checkpoints"
    shutil.copytree(checkpoints, moved)
    before = weights_identity(revision(moved, "step0"))
    save_checkpoint(moved / "step0", seed=7)
    assert weights_identity(revision(moved, "step0"))["sha256"] != before["sha256"]


def test_a_revision_the_folder_lacks_is_named_with_the_revisions_it_holds(checkpoints,
                                                                            hub_offline):
    from lw.loading.models import weights_identity

    with pytest.raises(LwError, match=r"model.revision='step3'.*its revisions: step0, step1, "
                                      r"step2$"):
        weights_identity(revision(checkpoints, "step3"))


def test_a_plain_model_folder_loads_as_before_whatever_the_revision(checkpoints, hub_offline,
                                                                    tmp_path):
    import torch

    from lw.loading.models import load_model, weights_identity

    plain = tmp_path / "model"  # a model folder with its tokenizer, no revision subfolders
    shutil.copytree(checkpoints / "step0", plain)
    shutil.copy(checkpoints / "tokenizer_config.json", plain)
    shutil.copy(checkpoints / "tokenizer.json", plain)
    identity = weights_identity(revision(plain, "main"))
    assert identity["folder"] == str(plain) and "tokenizer" not in identity
    assert set(identity["sha256"]) == {"config.json", "model.safetensors",
                                       "tokenizer_config.json", "tokenizer.json"}
    a = load_model(revision(plain, "main"), torch.device("cpu")).model.state_dict()
    b = load_model(revision(plain, "step5"), torch.device("cpu")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- revisions holding identical weights ------------------------------------------------

def test_identical_local_checkpoints_are_found_by_content(checkpoints):
    check = same_weights(revision(checkpoints, "main"), ["step0", "step1", "step2"])
    assert check.groups() == [["step1", "step2"]]
    assert not check.unchecked and str(checkpoints) in check.source


def test_hub_revisions_nobody_can_see_are_said_unchecked(hub_down):
    check = same_weights(ModelConfig(name="p", source="hub", id="EleutherAI/pythia-14m"),
                         ["step0", "step1"])
    assert check.groups() == [] and set(check.unchecked) == {"step0", "step1"}


def test_a_fingerprint_compares_safetensors_first_else_bin():
    both = {"model.safetensors": "a" * 64, "pytorch_model.bin": "b" * 64, "config.json": "c"}
    assert weights_fingerprint(both) == "a" * 64
    assert weights_fingerprint({"pytorch_model.bin": "b" * 64}) == "b" * 64
    assert weights_fingerprint({"config.json": "c"}) == ""


def test_revisions_nobody_can_check_are_said_once(hub_down, capsys):
    from omegaconf import OmegaConf

    from lw.sweep.revisions import note_same_weights

    config = OmegaConf.create({"model": {"name": "pythia-14m", "id": "EleutherAI/pythia-14m"}})
    assert note_same_weights(config, {"model.revision": ["step0", "step1"]}) == {}
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "[lw] model EleutherAI/pythia-14m: could not check whether revisions step0, step1 hold "
        "identical weights (the hub is out of reach, and neither its cache nor a folder "
        "EleutherAI/pythia-14m holds it)")


# --- a sweep over the local checkpoints, and its report -----------------------------------

@pytest.mark.slow
def test_a_checkpoints_sweep_warns_tags_and_reports_identical_revisions(checkpoints, tmp_path,
                                                                        lw_cache):
    from mlflow.tracking import MlflowClient

    from lw import report

    store = f"sqlite:///{tmp_path}/mlflow.db"
    done = lw_cli(tmp_path, "-m", "model=tiny-pythia", "model.source=hub", "model.name=run",
                  f"model.id={checkpoints}", "model.revision=step0,step1,step2",
                  "data=wiki-vital", "data.n_prompts=4", "data.max_tokens=32",
                  "metrics=[prompt_entropy]", f"tracking.uri={store}",
                  f"tracking.artifact_location={tmp_path}/artifacts",
                  f"hydra.sweep.dir={tmp_path}/multirun",
                  env={"HF_HUB_OFFLINE": "1", "LW_CACHE_DIR": str(lw_cache)})
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stdout.splitlines() if "identical weights" in line]
    assert warnings == [f"[lw] warning: model {checkpoints} revisions step1, step2 hold "
                        f"identical weights (same sha256 {warnings[0].split('sha256 ')[1][:12]}"
                        f"..., from content sha256 of the weight files in {checkpoints}): "
                        "their curves will coincide"]
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    kids = {r.data.tags["lw.model.revision"]: r for r in runs
            if "mlflow.parentRunId" in r.data.tags}
    assert {r: run.data.tags.get("lw.model.same_weights") for r, run in kids.items()} == {
        "step0": None, "step1": "step1, step2", "step2": "step1, step2"}

    out = tmp_path / "report"
    report.main(["--uri", store, "--all", "--no-log", "--out", str(out)])
    summary = pd.read_csv(out / "summary.csv").set_index("revision")
    assert summary["same weights as"].fillna("").to_dict() == {
        "step0": "", "step1": "step1, step2", "step2": "step1, step2"}
    # the warning was right: the two revisions measure the same, the other does not
    entropy = [c for c in summary.columns if c.startswith("summary/prompt_entropy")]
    assert entropy
    pd.testing.assert_series_equal(summary.loc["step1", entropy], summary.loc["step2", entropy],
                                   check_names=False)
    page = (out / "index.html").read_text()
    for kind in ("heatmap", "curves"):
        name = f"steps_{kind}_prompt_entropy_max_run_wiki-vital.png"
        assert (out / name).stat().st_size > 0 and f'src="{name}"' in page
    assert "Over training steps" in page and "*: identical weights to another step" in page
    sweep = report.read_sweep(client, kids["step0"].data.tags["mlflow.parentRunId"],
                              per_prompt=False)
    sweep.curves["training step"] = sweep.curves["lw.model.revision"].map(report.training_step)
    assert sorted(report.step_labels(sweep.curves).values()) == [
        "0", "1 (same weights: step1, step2)", "2 (same weights: step1, step2)"]


def test_offline_hub_revisions_compare_by_the_cache_blob_names(hub_down, tmp_path,
                                                               monkeypatch):
    """The hub cache names an LFS blob by its sha256: revisions cached here are checked
    without the hub (what a machine that measured them before has)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--run"
    blobs = {"a": "a" * 64, "b": "b" * 64}
    for sha in blobs.values():
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / sha).write_bytes(b"weights")
    for i, (name, blob) in enumerate((("step0", "a"), ("step1", "b"), ("step2", "b"))):
        commit = f"{i}" * 40
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / name).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "model.safetensors").symlink_to(repo / "blobs" / blobs[blob])
        (snapshot / "config.json").write_text("{}")
    check = same_weights(ModelConfig(name="p", source="hub", id="org/run"),
                         ["step0", "step1", "step2", "step3"])
    assert check.groups() == [["step1", "step2"]]
    assert set(check.unchecked) == {"step3"} and "hub cache" in check.source
