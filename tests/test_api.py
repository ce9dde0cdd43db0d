"""`import lw`: the notebook API. load_sweep / load_runs read a real SQLite store (a sweep
logged with MlflowClient as lw.tracking logs one); measure runs a real job in this process,
on a model option and on the same model already loaded."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import lw
from conftest import PYTHON, cli_env, load_option, lw_cli, wiki_records


def test_import_lw_loads_no_torch():
    done = subprocess.run([str(PYTHON), "-c", "import sys, lw, lw.server; "
                           "print(sorted(lw.__all__), 'torch' in sys.modules)"],
                          capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.stdout.split("]")[-1].strip() == "False", done.stdout + done.stderr
    assert "['LayerwiseCallback', 'load_runs', 'load_sweep', 'measure']" in done.stdout


@pytest.fixture(scope="module")
def store():
    """A parent and 3 children: 2 models, levels of p, one run with a NaN layer; minilm's
    table as lw logged it before depth was 0-1 (``depth_pct``, 0-100)."""
    folder = Path(tempfile.mkdtemp(prefix="lw-api-"))
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("lw", artifact_location=(folder / "a").as_uri())
    old = client.create_run(experiment, tags={"lw.jobs": "0"}).info.run_id  # an older sweep
    client.set_terminated(old, "FINISHED")
    parent = client.create_run(experiment, run_name="sweep", tags={"lw.jobs": "3"}).info.run_id
    rng = np.random.default_rng(1)
    logged = {}
    for model, layers, p in (("smollm2", 30, "0.000"), ("smollm2", 30, "0.500"),
                             ("minilm", 6, "0.500")):
        depth = ({"depth_pct": 100 * np.arange(layers + 1) / layers} if model == "minilm"
                 else {"depth": np.arange(layers + 1) / layers})
        table = pd.DataFrame({"layer": np.arange(layers + 1), **depth,
                              "prompt_entropy/max": rng.random(layers + 1),
                              "curvature": rng.random(layers + 1)})
        table.loc[0, "curvature"] = np.nan
        run = client.create_run(experiment, run_name=f"{model} p={p}", tags={
            "mlflow.parentRunId": parent, "lw.model": model, "lw.data": "wiki-vital",
            "lw.perturbation": "repetition", "lw.perturbation.p": p,
            "lw.model.revision": "main"}).info.run_id
        client.log_batch(run, metrics=[Metric("summary/curvature/max_layer", 3.0, 0, 0)])
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / "table.csv", index=False)
            client.log_artifacts(run, tmp, "results")
        client.set_terminated(run, "FINISHED")
        logged[run] = table
    client.set_terminated(parent, "FINISHED")
    return {"uri": uri, "parent": parent, "logged": logged}


@pytest.mark.slow
def test_load_sweep_is_tidy_and_reads_back_every_value(store):
    frame = lw.load_sweep(uri=store["uri"])   # the latest sweep: not the older, empty one
    assert frame.attrs["parent"] == store["parent"]
    assert list(frame.columns) == ["run_id", "run_name", "model", "data", "perturbation",
                                   "level", "revision", "layer", "depth", "metric", "value"]
    assert len(frame) == 2 * (31 + 31 + 7)
    for run_id, table in store["logged"].items():
        rows = frame[frame["run_id"] == run_id]
        for metric in ("prompt_entropy/max", "curvature"):
            got = rows[rows["metric"] == metric].sort_values("layer")
            np.testing.assert_array_equal(got["value"], table[metric])
            # relative depth, 0 = embeddings, 1 = last layer, whichever unit the run logged
            np.testing.assert_allclose(got["depth"], np.arange(len(table)) / (len(table) - 1))
            assert got["depth"].iloc[0] == 0 and got["depth"].iloc[-1] == 1
    assert sorted(frame["level"].unique()) == [0.0, 0.5]
    minilm = frame[frame["model"] == "minilm"]
    assert minilm["depth"].max() == 1.0 and minilm["layer"].max() == 6


@pytest.mark.slow
def test_load_runs_gives_tags_and_summaries(store):
    runs = lw.load_runs(store["parent"], uri=store["uri"])
    assert len(runs) == 3 and set(runs["status"]) == {"FINISHED"}
    assert sorted(runs["lw.perturbation.p"]) == ["0.000", "0.500", "0.500"]
    assert (runs["summary/curvature/max_layer"] == 3.0).all()


@pytest.mark.slow
def test_measure_a_model_option_and_the_same_model_loaded_agree():
    texts = [r["extract"] for r in wiki_records()[:6]]
    knobs = dict(metrics=["prompt_entropy", "curvature"], data__max_tokens=24)
    by_name = lw.measure("tiny-pythia", texts, **knobs)
    loaded = load_option("tiny-pythia")
    in_memory = lw.measure((loaded.model, loaded.tokenizer), texts, **knobs)
    assert by_name.attrs["model"]["n_layers"] == 6 == in_memory.attrs["model"]["n_layers"]
    assert in_memory.attrs["model"]["source"] == "in-memory"
    assert list(by_name["layer"]) == list(range(7))
    assert list(by_name.columns[:2]) == ["layer", "depth"]  # relative: 0 .. 1, monotone
    assert by_name["depth"].iloc[0] == 0 and by_name["depth"].iloc[-1] == 1
    assert by_name["depth"].is_monotonic_increasing
    summary = by_name.attrs["summary"]  # the layer summaries' depth in the same unit
    assert summary["summary/curvature/min_depth"] == summary["summary/curvature/min_layer"] / 6
    for column in ("prompt_entropy/max", "curvature"):
        np.testing.assert_allclose(in_memory[column], by_name[column], rtol=1e-6)
    assert np.isfinite(by_name["prompt_entropy/max"]).all()
    assert by_name.attrs["summary"]  # the run's summaries ride along


def test_measure_names_a_bad_knob():
    from lw.errors import ConfigError, LwError

    with pytest.raises(ConfigError) as raised:
        lw.measure("tiny-pythia", "wiki-vital", data__n_prompts=-5)
    assert raised.type is ConfigError and issubclass(raised.type, LwError)  # shown as one line
    assert str(raised.value) == "data.n_prompts=-5: must be >= 1"  # the value and the range


@pytest.mark.slow
def test_measure_log_is_lw_run_one_claim_one_run(tmp_path, lw_cache, monkeypatch, capfd):
    """measure(log=True) logs as `python -m lw.run` does (identity, job key, resume): twice is
    one FINISHED run, the second call given its values; lw.run's run of the same job holds the
    same values, and a measure into lw.run's store finds lw.run's run."""
    monkeypatch.setenv("LW_CACHE_DIR", str(lw_cache))  # the logged prompts file
    texts = [r["extract"] for r in wiki_records()[:6]]
    knobs = dict(metrics=["prompt_entropy", "curvature"], data__max_tokens=24, log=True,
                 tracking__uri=f"sqlite:///{tmp_path}/m.db",
                 tracking__artifact_location=str(tmp_path / "art"))
    first = lw.measure("tiny-pythia", texts, **knobs)
    second = lw.measure("tiny-pythia", texts, **knobs)
    err = capfd.readouterr().err
    assert "skipped, already FINISHED in run " + first.attrs["run_id"] in err, err[-3000:]
    assert second.attrs["run_id"] == first.attrs["run_id"]
    pd.testing.assert_frame_equal(second, first, check_dtype=False)
    assert second.attrs["summary"] == pytest.approx(first.attrs["summary"])
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    run = runs[0]
    assert run.data.tags["lw.job_hash"] and run.data.tags["lw.job_key"]
    assert "config/identity.json" in [a.path for a in client.list_artifacts(run.info.run_id,
                                                                              "config")]

    # the same job through `python -m lw.run`, into a store of its own
    path = next(Path(lw_cache / "prompts").glob("*.txt"))
    done = lw_cli(tmp_path, "model=tiny-pythia", "data=local", f"data.path='{path}'",
                  "data.n_prompts=6", "data.max_tokens=24", "metrics=[prompt_entropy,curvature]",
                  f"tracking.uri=sqlite:///{tmp_path}/cli.db",
                  f"tracking.artifact_location={tmp_path}/cli-art",
                  f"hydra.run.dir={tmp_path}/run", env={"LW_CACHE_DIR": str(lw_cache)})
    assert done.returncode == 0, done.stderr[-3000:]
    cli = MlflowClient(f"sqlite:///{tmp_path}/cli.db")
    cli_run = cli.search_runs([cli.get_experiment_by_name("lw").experiment_id])[0]
    assert cli_run.data.tags["lw.job_hash"] == run.data.tags["lw.job_hash"]
    assert cli_run.data.tags["lw.job_key"] == run.data.tags["lw.job_key"]
    for metric in ("prompt_entropy/max", "curvature"):
        ours = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
        theirs = {m.step: m.value for m in cli.get_metric_history(cli_run.info.run_id, metric)}
        assert ours.keys() == theirs.keys() and list(ours) == list(range(7))
        np.testing.assert_allclose([ours[s] for s in ours], [theirs[s] for s in ours],
                                   rtol=1e-6, equal_nan=True)
    # lw.run's run is this job's run: a measure into its store is given its values
    again = lw.measure("tiny-pythia", texts, **{**knobs, "tracking__uri":
                                                f"sqlite:///{tmp_path}/cli.db"})
    assert again.attrs["run_id"] == cli_run.info.run_id
    # a single job (lw.run without -m) is read as a sweep of one: the latest in its store
    frame = lw.load_sweep(uri=f"sqlite:///{tmp_path}/cli.db")
    assert set(frame["run_id"]) == {cli_run.info.run_id}
    assert sorted(frame[frame["metric"] == "curvature"]["layer"]) == list(range(7))
