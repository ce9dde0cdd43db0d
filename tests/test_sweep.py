"""End to end: real `python -m lw.run -m` sweeps into a temporary MLflow store, then what it holds.

Two tiny random-init models (a GPT-NeoX and a Mamba) x two local files the test writes
(jsonl and txt) = one parent run and four children; a second sweep has a job that fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import reference as ref
from conftest import load_option, lw_cli, wiki_records

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

N_PROMPTS = 5
MAX_TOKENS = 40
METRICS = "[prompt_entropy,curvature,dataset_entropy,dip,infonce,dime,lidar]"
PER_LAYER = ["prompt_entropy/max", "prompt_entropy/raw", "prompt_entropy/logN",
             "prompt_entropy/logD", "curvature", "dataset_entropy/max", "dip/stat", "dip/pvalue",
             "infonce/loss", "infonce/mi_bound", "dime", "lidar/max", "lidar/effective_rank",
             "token_norm/max_over_median"]


def wiki_texts(n: int) -> list[str]:
    return [r["extract"] for r in wiki_records()[:n]]


def sweep(tmp: Path, *overrides: str):
    return lw_cli(tmp, "-m", *overrides, f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                  f"tracking.artifact_location={tmp}/artifacts",
                  f"hydra.sweep.dir={tmp}/multirun")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    texts = wiki_texts(2 * N_PROMPTS)
    jsonl, txt = tmp / "wiki.jsonl", tmp / "wiki.txt"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:N_PROMPTS]))
    txt.write_text("".join(t + "\n" for t in texts[N_PROMPTS:]))
    done = sweep(tmp, "model=tiny-pythia,tiny-mamba", "data=local",
                 f"data.path={jsonl},{txt}", f"data.n_prompts={N_PROMPTS}",
                 f"data.max_tokens={MAX_TOKENS}", f"metrics={METRICS}", "metric.lidar.J=3")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    return {"done": done, "client": client, "runs": runs, "tmp": tmp,
            "texts": texts[:N_PROMPTS], "jsonl": jsonl}


def children(store) -> list:
    return [r for r in store["runs"] if "mlflow.parentRunId" in r.data.tags]


def test_sweep_is_one_parent_with_four_finished_children(store):
    assert store["done"].returncode == 0, store["done"].stderr[-3000:]
    parents = [r for r in store["runs"] if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    kids = children(store)
    assert len(kids) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in kids} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in kids)
    assert parents[0].data.tags["lw.jobs"] == "4" and parents[0].data.tags["lw.failed_jobs"] == "0"
    combos = {(r.data.params["model.name"], Path(r.data.params["data.path"]).suffix) for r in kids}
    assert combos == {(m, s) for m in ("tiny-pythia", "tiny-mamba") for s in (".jsonl", ".txt")}


def test_every_metric_is_a_curve_with_one_step_per_layer(store):
    client = store["client"]
    for run in children(store):
        n_layers = int(run.data.tags["lw.model.n_layers"])
        assert n_layers == {"tiny-pythia": 6, "tiny-mamba": 4}[run.data.params["model.name"]]
        for key in PER_LAYER:
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(n_layers + 1)), key
        assert "summary/prompt_entropy/max/min_layer" in run.data.metrics
        assert 0 <= run.data.metrics["summary/prompt_entropy/max/min_layer"] <= n_layers
        assert run.data.metrics["n_prompts"] == N_PROMPTS


def test_params_and_tags_describe_the_job(store):
    for run in children(store):
        params, tags = run.data.params, run.data.tags
        assert params["data.n_prompts"] == str(N_PROMPTS)
        assert params["metric.lidar.J"] == "3" and params["seed"] == "0"
        assert tags["lw.model"] == params["model.name"]
        assert tags["lw.model.id"] in ("EleutherAI/pythia-14m", "state-spaces/mamba-130m-hf")
        assert tags["lw.model.family"] == {"tiny-pythia": "decoder",
                                           "tiny-mamba": "ssm"}[tags["lw.model"]]
        assert tags["lw.model.revision"] == "random-init-seed0"
        assert tags["lw.data"] == "local" and tags["lw.perturbation"] == "none"
        assert tags["lw.version"] and tags["lw.git_commit"]
        assert tags["lw.model.hidden_size"] == "128"


def test_artifacts_hold_config_tables_and_figures(store):
    client = store["client"]
    for run in children(store):
        local = Path(client.download_artifacts(run.info.run_id, "", str(store["tmp"] / "dl"
                                                                          / run.info.run_id)))
        names = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
        assert {"config/config.yaml", "config/overrides.yaml", "results/table.csv",
                "results/table.json", "results/per_prompt.parquet", "results/model.json",
                "figures/metrics_vs_depth.png",
                "figures/prompt_entropy_histograms.png"} <= names
        import pandas as pd

        table = pd.read_csv(local / "results" / "table.csv")
        assert list(table["layer"]) == list(range(len(table)))
        assert table["depth"].iloc[0] == 0.0 and table["depth"].iloc[-1] == 1.0
        assert table["depth"].is_monotonic_increasing
        per_prompt = pd.read_parquet(local / "results" / "per_prompt.parquet")
        assert len(per_prompt) == N_PROMPTS * len(table)
        assert (local / "figures" / "metrics_vs_depth.png").read_bytes()[:4] == b"\x89PNG"


def test_results_are_also_on_disk_in_the_sweep_folder(store):
    tables = list((store["tmp"] / "multirun").rglob("results/table.csv"))
    assert len(tables) == 4


def test_logged_metrics_match_an_independent_computation(store):
    """tiny-pythia x the jsonl file: per-prompt unbatched forward + numpy float64 metrics."""
    run = next(r for r in children(store) if r.data.params["model.name"] == "tiny-pythia"
               and r.data.params["data.path"] == str(store["jsonl"]))
    loaded = load_option("tiny-pythia", seed=0)
    per_prompt = {"prompt_entropy/max": [], "prompt_entropy/raw": [], "curvature": []}
    pooled = []
    for text in store["texts"]:
        ids = loaded.tokenizer(text)["input_ids"][:MAX_TOKENS]
        with torch.no_grad():
            states = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        layers = [h[0].double().numpy() for h in states]
        entropies = [ref.normalized(ref.entropy(ref.prep(h), 1.0), len(ids), h.shape[-1])
                     for h in layers]
        per_prompt["prompt_entropy/max"].append([e["max"] for e in entropies])
        per_prompt["prompt_entropy/raw"].append([e["raw"] for e in entropies])
        per_prompt["curvature"].append([ref.curvature(ref.prep(h)) for h in layers])
        pooled.append([h.mean(axis=0) for h in layers])
    expected = {name: np.mean(values, axis=0) for name, values in per_prompt.items()}
    pooled = np.array(pooled)                                           # (N, L+1, D)
    expected["dataset_entropy/max"] = [
        ref.normalized(ref.entropy(ref.prep(pooled[:, k]), 1.0), *pooled[:, k].shape)["max"]
        for k in range(pooled.shape[1])]
    client = store["client"]
    for name, values in expected.items():
        history = client.get_metric_history(run.info.run_id, name)
        logged = np.array([m.value for m in sorted(history, key=lambda m: m.step)])
        np.testing.assert_allclose(logged, values, rtol=1e-5, err_msg=name)


def test_a_failing_job_is_failed_in_mlflow_and_the_others_finish(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("".join(t + "\n" for t in wiki_texts(3)))
    missing = tmp_path / "missing.txt"
    done = sweep(tmp_path, "model=tiny-pythia", "data=local", f"data.path={good},{missing}",
                 "data.n_prompts=3", "data.max_tokens=24", "metrics=[prompt_entropy]")
    assert done.returncode == 1
    assert "missing.txt" in done.stdout + done.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    kids = {Path(r.data.params["data.path"]).name: r for r in runs
            if "mlflow.parentRunId" in r.data.tags}
    assert kids["missing.txt"].info.status == "FAILED"
    assert "missing.txt" in kids["missing.txt"].data.tags["lw.error"]
    assert kids["good.txt"].info.status == "FINISHED"
    assert "prompt_entropy/max" in kids["good.txt"].data.metrics
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["lw.failed_jobs"] == "1"



def test_report_gathers_the_sweep_curves(store, capsys):
    from lw.report import main as report

    out = store["tmp"] / "report" / "pe.png"
    report(["--uri", f"sqlite:///{store['tmp']}/mlflow.db", "--metric", "prompt_entropy/max",
            "--hue", "lw.model", "--panels", "lw.data", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    import pandas as pd

    table = pd.read_csv(out.with_suffix(".csv"), header=[0, 1], index_col=0)
    # 2 models x (one data tag, two files averaged) -> 2 columns; tiny-mamba has 5 states
    assert table.shape == (7, 2)
    run = next(r for r in children(store) if r.data.params["model.name"] == "tiny-pythia")
    logged = [m.value for m in sorted(store["client"].get_metric_history(
        run.info.run_id, "prompt_entropy/max"), key=lambda m: m.step)]
    same_model = [r for r in children(store) if r.data.params["model.name"] == "tiny-pythia"]
    other = next(r for r in same_model if r.info.run_id != run.info.run_id)
    other_logged = [m.value for m in sorted(store["client"].get_metric_history(
        other.info.run_id, "prompt_entropy/max"), key=lambda m: m.step)]
    np.testing.assert_allclose(table[("local", "tiny-pythia")].to_numpy(),
                               (np.array(logged) + np.array(other_logged)) / 2)
    assert np.isnan(table[("local", "tiny-mamba")].to_numpy()[5:]).all()
    assert "prompt_entropy/max" in capsys.readouterr().out


def test_report_best_layer_table(store, capsys):
    from lw.report import main as report

    report(["--uri", f"sqlite:///{store['tmp']}/mlflow.db", "--best-layers", "curvature"])
    printed = capsys.readouterr().out
    for model in ("tiny-pythia", "tiny-mamba"):
        curves = [[m.value for m in sorted(store["client"].get_metric_history(
            r.info.run_id, "curvature"), key=lambda m: m.step)]
            for r in children(store) if r.data.params["model.name"] == model]
        not_last = np.mean([np.argmax(c) != len(c) - 1 for c in curves])
        line = next(row for row in printed.splitlines() if row.lstrip().startswith(model))
        values = line.split()
        assert values[2] == "2"                                   # n_tasks: two data files
        assert float(values[3]) == pytest.approx(not_last)
        assert float(values[4]) == pytest.approx(np.mean([c[-1] for c in curves]), abs=1e-4)
        assert float(values[5]) == pytest.approx(np.mean([max(c) for c in curves]), abs=1e-4)


def test_logged_view_metrics_match_an_independent_computation(store):
    """InfoNCE, DiME and LiDAR of the tiny-pythia x jsonl job, recomputed from nlpaug views of
    the same prompts (same seeds), one unbatched forward pass per view, numpy float64."""
    from conftest import compose_job
    from lw.job.perturb import augment_views
    from lw.loading.prompts import load_prompts, tokenize
    from lw.metrics.functional.views import random_permutations

    run = next(r for r in children(store) if r.data.params["model.name"] == "tiny-pythia"
               and r.data.params["data.path"] == str(store["jsonl"]))
    job = compose_job(["model=tiny-pythia", "data=local", f"data.path={store['jsonl']}",
                       f"data.n_prompts={N_PROMPTS}", f"data.max_tokens={MAX_TOKENS}"])
    loaded = load_option("tiny-pythia", seed=0)
    texts = load_prompts(job.data, loaded.tokenizer).texts
    generator = torch.Generator().manual_seed(0)       # the job's: seed 0, perturbation none
    views = augment_views(texts, 3, seed=int(torch.randint(2**31 - 1, (1,),
                                                           generator=generator)))
    perms = random_permutations(N_PROMPTS, 10, generator).numpy()
    pooled = []                                                      # (J, N, L+1, D)
    for view in views:
        pooled.append([])
        for ids in tokenize(loaded.tokenizer, view, MAX_TOKENS):
            with torch.no_grad():
                out = loaded.model(torch.tensor([ids]), output_hidden_states=True)
            pooled[-1].append([h[0].double().mean(0).numpy() for h in out.hidden_states])
    x = np.array(pooled).transpose(2, 1, 0, 3)                        # (L+1, N, J, D)
    expected = {
        "infonce/loss": [ref.infonce(v[:, 0], v[:, 1], 0.1)["loss"] for v in x],
        "dime": [ref.dime(v[:, 0], v[:, 1], 1.0, perms) for v in x],
        "lidar/effective_rank": [ref.lidar(v, 1e-4)[1] for v in x],
    }
    for name, values in expected.items():
        history = store["client"].get_metric_history(run.info.run_id, name)
        logged = np.array([m.value for m in sorted(history, key=lambda m: m.step)])
        np.testing.assert_allclose(logged, values, rtol=1e-4, atol=1e-6, err_msg=name)


def test_every_logged_tag_artifact_and_metric_key_is_declared(store):
    """The reference page of logged keys is generated from lw.tracking.keys: a key a run logs
    without a declaration there (or one on the wrong kind of run) fails here."""
    from lw.metrics import registry
    from lw.tracking import keys

    client = store["client"]
    series = [k for m in registry.every().values() for k in m.logs]

    def artifacts(run_id, path=""):
        found = []
        for item in client.list_artifacts(run_id, path):
            found += artifacts(run_id, item.path) if item.is_dir else [item.path]
        return found

    for run in store["runs"]:
        kind = "job" if "mlflow.parentRunId" in run.data.tags else "parent"
        for tag in run.data.tags:
            found = keys.declared(tag, keys.TAGS)
            assert found is not None and found.on in (kind, "both"), (kind, tag)
        for path in artifacts(run.info.run_id):
            found = keys.declared(path, keys.ARTIFACTS)
            assert found is not None and found.on in (kind, "both"), (kind, path)
        for key in run.data.metrics:
            assert keys.declared(key, keys.METRICS) or any(
                key == s or (s.endswith("/") and key.startswith(s)) for s in series), key
