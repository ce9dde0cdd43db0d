"""lw.LayerwiseCallback: a model's layers measured while it trains, logged next to its loss.

Each measurement is one lw job on the model in memory, run by the code ``lw.measure((model,
tokenizer), prompts)`` runs (lw.api: the in-memory path) and logged as ``lw.run`` logs a job
(lw.sweep.logged), as a child of the training run. The training is left as it was: the model
goes back to its mode, and the random generators (torch CPU and CUDA, python, numpy) to their
state; the forward pass takes no gradient.

Under a ``transformers.Trainer`` the training run is the active MLflow run (transformers' own
MLflowCallback opens it when ``report_to`` includes mlflow), else a run of the callback's own
in lw's store. On it, after each measurement: ``layers/table.csv`` (step, layer, depth, metric,
value) and a heat map per series over (training step x relative depth). Everything is written
to a folder first (``<output_dir>/lw``, or ``outputs/lw-training/<date>/<time>``); a store that
is away never stops the training: the values stay there, said in one line.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

from lw import api
from lw.errors import LwError
from lw.job.plots import step_depth_heatmap
from lw.tracking.health import ResultsKept, server_refuses, store_lost
from lw.tracking.jobdir import upload_files
from lw.tracking.runs import lw_version, source_tags
from lw.tracking.store import client_for, experiment_id, tracking_uri
from lw.tracking.sweep_state import children_of

STEP_TAG = "lw.train.step"   # on each measurement's run: the training step it measured
LAYERS = "layers"            # the training run's artifacts: table.csv, <series>.png
COLUMNS = ["step", "layer", "depth", "metric", "value"]


@dataclass
class TrainingRun:
    """The MLflow run the measurements go under (``run_id`` None: the store was away when the
    callback would have opened its own)."""

    run_id: str | None
    uri: str
    experiment: str
    own: bool           # opened by the callback (it ends it), or someone else's
    client: Any = None


class LayerwiseCallback(TrainerCallback):
    """Measure a model's layers while it trains: a ``transformers.TrainerCallback``, or one call
    per step in a hand-written loop (:meth:`measure`).

    prompts: a list of strings, or a data option (``"wiki-vital"``, with ``data__n_prompts=``).
    metrics: lw metric names (None: conf/config.yaml's list). knobs: any config field as
    ``lw.measure`` takes it (``data__max_tokens=64``, ``metric__prompt_entropy__alpha=2``,
    ``tracking__uri=`` for a run of its own). every_steps: measure every N optimizer steps;
    None: at each checkpoint save and each evaluation. The config is composed and checked
    here: a bad knob fails before the training starts."""

    def __init__(self, prompts: Any, metrics: list[str] | None = None,
                 every_steps: int | None = None, **knobs: Any) -> None:
        if every_steps is not None and (isinstance(every_steps, bool)
                                        or not isinstance(every_steps, int) or every_steps < 1):
            raise LwError(f"every_steps={every_steps!r}: an integer >= 1, or None (measure at "
                          "each checkpoint save and evaluation)")
        if "log" in knobs:
            raise LwError("log=: LayerwiseCallback always logs (tracking__uri= names the store "
                          "of a run of its own)")
        self.prompts = prompts if isinstance(prompts, str) else [str(p) for p in prompts]
        self.metrics = None if metrics is None else list(metrics)
        self.every_steps = every_steps
        self.knobs = dict(knobs)
        with tempfile.TemporaryDirectory() as tmp:  # logged prompts go to lw's cache, not tmp
            _, job, _ = api.composed_job(None, self.prompts, self.metrics, self.knobs, tmp, True)
        self.tracking = job.tracking  # where a run of its own goes (lw's store rule)
        self.values = pd.DataFrame(columns=COLUMNS)  # every measurement, long
        self.folder: Path | None = None
        self.run: TrainingRun | None = None
        self.steps: list[int] = []

    # --- transformers.Trainer's events ---
    def on_train_begin(self, args, state, control, processing_class=None, **kwargs):
        if processing_class is None:
            raise LwError("LayerwiseCallback measures with the model's tokenizer: pass "
                          "processing_class=tokenizer to the Trainer")
        self.folder = self.folder or Path(args.output_dir) / "lw"

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self._in_trainer(args, state, model, processing_class)

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_steps is None:
            self._in_trainer(args, state, model, processing_class)

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_steps is None:
            self._in_trainer(args, state, model, processing_class)

    def on_train_end(self, args, state, control, **kwargs):
        self.finish()

    def _in_trainer(self, args, state, model, tokenizer) -> None:
        # one measurement per step (an evaluation and a save at one step see the same
        # weights); one process measures (rank 0 of a data-parallel run)
        if not state.is_world_process_zero or state.global_step in self.steps:
            return
        self.folder = self.folder or Path(args.output_dir) / "lw"
        self.measure(model, tokenizer, state.global_step)

    # --- the measurement ---
    def measure(self, model, tokenizer, step: int) -> pd.DataFrame:
        """Measure ``model`` now, as training step ``step``: log the step's run (a child of
        the training run) and redraw the training run's heat maps and table. Returns the
        per-layer table ``lw.measure`` returns (``attrs``: summary, model, run_id, step)."""
        step = int(step)
        folder = self._folder()
        run = self._training_run(model)
        with tempfile.TemporaryDirectory() as tmp:
            cfg, job, overrides = api.composed_job(None, self.prompts, self.metrics, {
                **self.knobs, "tracking__uri": run.uri, "tracking__experiment": run.experiment,
                "run_name": f"step {step}"}, tmp, True)
        job, work = api._loaded_job(job, model, tokenizer, cfg)
        result = untouched(model, work)
        result.tags[STEP_TAG] = str(step)
        away, child = None, None
        try:
            with children_of(run.run_id):
                _, child, _ = api._log(cfg, job, lambda: result, overrides, True,
                                       folder / f"step{step}")
        except ResultsKept:
            away = server_refuses(run.uri) or "connection failed"
        self.steps.append(step)
        self._add(result.table, step)
        away = self._publish(run, folder) or away
        if away is not None:
            print(f"[lw] training step {step}: tracking server {run.uri} is unreachable "
                  f"({away}): the layers' values are kept in {folder} ({LAYERS}/table.csv; "
                  f"`python -m lw.sync {folder / f'step{step}'}` logs the step's run); "
                  "training goes on", file=sys.stderr)
        table = result.table.copy()
        table.attrs.update(summary=dict(result.summary), model=result.info.as_dict(),
                           run_id=child, step=step)
        return table

    def finish(self) -> None:
        """End the training run the callback opened (a Trainer's end does it); a run someone
        else opened (transformers' MLflowCallback) is theirs to end."""
        run, self.run = self.run, None
        if run is not None and run.own and run.run_id and server_refuses(run.uri) is None:
            try:
                run.client.set_terminated(run.run_id, "FINISHED")
            except Exception as error:
                if not store_lost(error, run.uri):
                    raise

    def _folder(self) -> Path:
        if self.folder is None:
            self.folder = Path("outputs", "lw-training", time.strftime("%Y-%m-%d/%H-%M-%S"))
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder.resolve()

    def _training_run(self, model) -> TrainingRun:
        """The active MLflow run (its store and experiment), else the callback's own run in
        lw's store (tracking.uri, else MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)."""
        import mlflow

        active = mlflow.active_run()
        if active is not None and (self.run is None or not self.run.own):
            if self.run is None or self.run.run_id != active.info.run_id:
                uri = mlflow.get_tracking_uri()
                client = mlflow.MlflowClient(uri)
                experiment = client.get_experiment(active.info.experiment_id).name
                self.run = TrainingRun(active.info.run_id, uri, experiment, False, client)
            return self.run
        if self.run is None:
            uri = tracking_uri(self.tracking)
            name = str(getattr(model.config, "name_or_path", "") or model.config.model_type)
            tags = {**source_tags(uri), "mlflow.source.name": "lw.training",
                    "lw.version": lw_version()}
            try:
                client = client_for(self.tracking)
                run_id = client.create_run(experiment_id(client, self.tracking),
                                           run_name=f"training {Path(name).name}",
                                           tags=tags).info.run_id
            except Exception as error:
                if not store_lost(error, uri):
                    raise
                client, run_id = None, None
            self.run = TrainingRun(run_id, uri, self.tracking.experiment, True, client)
        return self.run

    def _add(self, table: pd.DataFrame, step: int) -> None:
        long = table.melt(id_vars=["layer", "depth"], var_name="metric", value_name="value")
        long.insert(0, "step", step)
        self.values = pd.concat([self.values, long[COLUMNS]] if len(self.values) else
                                [long[COLUMNS]], ignore_index=True)

    def _publish(self, run: TrainingRun, folder: Path) -> str | None:
        """The long table and a heat map per series into ``folder/layers``, then onto the
        training run (the same paths each time: the latest replaces the one before). Returns
        why the store is away, or None."""
        import matplotlib.pyplot as plt

        layers = folder / LAYERS
        layers.mkdir(parents=True, exist_ok=True)
        self.values.to_csv(layers / "table.csv", index=False)
        for series, values in self.values.groupby("metric", sort=False):
            figure = step_depth_heatmap(values, series)
            path = layers / f"{series}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path)
            plt.close(figure)
        if run.run_id is None:
            return server_refuses(run.uri) or "connection failed"
        away = server_refuses(run.uri)
        if away is None:
            try:
                upload_files(run.client, run.run_id, folder, [LAYERS])
            except Exception as error:
                if not store_lost(error, run.uri):
                    raise
                away = server_refuses(run.uri) or "connection failed"
        return away


def untouched(model, work):
    """``work()`` (a forward pass of ``model``) with no gradient, the training's random state
    (torch CPU and CUDA, python, numpy) and the model's train/eval mode as they were before."""
    was_training = model.training
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = []
    if torch.cuda.is_initialized():  # only the devices in use (forking all would init each)
        cuda = sorted({torch.cuda.current_device()} | {
            p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            return work()
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        model.train(was_training)

