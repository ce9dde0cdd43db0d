"""Training-set overlap (the papers' Appendix A): how much of each prompt a reference corpus
holds, by BM25, and how that tracks prompt entropy layer by layer, within each entropy mode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lw.errors import check
from lw.metrics.functional.correlation import correlations
from lw.metrics.registry import Metric, Output

BIMODAL_P = 0.05  # dip test p-value below which a layer's entropies count as two modes


def bm25_overlap(prompts: Sequence[str], corpus: Sequence[str], k: int = 1, k1: float = 1.5,
                 b: float = 0.75) -> Tensor:
    """Each prompt's BM25 overlap with ``corpus``: the mean score of its ``k`` best documents.

    Both sides are tokenized by bm25s (lower-cased words of 2+ characters, English stopwords
    out); scores are bm25s' Lucene BM25 with ``k1`` and ``b``, the prompt as the query.

    Returns:
        ``(N,)`` float64; 0 for a prompt sharing no word with the corpus.
    """
    import bm25s

    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(bm25s.tokenize(list(corpus), stopwords="en", show_progress=False),
                    show_progress=False)
    queries = bm25s.tokenize(list(prompts), stopwords="en", show_progress=False)
    _, scores = retriever.retrieve(queries, k=min(k, len(corpus)), show_progress=False)
    return torch.from_numpy(np.asarray(scores, dtype=np.float64).mean(axis=1))


def low_mode(values: Tensor) -> Tensor:
    """Split each column of ``values`` ``(N, L)`` into two modes at the threshold minimising the
    within-mode sum of squares (1-D 2-means, exact: every split of the sorted values tried).

    Returns:
        ``(N, L)`` bool, True for values in the lower mode.
    """
    v, _ = values.double().sort(dim=0)                                          # (N, L)
    n = v.shape[0]
    s1, s2 = v.cumsum(0), v.square().cumsum(0)
    size = torch.arange(1, n, dtype=torch.float64).unsqueeze(1)                 # (N-1, 1)
    low = s2[:-1] - s1[:-1].square() / size
    high = (s2[-1] - s2[:-1]) - (s1[-1] - s1[:-1]).square() / (n - size)
    split = (low + high).argmin(dim=0)                                          # (L,)
    threshold = v.gather(0, split.unsqueeze(0))                                 # (1, L)
    return values.double() <= threshold


def overlap_by_layer(overlap: Tensor, entropy: Tensor, dip_pvalue: Tensor) -> dict[str, Tensor]:
    """How overlap tracks prompt entropy, per layer.

    Args:
        overlap: ``(N,)`` per-prompt BM25 overlap.
        entropy: ``(N, L+1)`` per-prompt prompt entropy.
        dip_pvalue: ``(L+1,)`` the dip test's p-value of each layer's entropies.

    Returns:
        ``pearson``, ``spearman`` (+ ``_pvalue``) across prompts; and where the dip test says
        bimodal (p < 0.05), the mean overlap of the prompts in the ``low_mode`` and
        ``high_mode`` of entropy and the low mode's share of prompts (NaN elsewhere): each
        ``(L+1,)`` float64.
    """
    overlap = overlap.double()
    values = correlations(entropy.double().T, overlap.unsqueeze(0))
    low = low_mode(entropy).double()                                            # (N, L+1)
    bimodal = dip_pvalue.double() < BIMODAL_P
    low_mean = (overlap @ low) / low.sum(0)
    high_mean = (overlap @ (1 - low)) / (1 - low).sum(0)
    nan = torch.tensor(torch.nan, dtype=torch.float64)
    values["low_mode"] = torch.where(bimodal, low_mean, nan)
    values["high_mode"] = torch.where(bimodal, high_mean, nan)
    values["low_mode_share"] = torch.where(bimodal, low.mean(0), nan)
    return values


@dataclass
class OverlapKnobs:
    corpus: str = "wiki-vital"       # a data option (conf/data/<name>.yaml) or a file path
    text_field: str = "text"         # the corpus file's text column (a file path only)
    k: int = 1                       # overlap = mean BM25 score of the k best documents
    k1: float = 1.5                  # BM25 term-frequency saturation
    b: float = 0.75                  # BM25 length normalization

    def __post_init__(self) -> None:
        check(self.k >= 1, f"metric.overlap.k={self.k}: must be >= 1")
        check(self.k1 > 0, f"metric.overlap.k1={self.k1}: must be > 0")
        check(0 <= self.b <= 1, f"metric.overlap.b={self.b}: must lie in [0, 1]")


def _compute(inputs) -> Output:
    """Each prompt's BM25 overlap with the corpus and, per layer, how it tracks prompt entropy
    (correlations; mean overlap per entropy mode where the dip test says bimodal)."""
    from lw.metrics.prompt_entropy import headline

    o = inputs.knobs
    corpus = inputs.corpus(o.corpus, o.text_field)
    overlap = bm25_overlap(inputs.texts, corpus, k=o.k, k1=o.k1, b=o.b)
    entropy = inputs.values[headline(inputs.job)]
    # the dip metric's p-values (it runs first: overlap uses it), not a second dip test
    per_layer = overlap_by_layer(overlap, entropy, inputs.per_layer["dip/pvalue"])
    return Output(per_layer={f"overlap/{k}": v for k, v in per_layer.items()},
                  columns={"overlap/bm25": overlap},
                  summary={"overlap/mean": float(overlap.mean()),
                           "overlap/median": float(overlap.median()),
                           "overlap/corpus_documents": float(len(corpus))})


METRIC = Metric(
    name="overlap", compute=_compute, needs=("tokens", "corpus"), knobs=OverlapKnobs,
    uses=("prompt_entropy", "dip"), logs={"overlap/": None},
    description="BM25 overlap of each prompt with a corpus, against prompt entropy")
