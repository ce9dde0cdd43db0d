"""mc_accuracy (multiple-choice data, causal LMs): zero-shot accuracy from the log-likelihood
of each answer letter (" A", " B", ...), read from the last token's final state through the
output embedding, and per layer how a subject's mean prompt entropy tracks its accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from lw.errors import LwError, check
from lw.metrics.functional.choice import (
    answer_logprobs,
    choice_correct,
    subject_correlations,
    subject_means,
)
from lw.metrics.registry import Metric, Output


@dataclass
class MCAccuracyKnobs:
    # layers with a subject scatter figure; [] = layer 1, the middle, the last and the layer of
    # the most negative Pearson r
    layers: list[int] = field(default_factory=list)


def _check(job) -> None:
    check(job.data.multiple_choice,
          "metrics mc_accuracy needs multiple-choice data: data=mmlu-offline, data=mmlu "
          "or data=local data.multiple_choice=true")
    check(job.model.family != "encoder",
          f"metrics mc_accuracy needs a causal LM (model.family decoder or ssm), not "
          f"model={job.model.name} (family {job.model.family})")
    check(job.data.answer == "none",
          f"metrics mc_accuracy with data.answer={job.data.answer}: the answer must "
          "follow the prompt's last token; use data.answer=none")
    check(job.perturbation.name not in ("random", "augment"),
          f"metrics mc_accuracy with perturbation={job.perturbation.name}: the "
          "prompts are no longer the questions; use none, repetition or randomness")


def _check_plan(job, tokenizer, plan) -> None:
    """Fails before the model loads when an answer letter is not one token."""
    from lw.metrics.functional.choice import letter_ids

    letter_ids(tokenizer, max(q.n_choices for q in plan.questions))


def scatter_layers(table, chosen: list[int]) -> list[int]:
    """Layers with a subject scatter figure: ``metric.mc_accuracy.layers``, or layer 1, the
    middle, the last and the layer of the most negative Pearson r across subjects."""
    last = int(table["layer"].max())
    if chosen:
        wrong = [layer for layer in chosen if not 0 <= layer <= last]
        if wrong:
            raise LwError(f"metric.mc_accuracy.layers={list(chosen)}: layers run 0..{last}")
        return sorted(set(chosen))
    picks = {min(1, last), last // 2, last}
    if table["mc/pearson"].notna().any():
        picks.add(int(table.loc[table["mc/pearson"].idxmin(), "layer"]))
    return sorted(picks)


def _metric_key(name: str) -> str:
    """A subject as an MLflow metric name part (letters, digits, _ - . space and / only)."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in name)


def _compute(inputs) -> Output:
    from lw.metrics.functional.choice import letter_ids
    from lw.metrics.prompt_entropy import headline

    questions = inputs.questions
    subjects = [q.subject for q in questions]
    answers = torch.tensor([q.answer for q in questions])
    n_choices = torch.tensor([q.n_choices for q in questions])
    letters = letter_ids(inputs.model().tokenizer, int(n_choices.max()))
    states = inputs.products["final_state/last"][:, 0]                       # (N, D)
    logprobs = answer_logprobs(states, inputs.output_embedding(), letters)   # (N, K)
    correct = choice_correct(logprobs, answers, n_choices)
    entropy = inputs.values[headline(inputs.job)]
    per_layer = {f"mc/{k}": v for k, v in
                 subject_correlations(entropy, correct, subjects).items()}
    columns = {"mc/correct": correct.double(), "mc/answer": answers.double(),
               **{f"mc/logprob_{chr(65 + k)}": logprobs[:, k] for k in range(len(letters))},
               "subject": subjects}
    names, accuracy = subject_means(correct.double(), subjects)
    summary = {"mc/accuracy": float(correct.double().mean()), "mc/n_subjects": float(len(names)),
               **{f"mc/accuracy/{_metric_key(name)}": float(a)
                  for name, a in zip(names, accuracy, strict=True)}}
    table = pd.DataFrame({"layer": np.arange(entropy.shape[1]),
                          "mc/pearson": per_layer["mc/pearson"].double().numpy()})
    layers = scatter_layers(table, inputs.knobs.layers)

    def scatters(result, title: str) -> dict:
        return subject_scatters(result.per_prompt, result.table, layers, title=title)

    return Output(per_layer=per_layer, columns=columns, summary=summary,
                  tags={"lw.mc.scatter_layers": ",".join(map(str, layers))},
                  figures={"mc_scatters": scatters})


METRIC = Metric(
    name="mc_accuracy", compute=_compute, needs=("tokens", "output_embedding", "answers"),
    knobs=MCAccuracyKnobs, uses=("prompt_entropy",),
    logs={"mc/pearson": None, "mc/spearman": None, "mc/": None},
    products=lambda job: ["final_state/last"], check=_check, check_plan=_check_plan,
    description="zero-shot multiple-choice accuracy, and its per-subject correlation with "
                "prompt entropy")

def subject_scatters(per_prompt: pd.DataFrame, table: pd.DataFrame, layers: list[int],
                     column: str = "prompt_entropy/max",
                     title: str = "") -> dict:
    """The papers' Figs. 5-6: per layer, one point per subject, its prompts' mean ``column``
    against its accuracy (``mc/correct``), titled with the layer's Pearson r and Spearman rho.
    Returns ``{"mc_scatter_layer_<l>": figure}`` for each of ``layers``."""
    import matplotlib.pyplot as plt

    figures = {}
    by_layer = table.set_index("layer")
    for layer in layers:
        rows = per_prompt[per_prompt["layer"] == layer]
        subjects = rows.groupby("subject").agg(entropy=(column, "mean"),
                                               accuracy=("mc/correct", "mean"))
        fig, ax = plt.subplots(figsize=(4.2, 3.4))
        ax.scatter(subjects["entropy"], subjects["accuracy"], s=14, alpha=0.8)
        row = by_layer.loc[layer]
        ax.set_title(f"{title} layer {layer}\nPearson r={row['mc/pearson']:.2f} "
                     f"(p={row['mc/pearson_pvalue']:.2g}), Spearman "
                     f"rho={row['mc/spearman']:.2f}", fontsize=8)
        ax.set_xlabel(f"subject mean {column}", fontsize=8)
        ax.set_ylabel("subject accuracy", fontsize=8)
        ax.grid(alpha=0.3)
        # fixed margins (0.6, 0.15, 0.5, 0.6 in), not tight_layout: see lw.job.plots
        fig.subplots_adjust(left=0.6 / 4.2, right=1 - 0.15 / 4.2, bottom=0.5 / 3.4,
                            top=1 - 0.6 / 3.4)
        figures[f"mc_scatter_layer_{layer:02d}"] = fig
    return figures
