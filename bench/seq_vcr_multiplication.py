"""Seq-VCR against vanilla on digit multiplication (issue 25), small enough for 2 CPU cores.

    .venv/bin/python bench/seq_vcr_multiplication.py [--seeds 0 1 2] [--steps 1500] [--digits 2]

For each seed, three trainings of the training study (lw.training.study.train, task
``multiplication``) that differ only in ``train.seq_vcr``: vanilla (off, no pauses), Seq-VCR
with 2 pause tokens between question and answer (the paper's combination), and the 2 pauses
alone (to tell the regularizer's effect from the pauses'). lw.LayerwiseCallback
measures prompt entropy per layer on held-out problems at step 0 and every ``--every`` steps
(the step x depth heat maps, a child run per step, in ``<out>/mlflow.db``); after training, the
exact-match accuracy of greedy answers on the held-out problems.

A script rather than a ``+experiment`` config: an experiment is one training followed by jobs
that measure its checkpoints; this is nine trainings, each measured while it trains, then an
accuracy and a summary across them, which no single job or sweep computes.

Writes ``<out>/results.json`` (per run: accuracy, digit accuracy by answer position, prompt
entropy per layer at each measured step, time), ``<out>/entropy_final.png`` (the last step's
prompt entropy over depth, each seed and the mean), ``<out>/heatmap_<condition>.png`` (the
first seed's step x depth heat maps on one colour scale), and each run's own (the callback's,
scaled alone) under ``<out>/<condition>/seed<N>/lw/layers/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

# One thread: on 2 shared cores (load ~7) a training step of the model below took 0.11 s with
# one thread and 0.78 s with two.
torch.set_num_threads(1)

MODEL = dict(hidden_size=64, layers=4, heads=4, intermediate_size=256, batch_size=64,
             learning_rate=0.003, warmup=0.05)
CONDITIONS = {"vanilla": {"on": False},
              "seq_vcr": {"on": True, "pause_tokens": 2, "projection_size": 256},
              # the pauses alone: Seq-VCR on with both weights 0 adds exactly nothing to the loss
              "pause": {"on": True, "pause_tokens": 2, "lambda_var": 0.0, "lambda_cov": 0.0}}
N_MEASURED = 64  # held-out problems whose prompt entropy the callback measures
SERIES = "prompt_entropy/max"  # normalised by its largest possible value (lw's headline)


def config(condition: str, seed: int, args: argparse.Namespace):
    from lw.config.training import TrainConfig

    return TrainConfig(out=str(args.out / condition / f"seed{seed}"), task="multiplication",
                       digits=args.digits, train_problems=args.train_problems,
                       test_problems=args.test_problems, steps=args.steps, seed=seed,
                       checkpoints=[args.steps], seq_vcr=CONDITIONS[condition], **MODEL)


def measured_prompts(cfg) -> list[str]:
    """The first held-out problems whole, as the model reads them (pauses included)."""
    from lw.training import multiplication as task
    from lw.training.study import PAUSE_TOKEN

    pauses = cfg.seq_vcr.pause_tokens if cfg.seq_vcr.on else 0
    _, test = task.problems(cfg.digits, cfg.train_problems, cfg.test_problems, cfg.problem_seed)
    return [task.with_pauses(f"{p.question()} {p.answer()}", PAUSE_TOKEN, pauses)
            for p in test[:N_MEASURED]]


def final_dataset_entropy(cfg) -> list[float]:
    """Dataset entropy per layer of the final checkpoint: the spread of the measured problems'
    pooled states across problems, the axis Seq-VCR's variance term works on (across the
    batch), where prompt entropy is the spread across one problem's positions."""
    import lw

    table = lw.measure(f"{cfg.out}/step{cfg.steps}", measured_prompts(cfg),
                       metrics=["dataset_entropy"])
    return [float(v) for v in table.sort_values("layer")["dataset_entropy/max"]]


def run(condition: str, seed: int, args: argparse.Namespace) -> dict:
    from transformers import TrainerCallback

    import lw
    from lw.training import multiplication as task
    from lw.training.study import PAUSE_TOKEN, train

    cfg = config(condition, seed, args)
    out = Path(cfg.out)
    shutil.rmtree(out, ignore_errors=True)
    pauses = cfg.seq_vcr.pause_tokens if cfg.seq_vcr.on else 0
    _, test = task.problems(cfg.digits, cfg.train_problems, cfg.test_problems, cfg.problem_seed)
    prompts = measured_prompts(cfg)  # whole problems: entropy over every position
    layerwise = lw.LayerwiseCallback(
        prompts, metrics=["prompt_entropy"], every_steps=args.every,
        tracking__uri=f"sqlite:///{args.out.resolve()}/mlflow.db",
        tracking__experiment="seq_vcr_multiplication")

    class AtStart(TrainerCallback):  # step 0: the initialisation, before any update
        def on_train_begin(self, train_args, state, control, model=None,
                           processing_class=None, **kwargs):
            layerwise.on_train_begin(train_args, state, control,
                                     processing_class=processing_class)
            layerwise.measure(model, processing_class, 0)

    start = time.perf_counter()
    trainer = train(cfg, callbacks=[AtStart(), layerwise])
    seconds = time.perf_counter() - start
    answers = task.greedy_answers(trainer.model, trainer.processing_class, test,
                                  PAUSE_TOKEN if pauses else None, pauses)
    exact, by_position = task.accuracy(answers, test)
    values = layerwise.values
    entropy = values[values.metric == SERIES]
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    result = {"condition": condition, "seed": seed, "accuracy": exact,
              "digit_accuracy": by_position, "train_seconds": seconds,
              "final_loss": losses[-1] if losses else None,
              "entropy": {int(step): [float(v) for v in rows.sort_values("layer").value]
                          for step, rows in entropy.groupby("step")},
              "dataset_entropy": final_dataset_entropy(cfg),
              "heatmap": str(out / "lw" / "layers" / f"{SERIES}.png")}
    print(f"[lw] {condition} seed {seed}: exact match {result['accuracy']:.3f}, digits "
          f"{[round(x, 2) for x in by_position]}, {seconds:.0f} s", flush=True)
    return result


def plot_final(results: list[dict], path: Path) -> None:
    """The last step's prompt entropy and dataset entropy over depth: each seed thin, the
    mean over seeds thick, one colour per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = ((lambda r: r["entropy"][max(r["entropy"], key=int)], "prompt entropy (max)"),
              (lambda r: r["dataset_entropy"], "dataset entropy (max)"))
    for axis, (curve_of, label) in zip(axes, panels, strict=True):
        for condition, colour in (("vanilla", "tab:blue"), ("seq_vcr", "tab:red"),
                                  ("pause", "tab:green")):
            runs = [r for r in results if r["condition"] == condition]
            if not runs:
                continue
            curves = [curve_of(r) for r in runs]
            depth = np.linspace(0, 1, len(curves[0]))
            for curve in curves:
                axis.plot(depth, curve, color=colour, alpha=0.3, lw=1)
            accuracy = np.mean([r["accuracy"] for r in runs])
            axis.plot(depth, np.mean(curves, axis=0), color=colour, lw=2,
                      label=f"{condition} (exact match {accuracy:.1%})")
        axis.set_xlabel("relative depth (0 = embeddings)")
        axis.set_ylabel(f"{label}, last step")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_heatmaps(results: list[dict], out: Path) -> list[Path]:
    """The first seed's step x depth heat map of each condition (lw.job.plots'), on one colour
    scale so that the conditions compare by colour: ``<out>/heatmap_<condition>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from lw.job.plots import step_depth_heatmap

    seed = results[0]["seed"]
    tables = {r["condition"]: pd.DataFrame(
        [(step, layer / (len(curve) - 1), value) for step, curve in r["entropy"].items()
         for layer, value in enumerate(curve)], columns=["step", "depth", "value"])
        for r in results if r["seed"] == seed}
    low = min(t.value.min() for t in tables.values())
    high = max(t.value.max() for t in tables.values())
    paths = []
    for condition, table in tables.items():
        figure = step_depth_heatmap(table, f"{SERIES} ({condition}, seed {seed})")
        figure.axes[0].collections[0].set_clim(low, high)  # the colour bar follows
        paths.append(out / f"heatmap_{condition}.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/seq_vcr_multiplication"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS),
                        choices=list(CONDITIONS))
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=150, help="measure every N steps")
    parser.add_argument("--train-problems", type=int, default=6000)
    parser.add_argument("--test-problems", type=int, default=500)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = [run(condition, seed, args) for seed in args.seeds for condition in args.conditions]
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "model": MODEL, "conditions": CONDITIONS, "runs": results,
               "wall_seconds": time.perf_counter() - start}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_final(results, args.out / "entropy_final.png")
    plot_heatmaps(results, args.out)
    for condition in args.conditions:
        accuracies = [r["accuracy"] for r in results if r["condition"] == condition]
        print(f"[lw] {condition}: exact match mean {sum(accuracies) / len(accuracies):.3f} "
              f"({', '.join(f'{a:.3f}' for a in accuracies)})")
    print(f"[lw] {len(results)} runs in {summary['wall_seconds']:.0f} s; {args.out}/results.json")


if __name__ == "__main__":
    main()
