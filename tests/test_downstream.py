"""lw.metrics.downstream against scikit-learn / scipy computed independently, hand-made curves
and tables, and the errors a user sees for unusable labels."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import v_measure_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from lw.errors import LwError
from lw.metrics.functional.downstream import (
    best_layer_table,
    cluster,
    layer_choice,
    metric_agreement,
    probe,
)

CLASSES = ("apple", "pear", "plum")
PER_CLASS, D = 30, 6


def synthetic_layers(seed: int = 0):
    """(3, N, D) pooled vectors: layer 0 well separated, layer 1 pure noise, layer 2 overlapping
    classes; labels (N,) as strings, interleaved (not sorted by class)."""
    rng = np.random.default_rng(seed)
    labels = np.array([CLASSES[i % 3] for i in range(3 * PER_CLASS)])
    codes = np.array([CLASSES.index(c) for c in labels])
    centers = rng.normal(size=(3, D))
    separated = 20.0 * centers[codes] + rng.normal(size=(len(codes), D)) + 5.0
    noise = rng.normal(size=(len(codes), D)) * 3.0
    overlapping = 0.7 * centers[codes] + rng.normal(size=(len(codes), D))
    return torch.from_numpy(np.stack([separated, noise, overlapping])), labels


def test_probe_equals_sklearn_cross_validation():
    pooled, labels = synthetic_layers()
    out = probe(pooled, labels, folds=5, seed=3)
    assert out["accuracy"].shape == (3,) and out["accuracy"].dtype == torch.float64
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=3)
    for layer in range(3):
        pipeline = Pipeline([("scale", StandardScaler()),
                             ("logreg", LogisticRegression(C=1.0, max_iter=1000))])
        expected = cross_val_score(pipeline, pooled[layer].numpy(), labels, cv=folds,
                                   scoring="accuracy")
        assert out["accuracy"][layer].item() == pytest.approx(expected.mean(), abs=1e-12)
        assert out["accuracy_std"][layer].item() == pytest.approx(expected.std(), abs=1e-12)
    accuracy = out["accuracy"]
    assert accuracy[0] == 1.0                         # separated classes
    assert abs(accuracy[1].item() - 1 / 3) < 0.2      # noise: chance is 1/3
    assert accuracy[1] < accuracy[2] < accuracy[0]


def test_probe_seed_changes_folds_and_C_matters():
    pooled, labels = synthetic_layers()
    base = probe(pooled[2:], labels, seed=0)["accuracy"]
    assert probe(pooled[2:], labels, seed=1)["accuracy"] != base
    assert probe(pooled[2:], labels, seed=0, C=1e-4)["accuracy"] != base


def test_probe_non_finite_layer_is_nan_not_an_error():
    pooled, labels = synthetic_layers()
    pooled = pooled.clone()
    pooled[1, 4, 2] = float("nan")
    out = probe(pooled, labels)
    assert math.isnan(out["accuracy"][1]) and math.isnan(out["accuracy_std"][1])
    assert out["accuracy"][0] == 1.0


def test_probe_errors_name_the_problem():
    pooled, labels = synthetic_layers()
    with pytest.raises(LwError, match=r"at least 2 classes.*'apple': 90"):
        probe(pooled, np.array(["apple"] * len(labels)))
    tiny = labels.copy()
    tiny[:3] = "kiwi"                                  # 3 prompts, fewer than 5 folds
    with pytest.raises(LwError, match=r"class 'kiwi'.* 3 prompts.*metric\.probe\.folds"):
        probe(pooled, tiny, folds=5)
    probe(pooled[:1], tiny, folds=3)                   # 3 per class is enough for 3 folds
    with pytest.raises(LwError, match="89 labels for 90 prompts"):
        probe(pooled, labels[:-1])
    with pytest.raises(LwError, match="at least 2 folds"):
        probe(pooled, labels, folds=1)
    with pytest.raises(LwError, match=r"\(L\+1, N, D\)"):
        probe(pooled[0], labels)


def independent_v_measure(x: np.ndarray, labels, seed: int) -> float:
    centered = x - x.mean(axis=0)
    unit = centered / np.linalg.norm(centered, axis=1, keepdims=True)
    found = KMeans(n_clusters=len(set(labels)), n_init=4, random_state=seed).fit_predict(unit)
    return v_measure_score(labels, found)


def test_cluster_scores():
    pooled, labels = synthetic_layers()
    out = cluster(pooled, labels, seed=7)
    assert set(out) == {"v_measure", "nmi", "ari"}
    assert out["v_measure"][0] == pytest.approx(1.0, abs=1e-12)
    assert out["ari"][0] == pytest.approx(1.0, abs=1e-12)
    assert out["v_measure"][1] < 0.1 and abs(out["ari"][1]) < 0.1
    for layer in range(3):
        expected = independent_v_measure(pooled[layer].numpy(), labels, seed=7)
        assert out["v_measure"][layer].item() == pytest.approx(expected, abs=1e-12)
    # sklearn's default NMI (arithmetic normalization) is the V-measure.
    torch.testing.assert_close(out["nmi"], out["v_measure"], rtol=0, atol=1e-12)
    with pytest.raises(LwError, match="at least 2 classes"):
        cluster(pooled, ["apple"] * len(labels))


def test_layer_choice_on_hand_made_curves():
    assert layer_choice(torch.tensor([0.1, 0.5, 0.9, 0.7])) == pytest.approx(
        {"best_layer": 2.0, "best": 0.9, "last": 0.7, "best_minus_last": 0.2,
         "best_is_last": 0.0})
    lower = layer_choice(torch.tensor([3.0, 1.0, 2.0]), higher_is_better=False)
    assert lower == pytest.approx({"best_layer": 1.0, "best": 1.0, "last": 2.0,
                                   "best_minus_last": -1.0, "best_is_last": 0.0})
    tie = layer_choice(torch.tensor([0.1, 0.9, 0.9]))
    assert tie["best_layer"] == 1.0 and tie["best_is_last"] == 1.0
    assert layer_choice(torch.tensor([0.2, 0.4, 0.8]))["best_is_last"] == 1.0
    with_nan = layer_choice(torch.tensor([float("nan"), 0.2, 0.1]))
    assert with_nan["best_layer"] == 1.0 and with_nan["best_minus_last"] == pytest.approx(0.1)
    assert all(math.isnan(v) for v in layer_choice(torch.full((3,), float("nan"))).values())


def test_metric_agreement_on_hand_made_curves():
    score = torch.tensor([0.2, 0.6, 0.9, 0.4, 0.3])
    negative = metric_agreement(-score, score, prefer="min")
    assert negative["spearman"] == pytest.approx(-1.0)
    assert negative["metric_best_layer"] == 2.0 == negative["downstream_best_layer"]
    assert negative["best_layer_match"] == 1.0
    assert metric_agreement(-score, score, prefer="max")["best_layer_match"] == 0.0
    assert metric_agreement(score**3, score)["spearman"] == pytest.approx(1.0)
    other = torch.tensor([0.5, 0.1, 0.7, 0.2, 0.9])
    expected = spearmanr(other.numpy(), score.numpy()).statistic
    out = metric_agreement(other, score)
    assert out["spearman"] == pytest.approx(expected, abs=1e-12)
    assert out["metric_best_layer"] == 4.0 and out["best_layer_match"] == 0.0
    assert math.isnan(metric_agreement(torch.ones(5), score)["spearman"])
    holes = torch.tensor([float("nan"), 0.6, 0.9, 0.4, 0.3])
    assert metric_agreement(holes, score)["spearman"] == pytest.approx(1.0)
    with pytest.raises(LwError, match="prefer"):
        metric_agreement(score, score, prefer="best")


def test_best_layer_table_on_a_hand_made_sweep():
    nan = float("nan")
    curves = {("A", "t1"): [0.5, 0.8, 0.6],       # best 0.8 at layer 1, last 0.6
              ("A", "t2"): [0.2, 0.3, 0.9],       # best is last
              ("B", "t1"): [0.4, 0.4, 0.4],       # tie: the last layer is as good
              ("B", "t2"): [0.3, nan, 0.2],       # best 0.3 at layer 0
              ("B", "t3"): [0.5, 0.6, nan]}       # last layer NaN: left out
    rows = [{"model": m, "task": t, "layer": layer, "score": s}
            for (m, t), curve in curves.items() for layer, s in enumerate(curve)]
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=0)   # order must not matter
    table = best_layer_table(frame)
    assert list(table["model"]) == ["A", "B"]
    a, b = table.iloc[0], table.iloc[1]
    assert a["n_tasks"] == 2 and b["n_tasks"] == 2
    assert a["share_best_not_last"] == pytest.approx(0.5)
    assert a["mean_last_score"] == pytest.approx(0.75)
    assert a["mean_best_score"] == pytest.approx(0.85)
    assert a["mean_best_depth"] == pytest.approx(0.75)
    assert b["share_best_not_last"] == pytest.approx(0.5)
    assert b["mean_last_score"] == pytest.approx(0.3)
    assert b["mean_best_score"] == pytest.approx(0.35)
    assert b["mean_best_depth"] == pytest.approx(0.0)
    with pytest.raises(LwError, match="missing: score"):
        best_layer_table(frame.drop(columns="score"))
