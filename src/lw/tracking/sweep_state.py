"""The sweep's shared state, in one place: what the sweep's parent (lw.sweep.callback) knows and
its jobs read (the parent run, the models for run colours, the varied keys for run names, the
sweep's pid for its workers to die with it, the revisions holding identical weights).

Written once by the callback (``begin``), read through ``current()``, dropped at the sweep's
end (``end``). Its transport is the environment: jobs run in this process (Hydra's basic
launcher) and in processes it starts (joblib workers, submitit tasks, which inherit it); none
of them reads these variables but through this module."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

PARENT_ENV = "LW_PARENT_RUN_ID"   # the sweep's parent run: its jobs' runs are its children
MODELS_ENV = "LW_SWEEP_MODELS"    # the sweep's models, for run colours that differ
VARIES_ENV = "LW_SWEEP_VARIES"    # the override keys the sweep varies, for run names
PID_ENV = "LW_SWEEP_PID"          # the process that launched the sweep (lw.tracking.resume)
SAME_WEIGHTS_ENV = "LW_SWEEP_SAME_WEIGHTS"  # revisions with identical weights (lw.sweep.revisions)
_ALL = (PARENT_ENV, MODELS_ENV, VARIES_ENV, PID_ENV, SAME_WEIGHTS_ENV)


@dataclass(frozen=True)
class SweepState:
    """``varies`` is None outside a sweep (a single job names its run otherwise);
    ``same_weights``: "<model id>@<revision>" -> the revisions holding its very weights."""

    parent: str | None = None
    models: tuple[str, ...] = ()
    varies: tuple[str, ...] | None = None
    pid: int | None = None
    same_weights: dict[str, str] = field(default_factory=dict)


def current() -> SweepState:
    """The sweep this process's jobs belong to (an empty state outside one)."""
    env = os.environ
    varies = env.get(VARIES_ENV)
    pid = env.get(PID_ENV, "")
    return SweepState(parent=env.get(PARENT_ENV) or None,
                      models=tuple(m for m in env.get(MODELS_ENV, "").split(",") if m),
                      varies=None if varies is None else tuple(k for k in varies.split(",") if k),
                      pid=int(pid) if pid.isdigit() else None,
                      same_weights=json.loads(env.get(SAME_WEIGHTS_ENV) or "{}"))


def begin(state: SweepState) -> None:
    """The sweep's state, for this process and the ones it starts."""
    values = {PARENT_ENV: state.parent, MODELS_ENV: ",".join(state.models),
              VARIES_ENV: None if state.varies is None else ",".join(state.varies),
              PID_ENV: None if state.pid is None else str(state.pid),
              SAME_WEIGHTS_ENV: json.dumps(state.same_weights) if state.same_weights else None}
    for name, value in values.items():
        if value is not None:
            os.environ[name] = value


def end(keep_pid: bool = True) -> SweepState:
    """Forget the sweep (its end, or a process that logs outside it: lw.sync); returns what
    it was. The pid stays by default (workers still running die with the sweep)."""
    was = current()
    for name in _ALL:
        if name != PID_ENV or not keep_pid:
            os.environ.pop(name, None)
    return was


@contextlib.contextmanager
def children_of(parent: str | None):
    """The jobs logged in this block are children of run ``parent`` (None: of no run), as a
    sweep's are of its parent: a training run's measurements (lw.training). The parent before
    comes back after."""
    before = os.environ.get(PARENT_ENV)
    if parent:
        os.environ[PARENT_ENV] = parent
    else:
        os.environ.pop(PARENT_ENV, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = before
