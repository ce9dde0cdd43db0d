"""A job's identity: the part of its config that determines its results, as a stable hash.

Two hashes, one way of computing them:
- ``job_hash``: everything a job's logged values depend on (model and its weights, data and
  its knobs, perturbation, metrics and their knobs, extraction knobs, seed). Not tracking,
  Hydra, the run name, the batch size or the device: they change where results go or how fast
  they come, not what they are. Logged as the tag ``lw.job_hash``; resume skips a job whose
  hash already has a FINISHED run.
- ``forward_hash``: the subset that determines the forward pass's products (everything but the
  metrics and their knobs): the activation cache's key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from lw.config import LwConfig
from lw.models import file_sha256, weights_identity

# Bump when the forward products change meaning (a new product layout, a pooling fix), so
# that old cache entries and old runs are not taken for new ones.
FORMAT = 1
NOT_RESULTS = {"model": ("name", "device_map", "max_memory"),
               "data": ("name",),
               "extraction": ("batch_size", "device", "cache")}


def _data_identity(job: LwConfig) -> dict:
    data = {k: v for k, v in asdict(job.data).items() if k not in NOT_RESULTS["data"]}
    if job.data.source == "local" and job.data.path and Path(job.data.path).is_file():
        data["file_sha256"] = file_sha256(Path(job.data.path).expanduser().resolve())
    return data


def forward_identity(job: LwConfig) -> dict:
    """What the forward pass's products depend on."""
    model = {k: v for k, v in asdict(job.model).items() if k not in NOT_RESULTS["model"]}
    model["weights"] = weights_identity(job.model)
    extraction = {k: v for k, v in asdict(job.extraction).items()
                  if k not in NOT_RESULTS["extraction"]}
    return {"format": FORMAT, "model": model, "data": _data_identity(job),
            "perturbation": asdict(job.perturbation), "extraction": extraction,
            "seed": job.seed}


def job_identity(job: LwConfig) -> dict:
    """What every logged value of the job depends on."""
    from lw.metrics.registry import identity

    # {metric: version} of the metrics the job runs, and only their knobs
    return {**forward_identity(job), **identity(job)}


def stable_hash(tree: dict) -> str:
    """16 hex digits of the SHA-256 of ``tree`` as canonical JSON (sorted keys)."""
    text = json.dumps(tree, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def job_hash(job: LwConfig) -> str:
    return stable_hash(job_identity(job))


def forward_hash(job: LwConfig) -> str:
    return stable_hash(forward_identity(job))
