"""Training-set overlap (Appendix A): BM25 scores against bm25s called directly and a float64
Lucene BM25 reference, the entropy-mode split, and a real job on the packaged corpora."""

from __future__ import annotations

import math
from collections import Counter

import bm25s
import numpy as np
import pytest
import torch
from scipy import stats

from conftest import compose_job, wiki_records
from lw.errors import LwError
from lw.loading.prompts import corpus_texts
from lw.metrics.overlap import bm25_overlap, low_mode, overlap_by_layer


@pytest.fixture(scope="module")
def texts():
    wiki = [r["extract"] for r in wiki_records()[:300]]
    hpo = corpus_texts("medical-hpo")[:12]
    return {"corpus": wiki, "prompts": hpo + wiki[:4]}


def lucene_bm25(query: list[str], docs: list[list[str]], k1: float, b: float) -> np.ndarray:
    """Scores of one tokenized query against tokenized docs, Lucene's BM25, float64, loops:
    idf = ln(1 + (N - df + 0.5) / (df + 0.5)); term = idf tf / (tf + k1 (1 - b + b |d| / avg))."""
    n, average = len(docs), np.mean([len(d) for d in docs])
    df = Counter(term for doc in docs for term in set(doc))
    scores = np.zeros(n)
    for i, doc in enumerate(docs):
        counts = Counter(doc)
        for term in query:  # a repeated query word counts each time (as bm25s does)
            if counts[term]:
                idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
                tf = counts[term]
                scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(doc) / average))
    return scores


def test_overlap_is_the_best_bm25_score_as_bm25s_and_lucene_give_it(texts):
    corpus, prompts = texts["corpus"], texts["prompts"]
    found = bm25_overlap(prompts, corpus, k=1, k1=1.2, b=0.5).numpy()
    retriever = bm25s.BM25(k1=1.2, b=0.5)
    retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False),
                    show_progress=False)
    words = bm25s.tokenize(prompts, stopwords="en", return_ids=False, show_progress=False)
    direct = np.array([retriever.get_scores(query).max() for query in words])
    np.testing.assert_allclose(found, direct, rtol=1e-6)
    docs = bm25s.tokenize(corpus, stopwords="en", return_ids=False, show_progress=False)
    reference = np.array([lucene_bm25(q, docs, 1.2, 0.5).max() for q in words[:5]])
    np.testing.assert_allclose(found[:5], reference, rtol=1e-5)
    # the wiki prompts are in the corpus: they overlap far more than the medical ones
    assert found[-4:].min() > found[:12].max()
    top3 = bm25_overlap(prompts, corpus, k=3, k1=1.2, b=0.5).numpy()
    best3 = [np.sort(retriever.get_scores(q))[-3:].mean() for q in words]
    np.testing.assert_allclose(top3, best3, rtol=1e-6)
    assert (top3 < found).all()


def test_low_mode_is_the_best_two_way_split():
    generator = np.random.default_rng(0)
    values = np.stack([np.concatenate([generator.normal(0, 1, 30), generator.normal(8, 1, 20)]),
                       generator.normal(0, 1, 50)], axis=1)
    low = low_mode(torch.tensor(values)).numpy()
    assert low[:30, 0].all() and not low[30:, 0].any()
    for column in range(2):  # brute force over every threshold
        v = np.sort(values[:, column])
        within = [np.var(v[:s]) * s + np.var(v[s:]) * (len(v) - s) for s in range(1, len(v))]
        best = v[int(np.argmin(within))]
        np.testing.assert_array_equal(low[:, column], values[:, column] <= best)


def test_overlap_by_layer_correlates_and_splits_bimodal_layers_only():
    generator = np.random.default_rng(1)
    overlap = generator.gamma(2.0, 3.0, 60)
    entropy = np.stack([np.where(np.arange(60) < 35, 0.2, 0.8) + generator.normal(0, .02, 60),
                        generator.normal(0.5, 0.1, 60)], axis=1)
    pvalue = torch.tensor([0.001, 0.9])
    found = overlap_by_layer(torch.tensor(overlap), torch.tensor(entropy), pvalue)
    for layer in range(2):
        assert found["pearson"][layer] == pytest.approx(
            stats.pearsonr(entropy[:, layer], overlap).statistic, abs=1e-12)
        assert found["spearman"][layer] == pytest.approx(
            stats.spearmanr(entropy[:, layer], overlap).statistic, abs=1e-12)
    assert found["low_mode"][0] == pytest.approx(overlap[:35].mean())
    assert found["high_mode"][0] == pytest.approx(overlap[35:].mean())
    assert found["low_mode_share"][0] == pytest.approx(35 / 60)
    assert found["low_mode"][1].isnan() and found["high_mode"][1].isnan()


def test_a_job_logs_per_prompt_overlap_with_its_corpus(tmp_path):
    from lw.job.stages import compute

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(r["extract"] + "\n" for r in wiki_records()[:200]))
    job = compose_job(["model=tiny-pythia", "data=medical-hpo", "data.n_prompts=12",
                       "data.max_tokens=48", "metrics=[prompt_entropy,dip,overlap]",
                       f"metric.overlap.corpus={corpus}"])
    result = compute(job)
    n_layers = result.info.n_layers + 1
    assert result.per_prompt["overlap/bm25"].notna().all()
    assert len(result.per_prompt) == 12 * n_layers
    first = result.per_prompt.query("layer == 0")["overlap/bm25"].to_numpy()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(corpus.read_text().splitlines(), stopwords="en",
                                   show_progress=False), show_progress=False)
    words = bm25s.tokenize(_job_texts(job), stopwords="en", return_ids=False,
                           show_progress=False)
    expected = [retriever.get_scores(query).max() for query in words]
    np.testing.assert_allclose(first, expected, rtol=1e-6)
    for column in ("overlap/pearson", "overlap/spearman", "overlap/low_mode"):
        assert column in result.table and len(result.table[column]) == n_layers
    assert result.summary["overlap/corpus_documents"] == 200


def _job_texts(job) -> list[str]:
    from lw.job.stages import plan_job
    from lw.loading.models import load_tokenizer

    return plan_job(job, load_tokenizer(job.model)).texts


def test_unknown_corpus_names_the_options():
    with pytest.raises(LwError, match="metric.overlap.corpus='wikipedia' is neither a data "
                                      "option .*wiki-vital.* nor a file"):
        corpus_texts("wikipedia")
