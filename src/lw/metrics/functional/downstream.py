"""Downstream scores of each layer's pooled vectors, and how well a metric picks the best layer.

``probe`` (linear probe accuracy) and ``cluster`` (k-means against the labels) score every
layer on a labelled prompt set; ``layer_choice`` and ``metric_agreement`` turn per-layer curves
into summary numbers; ``best_layer_table`` summarizes a sweep as Table 1 of "Does Representation
Matter? Exploring Intermediate Layers in Large Language Models" (Skean et al., 2024): per model,
how often the best layer for a task is not the last one.

Inputs are "by layer": ``pooled`` is ``(L+1, N, D)``, layer 0 the embedding output. The pooled
vectors of :class:`lw.extract.Extraction` are ``(N, L+1, D)``: pass
``extraction.pooled.transpose(0, 1)``. Per-layer results are ``(L+1,)`` float64 tensors,
NaN for a layer whose vectors are not all finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lw.errors import LwError
from lw.metrics.functional.entropy import prep

PREFER = ("max", "min")
TABLE_COLUMNS = ("model", "task", "layer", "score")


def _labels(labels: Sequence[str] | np.ndarray, n: int, what: str, min_count: int,
            hint: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels as an array, with their classes and counts; LwError when a method can't run."""
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise LwError(f"{what}: {len(y)} labels for {n} prompts (labels from data.label_field "
                      "must be one per prompt)")
    classes, counts = np.unique(y, return_counts=True)
    names = classes.tolist()     # plain Python values: 'a', not np.str_('a')
    shown = ", ".join(f"{c!r}: {k}" for c, k in zip(names[:10], counts[:10], strict=True))
    shown += ", ..." if len(classes) > 10 else ""
    if len(classes) < 2:
        raise LwError(f"{what} needs at least 2 classes of data.label_field; the {n} prompts "
                      f"have {len(classes)} ({shown}). Choose a label field with several "
                      "values or more prompts (data.n_prompts)")
    smallest = int(np.argmin(counts))
    if counts[smallest] < min_count:
        raise LwError(f"{what}: class {names[smallest]!r} of data.label_field has "
                      f"{counts[smallest]} prompts, fewer than {min_count} ({hint}). "
                      f"Class counts: {shown}. Use more prompts (data.n_prompts) or "
                      "lower metric.probe.folds")
    return y, classes, counts


def check_labels(labels: Sequence[str], probe_folds: int | None, clusters: bool) -> None:
    """The label checks of :func:`probe` (``probe_folds`` given) and :func:`cluster`, run on
    the plan's labels before any model loads (LwError naming the class and its count)."""
    if probe_folds is not None:
        _labels(labels, len(labels), "the linear probe", probe_folds,
                f"metric.probe.folds={probe_folds} needs every class in every fold")
    if clusters:
        _labels(labels, len(labels), "clustering", 1, "")


def _by_layer(pooled: Tensor, what: str) -> np.ndarray:
    if pooled.ndim != 3:
        raise LwError(f"{what}: pooled vectors must be (L+1, N, D), got shape "
                      f"{tuple(pooled.shape)}")
    return pooled.detach().to(device="cpu", dtype=torch.float64).numpy()


def probe(pooled: Tensor, labels: Sequence[str] | np.ndarray, folds: int = 5, seed: int = 0,
          max_iter: int = 1000, C: float = 1.0) -> dict[str, Tensor]:
    """Linear probe accuracy of every layer, by stratified k-fold cross-validation.

    For layer l the classifier is ``StandardScaler -> LogisticRegression(C, max_iter)``
    (scikit-learn, L2 penalty, lbfgs), fitted on the training folds of ``pooled[l]`` and scored
    (accuracy = share of correct predictions) on the held-out fold. The folds are
    ``StratifiedKFold(folds, shuffle=True, random_state=seed)`` over the labels, the same for
    every layer, so layers are compared on identical splits.

    Args:
        pooled: ``(L+1, N, D)`` pooled vectors, by layer.
        labels: ``(N,)`` class of each prompt (``data.label_field``), any hashable values.
        folds: number of folds (>= 2); every class needs at least ``folds`` prompts.
        seed: shuffles the prompts before they are cut into folds.
        max_iter, C: LogisticRegression's iteration cap and inverse regularization strength.

    Returns:
        ``accuracy``: mean accuracy over folds, ``accuracy_std``: population standard deviation
        over folds (ddof = 0), each ``(L+1,)`` float64; NaN for a layer with non-finite values.

    Raises:
        LwError: fewer than 2 classes, a class with fewer than ``folds`` prompts, folds < 2, or
            labels that do not match the prompts.
    """
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if folds < 2:
        raise LwError(f"metric.probe.folds={folds}: cross-validation needs at least 2 folds")
    x = _by_layer(pooled, "probe")
    y, _, _ = _labels(labels, x.shape[1], "the linear probe", folds,
                      f"metric.probe.folds={folds} needs every class in every fold")
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
                  .split(np.zeros(len(y)), y))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    scores = np.full((x.shape[0], folds), math.nan)
    for layer, features in enumerate(x):
        if not np.isfinite(features).all():
            continue
        for fold, (train, test) in enumerate(splits):
            fitted = clone(model).fit(features[train], y[train])
            scores[layer, fold] = fitted.score(features[test], y[test])
    return {"accuracy": torch.from_numpy(scores.mean(axis=1)),
            "accuracy_std": torch.from_numpy(scores.std(axis=1))}


def cluster(pooled: Tensor, labels: Sequence[str] | np.ndarray, seed: int = 0,
            n_init: int = 4) -> dict[str, Tensor]:
    """k-means on every layer's pooled vectors, scored against the labels.

    Each layer's vectors go through :func:`lw.metrics.entropy.prep` (centered on their mean,
    then each row L2-normalized, as for the entropy metrics), so k-means compares directions,
    as cosine similarity would, and is not dominated by a few large-norm dimensions or
    layers' differing scales. ``KMeans(k, n_init, random_state=seed)`` with k = the number of
    distinct labels, then, with ``H`` entropies of the label (C) and cluster (K) partitions:

    - ``v_measure`` = harmonic mean of homogeneity ``1 - H(C|K)/H(C)`` and completeness
      ``1 - H(K|C)/H(K)`` (what MTEB's clustering tasks report);
    - ``nmi`` = ``I(C;K) / mean(H(C), H(K))``, scikit-learn's default (arithmetic) NMI, which
      equals the V-measure (beta = 1) identically: kept under its own name for readers who
      look for NMI;
    - ``ari``: adjusted Rand index (0 for chance, 1 for the labels' partition).

    Args:
        pooled: ``(L+1, N, D)`` pooled vectors, by layer.
        labels: ``(N,)`` class of each prompt.
        seed: k-means initialization. n_init: k-means restarts (best inertia kept).

    Returns:
        ``v_measure``, ``nmi``, ``ari``: ``(L+1,)`` float64; NaN for a layer with non-finite
        values.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, v_measure_score

    x = _by_layer(pooled, "cluster")
    y, classes, _ = _labels(labels, x.shape[1], "clustering", 1, "")
    out = {name: np.full(x.shape[0], math.nan) for name in ("v_measure", "nmi", "ari")}
    for layer, features in enumerate(x):
        if not np.isfinite(features).all():
            continue
        z = prep(torch.from_numpy(features)).numpy()
        found = KMeans(n_clusters=len(classes), n_init=n_init, random_state=seed).fit_predict(z)
        out["v_measure"][layer] = v_measure_score(y, found)
        out["nmi"][layer] = normalized_mutual_info_score(y, found)
        out["ari"][layer] = adjusted_rand_score(y, found)
    return {name: torch.from_numpy(value) for name, value in out.items()}


def _curve(scores: Tensor | Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(torch.as_tensor(scores).detach().cpu().double().reshape(-1))


def _best(curve: np.ndarray, prefer: str) -> int | None:
    """Index of the best finite value (first one on ties); None when there is none."""
    if not np.isfinite(curve).any():
        return None
    values = np.where(np.isfinite(curve), curve, -np.inf if prefer == "max" else np.inf)
    return int(np.argmax(values) if prefer == "max" else np.argmin(values))


def layer_choice(scores: Tensor, higher_is_better: bool = True) -> dict[str, float]:
    """Where a per-layer score peaks, against the last layer.

    Args:
        scores: ``(L+1,)`` a score per layer (NaN layers are ignored).
        higher_is_better: False for losses and errors.

    Returns:
        ``best_layer`` (first layer reaching the best finite score), ``best``, ``last`` (the
        score of layer L, NaN if it is NaN), ``best_minus_last`` = best - last (>= 0 when
        higher is better, <= 0 otherwise) and ``best_is_last`` = 1.0 when the last layer reaches
        the best score (ties included), else 0.0; all NaN when no layer has a finite score.
    """
    curve = _curve(scores)
    best_layer = _best(curve, "max" if higher_is_better else "min")
    if best_layer is None or len(curve) == 0:
        return dict.fromkeys(("best_layer", "best", "last", "best_minus_last", "best_is_last"),
                             math.nan)
    best, last = float(curve[best_layer]), float(curve[-1])
    return {"best_layer": float(best_layer), "best": best, "last": last,
            "best_minus_last": best - last,
            "best_is_last": math.nan if math.isnan(last) else float(last == best)}


def metric_agreement(metric: Tensor, downstream: Tensor, prefer: str = "max") -> dict[str, float]:
    """How well a representation metric tracks a downstream score across layers.

    Args:
        metric: ``(L+1,)`` the metric per layer.
        downstream: ``(L+1,)`` the downstream score per layer (higher is better).
        prefer: ``"max"`` when a higher metric should mean a better layer, ``"min"`` when lower.

    Returns:
        - ``spearman``: Spearman rank correlation between metric and downstream over the layers
          where both are finite (average ranks for ties); NaN with fewer than 3 such layers or
          when either is constant there. Its sign is the raw one, whatever ``prefer``.
        - ``metric_best_layer``: argmax (``prefer="max"``) or argmin of the metric;
          ``downstream_best_layer``: argmax of the downstream score (first layer on ties).
        - ``best_layer_match``: 1.0 when the two layers are the same, else 0.0.
        NaN where a curve has no finite value.
    """
    from scipy.stats import spearmanr

    if prefer not in PREFER:
        raise LwError(f"prefer={prefer!r}: choose one of {', '.join(PREFER)}")
    m, d = _curve(metric), _curve(downstream)
    if m.shape != d.shape:
        raise LwError(f"metric has {m.size} layers, the downstream score {d.size}")
    both = np.isfinite(m) & np.isfinite(d)
    rho = math.nan
    if both.sum() >= 3 and np.ptp(m[both]) > 0 and np.ptp(d[both]) > 0:
        rho = float(spearmanr(m[both], d[both]).statistic)
    mb, db = _best(m, prefer), _best(d, "max")
    return {"spearman": rho,
            "metric_best_layer": math.nan if mb is None else float(mb),
            "downstream_best_layer": math.nan if db is None else float(db),
            "best_layer_match": math.nan if mb is None or db is None else float(mb == db)}


def best_layer_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model, how often intermediate layers beat the last one (higher scores are better).

    Args:
        frame: long rows with columns ``model``, ``task``, ``layer`` (int, larger = deeper),
            ``score``; NaN scores are ignored, and a task whose last layer scores NaN is left
            out.

    Returns:
        One row per model (sorted), columns ``model``; ``n_tasks``: tasks with a finite
        last-layer score; ``share_best_not_last``: share of those tasks whose best score is
        strictly higher than the last layer's; ``mean_last_score``: mean over tasks of the last
        layer's score; ``mean_best_score``: mean over tasks of the best layer's score;
        ``mean_best_depth``: mean over tasks of best layer / last layer (first best on ties).
        The last layer of a (model, task) is its largest ``layer``, whatever its score.
    """
    missing = [c for c in TABLE_COLUMNS if c not in frame.columns]
    if missing:
        raise LwError(f"best_layer_table needs columns {', '.join(TABLE_COLUMNS)}; "
                      f"missing: {', '.join(missing)}")
    per_task = []
    for (model, task), group in frame[list(TABLE_COLUMNS)].groupby(["model", "task"], sort=True):
        group = group.sort_values("layer", kind="stable")
        last_layer, last = group["layer"].iloc[-1], group["score"].iloc[-1]
        if pd.isna(last):
            continue
        finite = group[group["score"].notna()]
        best_at = int(np.argmax(finite["score"].to_numpy()))
        best = finite["score"].iloc[best_at]
        depth = finite["layer"].iloc[best_at] / last_layer if last_layer else math.nan
        per_task.append({"model": model, "task": task, "last": last, "best": best,
                         "not_last": float(best > last), "depth": depth})
    columns = ["model", "n_tasks", "share_best_not_last", "mean_last_score", "mean_best_score",
               "mean_best_depth"]
    if not per_task:
        return pd.DataFrame(columns=columns)
    tasks = pd.DataFrame(per_task)
    table = tasks.groupby("model", sort=True).agg(
        n_tasks=("task", "size"), share_best_not_last=("not_last", "mean"),
        mean_last_score=("last", "mean"), mean_best_score=("best", "mean"),
        mean_best_depth=("depth", "mean"))
    return table.reset_index()[columns]
