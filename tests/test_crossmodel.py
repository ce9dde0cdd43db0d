"""Cross-model CKA (lw.crossmodel): against the float64 numpy reference on vectors of
different widths, and a real sweep of two models whose parent run gets the matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import compose_job, lw_cli
from lw.metrics.cka import cka_between
from test_cka import hsic_biased, hsic_unbiased

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_between_models_of_different_widths_matches_reference(debiased):
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(10, 3, 4)), rng.normal(size=(10, 2, 7))
    b[:, 1, :4] = a[:, 2] @ np.linalg.qr(rng.normal(size=(4, 4)))[0] * 2.5
    b[:, 1, 4:] = 0.0
    hsic = hsic_unbiased if debiased else hsic_biased
    expected = np.array([[hsic(a[:, i], b[:, j]) / np.sqrt(hsic(a[:, i], a[:, i])
                                                           * hsic(b[:, j], b[:, j]))
                          for j in range(2)] for i in range(3)])
    got = cka_between(torch.tensor(a), torch.tensor(b), debiased=debiased).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert got[2, 1] == pytest.approx(1.0)  # orthogonal transform + scaling, zero-padded


def test_pairs_are_compared_on_the_prompts_both_measured_matched_by_text():
    from lw.job.pooled import common_rows
    from lw.sweep.crossmodel import group_label

    assert common_rows(["x", "y", "z", "y"], ["y", "z", "w", "y"]) == ([1, 2, 3], [0, 1, 3])
    assert common_rows(["a"], ["b"]) == ([], [])
    assert group_label("smollm2 skip_first=1", "smollm2") == "skip_first-1"
    assert group_label("minilm pooling=last skip_first=0", "minilm") == \
        "pooling-last_skip_first-0"


def test_a_sweep_of_two_models_logs_their_cka_to_the_parent(tmp_path, lw_cache, monkeypatch):
    from lw.sweep.crossmodel import pooled_of

    monkeypatch.setenv("LW_CACHE_DIR", str(lw_cache))
    job = ["data.n_prompts=8", "data.max_tokens=32", "metrics=[cka]", "extraction.cache=true"]
    done = lw_cli(tmp_path, "-m", "model=tiny-pythia,tiny-mamba", *job,
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                  f"tracking.artifact_location={tmp_path}/art",
                  f"hydra.sweep.dir={tmp_path}/multirun",
                  env={"LW_CACHE_DIR": str(lw_cache)})
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("lw").experiment_id
    parent = next(r for r in client.search_runs([experiment])
                  if "mlflow.parentRunId" not in r.data.tags)
    names = [a.path for a in client.list_artifacts(parent.info.run_id, "cross_cka")]
    assert len(names) == 1, names
    a, b = names[0].split("/")[-1][:-len(".csv")].split("__")
    assert {a, b} == {"tiny-pythia", "tiny-mamba"}
    table = np.genfromtxt(client.download_artifacts(parent.info.run_id, names[0], str(tmp_path)),
                          delimiter=",", skip_header=1)
    pooled = {m: pooled_of(compose_job([f"model={m}", *job])) for m in (a, b)}
    expected = cka_between(pooled[a], pooled[b]).numpy()
    np.testing.assert_allclose(table[:, 1:], expected, rtol=1e-6)
    np.testing.assert_allclose(table[:, 0], np.arange(len(expected)) / (len(expected) - 1))
    assert f"cross_cka/{a}__{b}/depth_diagonal" in client.get_run(parent.info.run_id).data.metrics
    figures = [f.path for f in client.list_artifacts(parent.info.run_id, "figures")]
    assert f"figures/cross_cka_{a}__{b}.png" in figures
    # and in the sweep's report: the same matrix, its heat map on the page
    from lw.report import write_report

    page = write_report(client, parent.info.run_id, tmp_path / "report", log=False)
    assert f'src="cross_cka_{a}__{b}.png"' in page.read_text()
    assert (tmp_path / "report" / f"cross_cka_{a}__{b}.png").stat().st_size > 1000
    reported = np.genfromtxt(tmp_path / "report" / f"cross_cka_{a}__{b}.csv", delimiter=",",
                             skip_header=1)
    np.testing.assert_allclose(reported, table)


def test_two_finished_runs_on_a_store_are_compared_from_their_logged_pooled_vectors(
        tmp_path, lw_cache, monkeypatch, capsys):
    """Two single jobs with extraction.log_pooled=true and no activation cache: the command
    compares them by run id from their artifacts alone, on the prompts both measured (matched
    by text hash), and logs the matrix to a run of its own."""
    import lw.crossmodel
    from lw.job import pooled

    monkeypatch.setenv("LW_CACHE_DIR", str(lw_cache))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for model, prompts in (("tiny-pythia", 10), ("tiny-mamba", 8)):
        done = lw_cli(tmp_path, f"model={model}", f"data.n_prompts={prompts}",
                      "data.max_tokens=32", "metrics=[curvature]", "extraction.log_pooled=true",
                      f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path}/art",
                      f"hydra.run.dir={tmp_path}/run-{model}", env={"LW_CACHE_DIR": str(lw_cache)})
        assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lw").experiment_id
    runs = {r.data.tags["lw.model"]: r for r in client.search_runs([experiment])}
    vectors = {}
    for model, run in runs.items():
        path = client.download_artifacts(run.info.run_id, "results/pooled.pt", str(tmp_path))
        vectors[model] = pooled.load(path)
        assert vectors[model][0].shape[0] == int(run.data.metrics["n_prompts"])
    ids = [runs["tiny-pythia"].info.run_id, runs["tiny-mamba"].info.run_id]
    lw.crossmodel.main(["--uri", uri, *ids])
    said = capsys.readouterr().out
    own = next(r for r in client.search_runs([experiment]) if "lw.crossmodel.of" in r.data.tags)
    assert own.info.status == "FINISHED" and own.data.tags["lw.crossmodel.of"] == ",".join(ids)
    assert f"in run {own.info.run_id}" in said
    (a, hashes_a), (b, hashes_b) = vectors["tiny-pythia"], vectors["tiny-mamba"]
    rows_a, rows_b = pooled.common_rows(hashes_a, hashes_b)
    assert len(rows_a) == 8  # the 8 prompts of the smaller job, found among the other's 10
    table = np.genfromtxt(client.download_artifacts(
        own.info.run_id, "cross_cka/tiny-pythia__tiny-mamba.csv", str(tmp_path)),
        delimiter=",", skip_header=1)
    np.testing.assert_allclose(table[:, 1:], cka_between(a[rows_a], b[rows_b]).numpy(),
                               rtol=1e-6)
    assert own.data.metrics["cross_cka/tiny-pythia__tiny-mamba/n_prompts"] == 8
    with pytest.raises(SystemExit, match="--debiased is cka's"):
        lw.crossmodel.main(["--uri", uri, "--measure", "probe", "--debiased", *ids])
    with pytest.raises(SystemExit, match="k takes an integer"):
        lw.crossmodel.main(["--uri", uri, "--measure", "mutual_knn", "--knob", "k=x", *ids])
    # another measure, a knob given on the command line
    from lw.metrics.mutual_knn import mutual_knn_between

    lw.crossmodel.main(["--uri", uri, "--measure", "mutual_knn", "--knob", "k=3", *ids])
    own = next(r for r in client.search_runs([experiment])
               if r.data.tags.get("lw.crossmodel.measure") == "mutual_knn")
    table = np.genfromtxt(client.download_artifacts(
        own.info.run_id, "cross_mutual_knn/tiny-pythia__tiny-mamba.csv", str(tmp_path)),
        delimiter=",", skip_header=1)
    np.testing.assert_allclose(table[:, 1:],
                               mutual_knn_between(a[rows_a], b[rows_b], k=3).numpy(), rtol=1e-6)
    # calibrated against the permutation null: raw, calibrated table and diagonals
    from lw.metrics.pairwise import calibrated, null_of

    lw.crossmodel.main(["--uri", uri, "--knob", "calibrate=true", "--knob", "permutations=3",
                        *ids])
    own = next(r for r in client.search_runs([experiment])
               if "cross_cka/tiny-pythia__tiny-mamba/depth_diagonal_calibrated" in r.data.metrics)
    scaled = np.genfromtxt(client.download_artifacts(
        own.info.run_id, "cross_cka/tiny-pythia__tiny-mamba_calibrated.csv", str(tmp_path)),
        delimiter=",", skip_header=1)
    x, y = a[rows_a], b[rows_b]
    null = null_of(cka_between, x, y, 3, 0).mean(dim=0)
    np.testing.assert_allclose(scaled[:, 1:], calibrated(cka_between(x, y), null, 1.0).numpy(),
                               rtol=1e-6)
