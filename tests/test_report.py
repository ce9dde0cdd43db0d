"""`python -m lw.report --all`: a sweep's whole report from a real MLflow store (SQLite, the
local default), here a 50-run sweep of synthetic per-layer values logged with MlflowClient the
way lw.tracking logs a job (tags, per-layer curves, depth series, summaries, results/)."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from lw.report import main as report
from lw.tracking.read import read_sweep

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

MODELS = {"smollm2": 30, "minilm": 6}
DATA = ["wiki-vital", "medical-hpo", "set-c", "set-d", "set-e"]
LEVELS = ["0.000", "0.250", "0.500", "0.750", "1.000"]
COLUMNS = ["prompt_entropy/raw", "prompt_entropy/max", "curvature", "dataset_entropy/max",
           "dip/stat", "dip/pvalue", "token_norm/max_over_median"]
N_PROMPTS = 32
BIMODAL = ("minilm", "medical-hpo", "0.500")  # the run whose layer 4 is made bimodal


def job_values(rng, n_layers: int, bimodal: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    layers = np.arange(n_layers + 1)
    per_prompt = pd.DataFrame({
        "prompt": np.repeat(np.arange(N_PROMPTS), n_layers + 1),
        "layer": np.tile(layers, N_PROMPTS),
        "n_tokens": 40,
        "prompt_entropy/raw": rng.normal(3, 0.2, N_PROMPTS * (n_layers + 1)),
    })
    per_prompt["prompt_entropy/max"] = per_prompt["prompt_entropy/raw"] / 4
    table = pd.DataFrame({"layer": layers, "depth": layers / n_layers})
    for column in COLUMNS:
        table[column] = rng.random(n_layers + 1)
    table.loc[0, "curvature"] = np.nan  # a NaN layer, as the embedding layer can give
    table["dip/stat"] = rng.uniform(0.02, 0.05, n_layers + 1)
    if bimodal:
        table.loc[4, "dip/stat"] = 0.2
    return table, per_prompt


@pytest.fixture(scope="module")
def sweep_store():
    """One parent and 50 finished children (2 models x 5 data sets x 5 levels of p)."""
    folder = Path(tempfile.mkdtemp(prefix="lw-report-"))
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("lw", artifact_location=(folder / "art").as_uri())
    parent = client.create_run(experiment, run_name="sweep", tags={"lw.jobs": "50"}).info.run_id
    rng = np.random.default_rng(0)
    logged = {}
    started = time.perf_counter()
    for model, n_layers in MODELS.items():
        for data in DATA:
            for p in LEVELS:
                table, per_prompt = job_values(rng, n_layers, (model, data, p) == BIMODAL)
                run = client.create_run(experiment, run_name=f"{model} {data} p={p}", tags={
                    "mlflow.parentRunId": parent, "lw.model": model, "lw.data": data,
                    "lw.perturbation": "repetition", "lw.perturbation.p": p,
                    "lw.model.n_layers": str(n_layers), "lw.model.revision": "main"})
                run_id = run.info.run_id
                per_mille = np.round(1000 * table["layer"] / n_layers).astype(int)
                metrics = [Metric(name, float(v), 0, int(step))
                           for column in COLUMNS
                           for name, steps in ((column, table["layer"]),
                                               (f"depth/{column}", per_mille))
                           for step, v in zip(steps, table[column], strict=True)]
                metrics.append(Metric("summary/dip/stat/max_layer",
                                      float(table["dip/stat"].idxmax()), 0, 0))
                client.log_batch(run_id, metrics=metrics)
                with tempfile.TemporaryDirectory() as tmp:
                    table.to_csv(Path(tmp) / "table.csv", index=False)
                    per_prompt.to_parquet(Path(tmp) / "per_prompt.parquet", index=False)
                    client.log_artifacts(run_id, tmp, artifact_path="results")
                client.set_terminated(run_id, "FINISHED")
                logged[run_id] = table
    client.set_terminated(parent, "FINISHED")
    print(f"\n[store] 50 synthetic runs logged in {time.perf_counter() - started:.1f} s")
    return {"uri": uri, "client": client, "parent": parent, "logged": logged,
            "folder": folder}


def test_the_sweep_is_read_back_exactly(sweep_store):
    sweep = read_sweep(sweep_store["client"], sweep_store["parent"])
    assert len(sweep.runs) == 50 and len(sweep.per_prompt) == 50
    for run_id, table in sweep_store["logged"].items():
        rows = sweep.curves[sweep.curves["run_id"] == run_id]
        for column in COLUMNS:
            got = rows[rows["metric"] == column].sort_values("layer")["value"].to_numpy()
            np.testing.assert_allclose(got, table[column].to_numpy(), rtol=0, atol=0,
                                       err_msg=column)
        # the same values MLflow holds as the run's metric history
        history = sweep_store["client"].get_metric_history(run_id, "dip/stat")
        np.testing.assert_array_equal([m.value for m in sorted(history, key=lambda m: m.step)],
                                      table["dip/stat"].to_numpy())


def test_the_whole_report_is_written_and_logged_to_the_parent(sweep_store, tmp_path, capsys):
    out = tmp_path / "report"
    started = time.perf_counter()
    report(["--uri", sweep_store["uri"], "--all", "--out", str(out)])
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n[report] 50-run sweep report in {seconds:.1f} s")
    assert sweep_store["parent"] in printed
    html = (out / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    # a figure per logged per-layer metric, the all-runs histograms, the most bimodal run
    assert sorted(images) == sorted([f"curve_{c.replace('/', '_')}.png" for c in COLUMNS]
                                    + ["histograms_all_runs.png",
                                       "histograms_most_bimodal_run.png"])
    for name in images:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    bimodal_name = f"{BIMODAL[0]} {BIMODAL[1]} p={BIMODAL[2]}"
    assert f"the run with the largest dip: {bimodal_name}" in html
    assert "a line\nper lw.perturbation.p, a panel per lw.data, lw.model" in html
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 50
    row = summary[summary["run"] == bimodal_name].iloc[0]
    assert row["summary/dip/stat/max_layer"] == 4 and row["p"] == 0.5
    logged = {f.path for f in sweep_store["client"].list_artifacts(sweep_store["parent"],
                                                                   "report")}
    assert {f"report/{name}" for name in images} | {"report/index.html",
                                                    "report/summary.csv"} <= logged


def test_one_metric_report_names_a_missing_tag(sweep_store, tmp_path):
    with pytest.raises(SystemExit, match="has tag 'lw.nope'.*lw.perturbation.p"):
        report(["--uri", sweep_store["uri"], "--metric", "curvature", "--hue", "lw.nope",
                "--out", str(tmp_path / "c.png")])


def finished_children(uri: str, experiment_id: str, parent: str,
                      tags: list[dict[str, str]]) -> list[str]:
    """FINISHED child runs of ``parent`` with ``tags``, written in one transaction into
    MLflow's own tables (its ORM models): through MlflowClient, 1,002 runs take ~20 s of
    requests. Their ids, in order."""
    import uuid

    from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    client = MlflowClient(uri)
    location = client.get_experiment(experiment_id).artifact_location
    store = SqlAlchemyStore(uri, location)
    now = int(time.time() * 1000)
    ids = [uuid.uuid4().hex for _ in tags]
    with store.ManagedSessionMaker(read_only=False) as session:
        for run_id, run_tags in zip(ids, tags, strict=True):
            session.add(SqlRun(
                run_uuid=run_id, name=run_tags["mlflow.runName"], source_type="LOCAL",
                source_name="", entry_point_name="", user_id="test", status="FINISHED",
                start_time=now, end_time=now, source_version="", lifecycle_stage="active",
                artifact_uri=f"{location}/{run_id}/artifacts", experiment_id=int(experiment_id)))
            session.add_all([SqlTag(key=k, value=v, run_uuid=run_id)
                             for k, v in {**run_tags, "mlflow.parentRunId": parent}.items()])
    return ids


def test_a_sweep_of_more_than_1000_children_is_reported_whole(tmp_path, capsys, monkeypatch):
    """1,001 children with results (one search page holds 1,000) and one whose upload failed
    (no results/table.csv): every readable child is in the report, the other is named. The
    store comes from MLFLOW_TRACKING_URI (no --uri), as in every MLflow tool."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("lw", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(experiment, run_name="sweep", tags={"lw.jobs": "1002"}).info.run_id
    models = [("smollm2", "minilm")[i % 2] for i in range(1002)]
    children = finished_children(uri, experiment, parent, [
        {"mlflow.runName": f"{model} job{i}", "lw.model": model, "lw.data": "wiki-vital",
         "lw.seed": str(i)} for i, model in enumerate(models)])
    layers = np.arange(4)
    table = pd.DataFrame({"layer": layers, "depth": layers / 3})
    expected = {}
    for i, (model, run_id) in enumerate(zip(models[:1001], children, strict=False)):
        # the last child's upload "failed"; each run's own values: the mean sees every run
        table["curvature"] = i + layers
        results = tmp_path / "a" / run_id / "artifacts" / "results"
        results.mkdir(parents=True)
        table.to_csv(results / "table.csv", index=False)
        expected.setdefault(model, []).append(table["curvature"].to_numpy().copy())
    client.set_terminated(parent, "FINISHED")
    assert len(client.search_runs([experiment], max_results=2000)) == 1003  # MLflow reads them
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "report"
    report(["--all", "--no-log", "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].endswith(f"{out.resolve() / 'index.html'}")
    assert any("smollm2 job1001" not in line and "minilm job1001" in line
               and "results/table.csv" in line for line in printed)
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 1001
    assert "minilm job1001" in (out / "index.html").read_text()
    sweep = read_sweep(client, parent, per_prompt=False)
    assert len(sweep.runs) == 1001 and len(sweep.missing) == 1
    for model, curves in expected.items():
        got = (sweep.curves[(sweep.curves["lw.model"] == model)
                            & (sweep.curves["metric"] == "curvature")]
               .groupby("layer")["value"].mean().to_numpy())
        np.testing.assert_allclose(got, np.mean(curves, axis=0))


def test_a_store_that_does_not_exist_is_named_not_created(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none/mlflow.db")
    with pytest.raises(SystemExit, match=f"no MLflow store at sqlite:///{tmp_path}/none"):
        report(["--all", "--out", str(tmp_path / "report")])
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("command", ["lw.report", "lw.crossmodel"])
def test_a_parent_that_does_not_exist_is_named_in_one_line(tmp_path, command, capsys):
    from lw.config.tracking import TrackingConfig
    from lw.crossmodel import main as crossmodel
    from lw.tracking.store import client_for

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client_for(TrackingConfig(uri=uri)).create_experiment("lw")
    args = {"lw.report": ["--parent", "deadbeef", "--out", str(tmp_path / "r.png")],
            "lw.crossmodel": ["deadbeef"]}[command]
    run = report if command == "lw.report" else crossmodel
    with pytest.raises(SystemExit) as stop:
        run([*args, "--uri", uri])
    assert str(stop.value) == f"[lw] error: run 'deadbeef' does not exist in {uri}"
