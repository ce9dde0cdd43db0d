"""Downstream quality of every layer inside a job: probe and cluster scores from the job's own
pooled vectors, and how the unsupervised metrics track them (issue 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import v_measure_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import compose_job, load_option, wiki_records
from lw.errors import ConfigError
from lw.job.stages import compute

TOPICS = ("Mathematics", "Geography", "Arts")
PER_TOPIC = 6
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    rows = []
    for topic in TOPICS:
        rows += [{"text": r["extract"], "topic": r["topic"]}
                 for r in wiki_records() if r["topic"] == topic][:PER_TOPIC]
    path = tmp_path_factory.mktemp("labelled") / "topics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


@pytest.fixture(scope="module")
def job_result(labelled):
    path, rows = labelled
    job = compose_job(["model=tiny-pythia", "data=local", f"data.path={path}",
                       "data.label_field=topic", f"data.n_prompts={len(rows)}",
                       f"data.max_tokens={MAX_TOKENS}", "metric.probe.folds=3",
                       "metrics=[probe,cluster,prompt_entropy,dataset_entropy,curvature]"])
    return job, compute(job)


def independent_pooled(rows) -> np.ndarray:
    """(N, L+1, D) mean-pooled states from one unbatched forward pass per text."""
    loaded = load_option("tiny-pythia", seed=0)
    pooled = []
    for row in rows:
        ids = loaded.tokenizer(row["text"])["input_ids"][:MAX_TOKENS]
        with torch.no_grad():
            states = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        pooled.append([h[0].double().mean(0).numpy() for h in states])
    return np.array(pooled)


def test_probe_accuracy_matches_scikit_learn_on_the_same_pooled_vectors(labelled, job_result):
    _, rows = labelled
    job, result = job_result
    # The job's prompts come in its seeded shuffle; scores do not depend on row order only
    # through the folds, so rebuild the same order from the per-prompt token counts.
    pooled = independent_pooled(rows)
    labels = np.array([r["topic"] for r in rows])
    order = _job_order(job, rows)
    pooled, labels = pooled[order], labels[order]
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=job.seed)
    expected = []
    for layer in range(pooled.shape[1]):
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        expected.append(cross_val_score(pipeline, pooled[:, layer], labels, cv=folds).mean())
    np.testing.assert_allclose(result.table["probe/accuracy"], expected, atol=1e-9)
    assert result.table["probe/accuracy_std"].notna().all()


def _job_order(job, rows) -> list[int]:
    from lw.loading.model_sources import load_tokenizer_of
    from lw.loading.prompts import load_prompts

    prompts = load_prompts(job.data, load_tokenizer_of("smollm2"))
    texts = [r["text"] for r in rows]
    return [texts.index(t) for t in prompts.texts]


def test_cluster_v_measure_matches_scikit_learn(labelled, job_result):
    _, rows = labelled
    job, result = job_result
    order = _job_order(job, rows)
    pooled = independent_pooled(rows)[order]
    labels = np.array([r["topic"] for r in rows])[order]
    expected = []
    for layer in range(pooled.shape[1]):
        x = pooled[:, layer] - pooled[:, layer].mean(0)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        found = KMeans(n_clusters=len(TOPICS), n_init=4, random_state=job.seed).fit_predict(x)
        expected.append(v_measure_score(labels, found))
    np.testing.assert_allclose(result.table["cluster/v_measure"], expected, atol=1e-6)


def test_summaries_name_the_best_layer_and_how_each_metric_tracks_it(job_result):
    _, result = job_result
    accuracy = result.table["probe/accuracy"].to_numpy()
    summary = result.summary
    best = int(np.argmax(accuracy))
    assert summary["summary/probe/accuracy/best_layer"] == best
    assert summary["summary/probe/accuracy/last"] == pytest.approx(accuracy[-1])
    assert summary["summary/probe/accuracy/best_is_last"] == float(best == len(accuracy) - 1)
    for metric in ("prompt_entropy/max", "dataset_entropy/max", "curvature"):
        rho = summary[f"agreement/{metric}/probe/accuracy/spearman"]
        from scipy.stats import spearmanr

        assert rho == pytest.approx(spearmanr(result.table[metric], accuracy).statistic,
                                    nan_ok=True)
        argmax = int(np.argmax(result.table[metric].to_numpy()))
        assert summary[f"agreement/{metric}/probe/accuracy/argmax_is_best"] == float(
            argmax == best)


def test_label_metrics_without_labels_fail_at_composition():
    with pytest.raises(ConfigError, match="data.label_field"):
        compose_job(["metrics=[probe]"])
