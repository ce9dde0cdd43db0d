"""The metric registry: which metrics exist, and how a job's config binds their knobs.

Token metrics run per batch inside the forward pass (see ``lw.extract``); data-set metrics run
once on the pooled vectors of all prompts; view metrics on the pooled vectors of augmented
copies of every prompt; downstream metrics (probe, cluster) on the pooled vectors and the
data's labels; ``dip`` runs on the per-prompt prompt entropies; ``mc_accuracy`` scores the
answer letter from the last token's final state and correlates it per subject with prompt
entropy; ``overlap`` scores each prompt's BM25 overlap with a reference corpus.
The functions themselves live in the sibling modules and know nothing of configs.
"""

from __future__ import annotations

import torch

from lw.config import LwConfig
from lw.metrics.choice import answer_logprobs, choice_correct, subject_correlations, subject_means
from lw.metrics.curvature import prepped_curvatures
from lw.metrics.dip import dip_test
from lw.metrics.downstream import cluster, probe
from lw.metrics.entropy import dataset_entropy, gram_spectrum, prep, spectrum_matrix_entropy
from lw.metrics.intrinsic import twonn
from lw.metrics.overlap import bm25_overlap, overlap_by_layer
from lw.metrics.views import dime, infonce, lidar

TOKEN_METRICS = ("prompt_entropy", "curvature")
POOLED_METRICS = ("dataset_entropy", "intrinsic_dimension")
VIEW_METRICS = ("infonce", "dime", "lidar")
DOWNSTREAM_METRICS = ("probe", "cluster")


def _prefixed(prefix: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{key}": value for key, value in values.items()}


def needs_prompt_entropy(cfg: LwConfig) -> bool:
    return bool({"prompt_entropy", "dip", "mc_accuracy", "overlap"} & set(cfg.metrics))


def token_products_needed(cfg: LwConfig) -> list[str]:
    """Names of the per-prompt products the job's token metrics are computed from:
    ``spectrum/<compat>`` (N, L+1, m) for prompt entropy, ``curvature/<compat>`` (N, L+1),
    ``final_state/last`` (N, 1, D) the last real token's state in the last layer (mc_accuracy:
    what the LM head reads)."""
    names = []
    if needs_prompt_entropy(cfg):
        names.append(f"spectrum/{cfg.metric.compat}")
    if "curvature" in cfg.metrics:
        names += ["curvature/paper", "curvature/official"]
    if "mc_accuracy" in cfg.metrics:
        names.append("final_state/last")
    return names


def token_products(wanted: list[str]) -> dict:
    """{"token": fn(hidden (L+1, B, T, D), mask (B, T)) -> {product: (L+1, B, ...)}}, or {}.

    ``wanted``: product names, as :func:`token_products_needed` gives them.

    One function for all token products, so that the prep they share (centering and
    normalizing every token state, the largest tensor of the batch) runs once per batch.
    What it keeps are the raw products (Gram spectra, curvature in both compat modes), not
    the metrics: prompt entropy then follows for any alpha and normalization without another
    forward pass (:func:`token_values`), which is what the activation cache relies on.
    """
    if not wanted:
        return {}

    def batch_products(h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = mask.to(device=h.device, dtype=torch.bool)
        values = {}
        if "final_state/last" in wanted:
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = torch.where(mask, positions, -1).amax(dim=1)                 # (B,)
            rows = torch.arange(len(last), device=h.device)
            values["final_state/last"] = h[-1, rows, last.to(h.device)].unsqueeze(0)
        if not any(name.startswith(("spectrum/", "curvature/")) for name in wanted):
            return values
        z = prep(h, mask)
        for name in wanted:
            if name.startswith("spectrum/"):
                values[name] = gram_spectrum(z, mask, compat=name.split("/")[1])
        if "curvature/paper" in wanted:
            values.update(_prefixed("curvature", prepped_curvatures(z, mask)))
        return values

    return {"token": batch_products}


def token_values(cfg: LwConfig, per_prompt: dict[str, torch.Tensor], rows: torch.Tensor,
                 hidden_size: int) -> dict[str, torch.Tensor]:
    """Per-prompt token metrics (N, L+1) from the products of :func:`token_products`.

    Args:
        per_prompt: ``{product: (N, L+1, ...)}`` as the forward pass (or the cache) left them.
        rows: ``(N,)`` real token rows each prompt's metrics saw (its tokens after skip_first).
        hidden_size: D, for the logD / max normalizations.
    """
    m = cfg.metric
    values: dict[str, torch.Tensor] = {}
    if needs_prompt_entropy(cfg):
        spectra = per_prompt[f"spectrum/{m.compat}"]
        values.update(_prefixed("prompt_entropy", spectrum_matrix_entropy(
            spectra, rows.unsqueeze(-1).expand(spectra.shape[:-1]), hidden_size,
            alpha=m.prompt_entropy.alpha, compat=m.compat,
            normalizations=tuple(m.normalizations))))
    if "curvature" in cfg.metrics:
        values["curvature"] = per_prompt[f"curvature/{m.compat}"]
    return values


def pooled_metrics(cfg: LwConfig, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """Data-set metrics from pooled vectors (N, L+1, D): {logged name: (L+1,)}."""
    m = cfg.metric
    values: dict[str, torch.Tensor] = {}
    if "dataset_entropy" in cfg.metrics:
        by_layer = pooled.transpose(0, 1)                                   # (L+1, N, D)
        values.update(_prefixed("dataset_entropy", dataset_entropy(
            by_layer, alpha=m.dataset_entropy.alpha, compat=m.compat,
            normalizations=tuple(m.normalizations))))
    if "intrinsic_dimension" in cfg.metrics:
        values["intrinsic_dimension"] = twonn(pooled.transpose(0, 1),
                                              fraction=m.intrinsic_dimension.fraction)
    return values


def views_needed(cfg: LwConfig) -> int:
    """Augmented copies per prompt the view metrics need: 2 (InfoNCE, DiME), J (LiDAR), or 0."""
    needed = [2 for name in ("infonce", "dime") if name in cfg.metrics]
    if "lidar" in cfg.metrics:
        needed.append(cfg.metric.lidar.J)
    return max(needed, default=0)


def view_metrics(cfg: LwConfig, views: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """View metrics from pooled vectors of augmented copies (N, L+1, J, D): {name: (L+1,)}.

    InfoNCE and DiME compare views 0 and 1; LiDAR takes the first ``metric.lidar.J`` views.
    """
    m = cfg.metric
    by_layer = views.transpose(0, 1)                                        # (L+1, N, J, D)
    values: dict[str, torch.Tensor] = {}
    if "infonce" in cfg.metrics:
        values.update(_prefixed("infonce", infonce(by_layer[:, :, 0], by_layer[:, :, 1],
                                                   tau=m.infonce.tau)))
    if "dime" in cfg.metrics:
        values["dime"] = dime(by_layer[:, :, 0], by_layer[:, :, 1], alpha=m.dime.alpha,
                              r=m.dime.r, generator=generator, compat=m.compat)
    if "lidar" in cfg.metrics:
        values.update(_prefixed("lidar", lidar(by_layer[:, :, :m.lidar.J], delta=m.lidar.delta,
                                               normalizations=tuple(m.normalizations))))
    return values


def downstream_metrics(cfg: LwConfig, pooled: torch.Tensor,
                       labels: list[str]) -> dict[str, torch.Tensor]:
    """Per-layer downstream scores from pooled vectors (N, L+1, D) and labels: {name: (L+1,)}."""
    by_layer = pooled.transpose(0, 1)
    values: dict[str, torch.Tensor] = {}
    if "probe" in cfg.metrics:
        p = cfg.metric.probe
        values.update(_prefixed("probe", probe(by_layer, labels, folds=p.folds, seed=cfg.seed,
                                               max_iter=p.max_iter, C=p.C)))
    if "cluster" in cfg.metrics:
        values.update(_prefixed("cluster", cluster(by_layer, labels, seed=cfg.seed)))
    return values


def mc_metrics(entropy: torch.Tensor, states: torch.Tensor, head: torch.Tensor,
               letters: torch.Tensor, subjects: list[str], answers: torch.Tensor,
               n_choices: torch.Tensor) -> tuple[dict, dict, dict]:
    """Zero-shot multiple-choice accuracy and its per-subject correlation with prompt entropy.

    Args:
        entropy: ``(N, L+1)`` per-prompt prompt entropy; states: ``(N, D)`` last real token's
            final state; head: ``(V, D)`` output embedding; letters: ``(K,)`` answer-letter ids;
            subjects, answers, n_choices: per prompt.

    Returns:
        per-layer ``{mc/pearson, mc/spearman, ...: (L+1,)}``, per-prompt columns
        ``{mc/correct, mc/logprob_A, ...: (N,)}``, and summaries (accuracy overall and per
        subject, the number of subjects).
    """
    logprobs = answer_logprobs(states, head, letters)                          # (N, K)
    correct = choice_correct(logprobs, answers, n_choices)
    per_layer = _prefixed("mc", subject_correlations(entropy, correct, subjects))
    columns = {"mc/correct": correct.double(), "mc/answer": answers.double(),
               **{f"mc/logprob_{chr(65 + k)}": logprobs[:, k] for k in range(len(letters))}}
    names, accuracy = subject_means(correct.double(), subjects)
    summary = {"mc/accuracy": float(correct.double().mean()), "mc/n_subjects": float(len(names)),
               **{f"mc/accuracy/{_metric_key(name)}": float(a)
                  for name, a in zip(names, accuracy, strict=True)}}
    return per_layer, columns, summary


def _metric_key(name: str) -> str:
    """A subject as an MLflow metric name part (letters, digits, _ - . space and / only)."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in name)


def overlap_metrics(cfg: LwConfig, prompts: list[str], corpus: list[str],
                    entropy: torch.Tensor) -> tuple[dict, dict, dict]:
    """Each prompt's BM25 overlap with ``corpus`` and, per layer, how it tracks prompt entropy
    ``(N, L+1)`` (correlations; mean overlap per entropy mode where the dip test says bimodal).

    Returns:
        per-layer ``{overlap/pearson, ..., overlap/low_mode, overlap/high_mode: (L+1,)}``, the
        per-prompt column ``{overlap/bm25: (N,)}``, and summaries (mean, median overlap).
    """
    o = cfg.metric.overlap
    overlap = bm25_overlap(prompts, corpus, k=o.k, k1=o.k1, b=o.b)
    _, pvalue = dip_test(entropy)
    per_layer = _prefixed("overlap", overlap_by_layer(overlap, entropy, torch.from_numpy(pvalue)))
    summary = {"overlap/mean": float(overlap.mean()), "overlap/median": float(overlap.median()),
               "overlap/corpus_documents": float(len(corpus))}
    return per_layer, {"overlap/bm25": overlap}, summary
