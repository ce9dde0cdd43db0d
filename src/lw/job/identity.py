"""A job's identity: the part of its config that determines its results, as a stable hash.

Two hashes, one way of computing them:
- ``job_hash``: everything a job's logged values depend on (model and its weights, data and
  its knobs, perturbation, metrics and their knobs, extraction knobs, seed), written down as
  contents, not names: a hub revision as the commit it resolves to, a packaged model or corpus
  as its package, version and file sha256, a local file (``~`` expanded) and the overlap
  corpus by content. Logged as the artifact ``config/identity.json``. Not tracking,
  Hydra, the run name, the batch size or the device: they change where results go or how fast
  they come, not what they are. Logged as the tag ``lw.job_hash``; resume skips a job whose
  hash already has a FINISHED run.
- ``forward_hash``: the subset that determines the forward pass's products (everything but the
  metrics and their knobs): the activation cache's key.
- ``job_key``: the job as configured (names, not contents); a FINISHED run with the same key
  and another hash is the same job whose inputs changed: a re-run says which fields.
- ``embedding_hash``: what MTEB's per-layer embeddings depend on (its result cache's key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from lw.config.schema import DataConfig, LwConfig
from lw.loading.assets import package_file_identity
from lw.loading.data_sources import PACKAGED_FILES, corpus_config, hub_data_commit
from lw.loading.models import weights_identity
from lw.loading.paths import file_sha256

# Bump when the forward products change meaning (a new product layout, a pooling fix), so
# that old cache entries and old runs are not taken for new ones.
FORMAT = 1
NOT_RESULTS = {"model": ("name", "device_map", "max_memory"),
               "data": ("name",),
               "extraction": ("batch_size", "device", "cache", "log_pooled")}


def local_file_identity(path: str) -> dict:
    """A local file by content (``~`` expanded first): an edited file is another job."""
    file = Path(path).expanduser().resolve()
    return {"sha256": file_sha256(file) if file.is_file() else "missing"}


def data_identity(cfg: DataConfig) -> dict:
    """The data knobs, and what names the records themselves: a local file's content hash, a
    hub data set's resolved commit, a packaged corpus' package, version and file hash."""
    data = {k: v for k, v in asdict(cfg).items() if k not in NOT_RESULTS["data"]}
    if cfg.source == "local" and cfg.path:
        data["file"] = local_file_identity(cfg.path)
    elif cfg.source == "hub" and cfg.path:
        data["commit"] = hub_data_commit(cfg)
    elif cfg.source in PACKAGED_FILES:
        data["package"] = package_file_identity(*PACKAGED_FILES[cfg.source])
    return data


def _model_identity(job: LwConfig) -> dict:
    model = {k: v for k, v in asdict(job.model).items() if k not in NOT_RESULTS["model"]}
    model["weights"] = weights_identity(job.model)
    return model


def _extraction_identity(job: LwConfig) -> dict:
    # extraction.sublayers (it adds products) counts only when on: the hashes of the jobs
    # logged before it existed stay what they were
    return {k: v for k, v in asdict(job.extraction).items()
            if k not in NOT_RESULTS["extraction"] and not (k == "sublayers" and not v)}


def forward_identity(job: LwConfig) -> dict:
    """What the forward pass's products depend on."""
    extraction = _extraction_identity(job)
    return {"format": FORMAT, "model": _model_identity(job), "data": data_identity(job.data),
            "perturbation": asdict(job.perturbation), "extraction": extraction,
            "seed": job.seed}


def job_identity(job: LwConfig) -> dict:
    """What every logged value of the job depends on."""
    from lw.metrics.registry import identity, knobs_of, running

    # {metric: version} of the metrics the job runs, and only their knobs
    tree = {**forward_identity(job), **identity(job)}
    if job.extraction.log_pooled:  # a run that holds them is another run (its hash unchanged
        tree["logged"] = {"pooled": True}  # without them)
    # the reference corpora those metrics read (e.g. overlap's), by content
    corpora = {f"{m.name}_corpus": data_identity(corpus_config(k.corpus, k.text_field))
               for m in running(job) if "corpus" in m.needs and (k := knobs_of(job, m))}
    if corpora:
        tree["metric_inputs"] = corpora
    return tree


def job_key(job: LwConfig) -> str:
    """The job as configured (names, not contents): the same key with another ``job_hash``
    means the same job whose inputs or code changed (a re-run says what changed)."""
    from lw.metrics.registry import identity

    return stable_hash({"model": asdict(job.model), "data": asdict(job.data),
                        "perturbation": asdict(job.perturbation),
                        "extraction": _extraction_identity(job),
                        "metrics": sorted(job.metrics), "metric": identity(job)["metric"],
                        "seed": job.seed})


def embedding_identity(job: LwConfig) -> dict:
    """What a layer's MTEB embedding of a sentence depends on: the model (weights, dtype,
    adapters, bidirectional attention), how tokens become one vector, and the length cut."""
    return {"format": FORMAT, "model": _model_identity(job),
            "pooling": job.extraction.pooling, "skip_first": job.extraction.skip_first,
            "max_tokens": job.data.max_tokens}


def flat(tree, prefix: str = "") -> dict[str, str]:
    """{"data.file.sha256": "ab12...", ...}: every leaf of a nested identity."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree, sort_keys=True, default=str)}


def identity_diff(old: dict, new: dict) -> list[str]:
    """One "field: old -> new" line per leaf that differs between two identities."""
    before, after = flat(old), flat(new)

    def short(value: str | None) -> str:
        return "(none)" if value is None else value if len(value) <= 24 else value[:21] + "..."

    return [f"{key}: {short(before.get(key))} -> {short(after.get(key))}"
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def stable_hash(tree: dict) -> str:
    """16 hex digits of the SHA-256 of ``tree`` as canonical JSON (sorted keys)."""
    text = json.dumps(tree, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def job_hash(job: LwConfig) -> str:
    return stable_hash(job_identity(job))


def forward_hash(job: LwConfig) -> str:
    return stable_hash(forward_identity(job))


def embedding_hash(job: LwConfig) -> str:
    return stable_hash(embedding_identity(job))
