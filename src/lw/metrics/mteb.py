"""mteb: every layer's MTEB main score per task (`pip install '.[mteb]'`), one forward pass per
task's sentences (lw.encoder)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lw.errors import check
from lw.metrics.registry import Metric, Output


@dataclass
class MTEBKnobs:
    tasks: list[str] = field(default_factory=list)   # MTEB task names (hub)
    output_folder: str | None = None  # None: <project>/mteb-results (results reused per layer)


def _check(job) -> None:
    check(bool(job.metric.mteb.tasks),
          "metrics mteb needs metric.mteb.tasks=[...] (e.g. +experiment=mteb)")


def _compute(inputs) -> Output:
    frame = inputs.mteb(list(inputs.knobs.tasks), inputs.knobs.output_folder)
    curves = frame.pivot(index="layer", columns="task", values="main_score").sort_index()
    values = {f"mteb/{task}": torch.tensor(curves[task].to_numpy()) for task in curves}
    values["mteb/mean"] = torch.tensor(curves.mean(axis=1).to_numpy())
    return Output(per_layer=values)


METRIC = Metric(
    name="mteb", compute=_compute, needs=("model",), knobs=MTEBKnobs, logs={"mteb/": True},
    scores=("mteb/mean",), check=_check, description="MTEB main scores of every layer")
