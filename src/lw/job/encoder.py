"""An MTEB encoder for every layer at once: one forward pass per batch gives all L+1 layers.

:class:`LayerwiseEncoder` mean-pools every layer's hidden states (``lw.extract.extract``, the
same pooling as the metrics) and keeps them by sentence, so evaluating a task on all L+1 layers
runs the model once over its sentences, not L+1 times. ``encoder.for_layer(k)`` is the object
MTEB evaluates: its ``encode`` reads layer k from the cache and computes (all layers of) only
the sentences not seen yet.

The cache holds ``sentences x (L+1) x D`` float32 values (4 bytes each): for a 7B model (33 x
4096) that is about 0.5 MB per sentence, so :func:`run_mteb` runs one task at a time over all
layers and clears the cache between tasks.

MTEB (optional: ``pip install '.[mteb]'``) is written against mteb 2.x (checked with 2.26.24):
``mteb.evaluate(model, task, ...)`` calls ``model.encode(DataLoader of {"text": [...]} batches,
task_metadata=..., hf_split=..., hf_subset=..., prompt_type=..., **encode_kwargs)`` and reads
``model.mteb_model_meta``, ``model.similarity``, ``model.similarity_pairwise``. ``encode`` also
takes a plain list of strings (the mteb 1.x and sentence-transformers convention).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lw.errors import LwError
from lw.job.extract import extract, length_batches
from lw.loading.hub import hub_reachable
from lw.loading.models import LoadedModel
from lw.loading.prompts import tokenize

# The 32 English MTEB tasks of "Layer by Layer: Uncovering Hidden Representations in Language
# Models" (Skean et al., ICML 2025) and "Does Representation Matter?" (Skean et al., 2024). The
# authors' harness (OFSkean/information_flow, MTEB-Harness.py) takes the MTEB(eng) benchmark
# (mteb 1.x, languages=["eng"]) and drops the Retrieval tasks and the tasks of category "p2p"
# (the five *ClusteringP2P, AmazonPolarity, Imdb, STS22, SummEval): 56 - 15 - 9 = 32.
PAPER_TASKS_BY_TYPE: dict[str, list[str]] = {
    "Classification": [
        "AmazonCounterfactualClassification", "AmazonReviewsClassification",
        "Banking77Classification", "EmotionClassification", "MTOPDomainClassification",
        "MTOPIntentClassification", "MassiveIntentClassification",
        "MassiveScenarioClassification", "ToxicConversationsClassification",
        "TweetSentimentExtractionClassification",
    ],
    "Clustering": [
        "ArxivClusteringS2S", "BiorxivClusteringS2S", "MedrxivClusteringS2S", "RedditClustering",
        "StackExchangeClustering", "TwentyNewsgroupsClustering",
    ],
    "PairClassification": ["SprintDuplicateQuestions", "TwitterSemEval2015", "TwitterURLCorpus"],
    "Reranking": [
        "AskUbuntuDupQuestions", "MindSmallReranking", "SciDocsRR", "StackOverflowDupQuestions",
    ],
    "STS": [
        "BIOSSES", "SICK-R", "STS12", "STS13", "STS14", "STS15", "STS16", "STS17", "STSBenchmark",
    ],
}
PAPER_TASKS: list[str] = [name for names in PAPER_TASKS_BY_TYPE.values() for name in names]
MTEB_INSTALL = "pip install '.[mteb]'"


class LayerwiseEncoder:
    """Mean-pooled vectors of every layer, one forward pass per batch, cached by sentence.

    Args:
        loaded: the model, its tokenizer and info (:func:`lw.models.load_model`).
        batch_size: prompts per forward pass.
        max_tokens: tokens kept per sentence (special tokens included), as ``data.max_tokens``.
        skip_first: leading real tokens left out of the mean, as for the metrics.
        device: where the forward pass runs (default: where the model is).
        pooling: mean | last | first, as ``extraction.pooling``.
        identity: what the embeddings depend on (``lw.identity.embedding_hash``: weights,
            dtype, adapters, bidirectional, pooling...), part of the MTEB result cache's key,
            so that results of another model state are never read back.

    Attributes:
        passes: calls of :func:`lw.extract.extract` (one per batch of new sentences).
        forward_batches: model forward calls. encoded_sentences: sentences that went through
            the model. A sentence is encoded at most once, whatever the layers asked for.
    """

    def __init__(self, loaded: LoadedModel, batch_size: int = 8, max_tokens: int = 512,
                 skip_first: int = 0, device: torch.device | str | None = None,
                 pooling: str = "mean", identity: str = "") -> None:
        self.loaded = loaded
        self.pooling = pooling
        self.identity = identity
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.skip_first = skip_first
        self.device = torch.device(device) if device is not None else None
        self.passes = 0
        self.forward_batches = 0
        self.encoded_sentences = 0
        self._cache: dict[str, Tensor] = {}      # sentence -> (L+1, D) float32, CPU

    @property
    def n_states(self) -> int:
        """L+1: the embedding output and every block's output."""
        return self.loaded.info.n_layers + 1

    def __len__(self) -> int:
        """Sentences in the cache."""
        return len(self._cache)

    def clear(self) -> None:
        """Empty the cache (the counters are kept)."""
        self._cache.clear()

    def _fill(self, sentences: Sequence[str]) -> None:
        """All layers of the sentences not in the cache yet, in one pass."""
        missing = list(dict.fromkeys(s for s in sentences if s not in self._cache))
        if not missing:
            return
        tokenizer = self.loaded.tokenizer
        ids = tokenize(tokenizer, missing, self.max_tokens)
        # An empty text has no token (no BOS in most decoders): its mean would be 0/0.
        filler = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                   tokenizer.pad_token_id) if t is not None), 0)
        ids = [p if p else [int(filler)] for p in ids]
        out = extract(self.loaded, ids, batch_size=self.batch_size, skip_first=self.skip_first,
                      device=self.device, pooling=self.pooling, desc="sentences")
        self.passes += 1
        self.forward_batches += len(length_batches(
            [len(p) for p in ids], self.batch_size,
            equal_lengths=self.loaded.info.family == "ssm"))
        self.encoded_sentences += len(missing)
        for sentence, row in zip(missing, out.pooled, strict=True):
            self._cache[sentence] = row

    def encode_all_layers(self, sentences: Sequence[str]) -> Tensor:
        """``(N, L+1, D)`` float32 (CPU): the mean over tokens of each layer's hidden states."""
        sentences = _as_texts(sentences)
        self._fill(sentences)
        if not sentences:
            return torch.empty((0, self.n_states, self.loaded.info.hidden_size))
        return torch.stack([self._cache[s] for s in sentences])

    def encode_layer(self, sentences: Sequence[str], layer: int) -> Tensor:
        """``(N, D)`` float32: layer ``layer`` of :meth:`encode_all_layers`, without the rest."""
        layer = self._layer_index(layer)
        sentences = _as_texts(sentences)
        self._fill(sentences)
        if not sentences:
            return torch.empty((0, self.loaded.info.hidden_size))
        return torch.stack([self._cache[s][layer] for s in sentences])

    def for_layer(self, layer: int) -> LayerEncoder:
        """The MTEB model for one layer (negative counts from the last), sharing this cache."""
        return LayerEncoder(self, self._layer_index(layer))

    def _layer_index(self, layer: int) -> int:
        if not -self.n_states <= layer < self.n_states:
            raise LwError(f"layer {layer} out of range: model {self.loaded.info.name} has "
                          f"layers 0..{self.n_states - 1} (0 = embeddings)")
        return layer % self.n_states


class LayerEncoder:
    """One layer of a :class:`LayerwiseEncoder`, with the interface MTEB calls on a model."""

    def __init__(self, parent: LayerwiseEncoder, layer: int) -> None:
        self.parent = parent
        self.layer = layer

    def encode(self, inputs: Any, **kwargs: Any) -> np.ndarray:
        """``(N, D)`` float32 numpy: this layer's pooled vector of each input text.

        ``inputs``: a list of strings, or an iterable of batches ``{"text": [...]}`` (mteb
        2.x's DataLoader). Keyword arguments (task_metadata, hf_split, prompt_type, batch_size,
        ...) are accepted and ignored: no instruction or prompt is added to the texts.
        """
        return self.parent.encode_layer(_as_texts(inputs), self.layer).numpy()

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Tensor:
        """``(N1, N2)`` cosine similarities."""
        a, b = _unit_rows(embeddings1), _unit_rows(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Tensor:
        """``(N,)`` cosine similarity of each pair of rows."""
        return (_unit_rows(embeddings1) * _unit_rows(embeddings2)).sum(-1)

    @property
    def mteb_model_meta(self) -> Any:
        """mteb's ModelMeta naming this layer (``lw/<model>-layer<k>``), None without mteb."""
        try:
            from mteb.models.model_meta import ModelMeta, ScoringFunction
        except ImportError:
            return None
        info, parent = self.parent.loaded.info, self.parent
        return ModelMeta.create_empty(overwrites={
            "name": f"lw/{info.name}-layer{self.layer}",
            "revision": info.revision,
            "embed_dim": info.hidden_size,
            "max_tokens": parent.max_tokens,
            "similarity_fn_name": ScoringFunction.COSINE,
            "framework": ["PyTorch"],
            "reference": f"https://huggingface.co/{info.id}" if info.id else None,
            "experiment_kwargs": {"max_tokens": parent.max_tokens,
                                  "skip_first": parent.skip_first,
                                  **({"pooling": parent.pooling}
                                     if parent.pooling != "mean" else {}),
                                  **({"lw": parent.identity} if parent.identity else {})},
        })


def _as_texts(inputs: Any) -> list[str]:
    if isinstance(inputs, str):
        return [inputs]
    texts: list[str] = []
    for item in inputs:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and "text" in item:
            texts.extend(str(t) for t in item["text"])
        else:
            raise LwError(f"cannot encode {type(item).__name__} inputs: expected strings or "
                          "batches {'text': [...]}")
    return texts


def _unit_rows(x: Any) -> Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()
    x = x.unsqueeze(0) if x.ndim == 1 else x
    return torch.nn.functional.normalize(x, dim=-1)


def _hf_offline_set() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def run_mteb(encoder: LayerwiseEncoder, tasks: Sequence[Any],
             layers: Iterable[int] | None = None, output_folder: str | Path = "mteb-results",
             *, eval_splits: Sequence[str] = ("test",), languages: Sequence[str] = ("eng",),
             overwrite: bool = False) -> pd.DataFrame:
    """MTEB main scores of every (task, layer), one forward pass per task's sentences.

    Tasks run one after the other; for each, every layer in ``layers`` is evaluated through
    :meth:`LayerwiseEncoder.for_layer` (the first layer computes all layers, the others read the
    cache), then the cache is cleared. Results go to the mteb ResultCache in ``output_folder``
    (``results/lw__<model>-layer<k>/<revision>/experiments/max_tokens_<n>__skip_first_<k>
    [__pooling_<p>]__lw_<embedding hash>/``,
    one JSON per task); with ``overwrite=False`` a (task, layer)
    already there is read back, not recomputed.

    Args:
        encoder: the layerwise encoder of the model.
        tasks: MTEB task names (e.g. :data:`PAPER_TASKS`; loaded from the Hugging Face hub), or
            mteb task objects (used as they are).
        layers: layer indices (default: all L+1).
        eval_splits, languages: restrict named tasks to these splits and languages (ISO 639-3);
            multilingual tasks keep their subsets in these languages.
        overwrite: recompute results already in ``output_folder``.

    Returns:
        Long rows ``task, layer, main_score`` (``layer`` in 0..L): the task's main score, as
        its metadata names it (accuracy, v_measure, max_ap, map_at_1000, cosine_spearman, ...),
        averaged over the evaluated splits and subsets, on mteb's scale (fractions, not %).

    Raises:
        LwError: mteb is not installed, or named tasks need the hub and it is unreachable
            (with HF_HUB_OFFLINE set, datasets already in the local cache are tried).
    """
    all_layers = range(encoder.n_states)
    layers = [encoder.for_layer(k).layer for k in (all_layers if layers is None else layers)]
    names = [t for t in tasks if isinstance(t, str)]
    if names and not _hf_offline_set() and not hub_reachable():
        raise LwError(
            f"MTEB tasks {', '.join(names)} load their data sets from the Hugging Face hub, "
            "which is unreachable from this machine (no connection within 3 s). Run where the "
            "hub is reachable, or set HF_HUB_OFFLINE=1 if the data sets are already cached.")
    try:
        import mteb
    except ImportError:
        raise LwError(f"MTEB evaluation needs the mteb package: {MTEB_INSTALL}") from None
    if not hasattr(mteb, "evaluate"):
        raise LwError(f"mteb {getattr(mteb, '__version__', '?')} is too old: lw needs mteb "
                      f">= 2 ({MTEB_INSTALL})")
    cache = mteb.ResultCache(Path(output_folder))
    rows = []
    for task in tasks:
        if isinstance(task, str):
            try:
                task = mteb.get_task(task, languages=list(languages),
                                     eval_splits=list(eval_splits))
            except (KeyError, ValueError) as error:
                raise LwError(f"MTEB task {task!r} (languages {', '.join(languages)}, splits "
                              f"{', '.join(eval_splits)}; mteb {mteb.__version__}): "
                              f"{error.args[0] if error.args else error}") from None
        preloaded = task.data_loaded
        if not preloaded:  # once for all layers: mteb would reload it for each
            task.load_data()
        try:
            for layer in layers:
                model = encoder.for_layer(layer)
                result = mteb.evaluate(
                    model, task, cache=cache, co2_tracker=False,
                    encode_kwargs={"batch_size": encoder.batch_size},
                    overwrite_strategy="always" if overwrite else "only-missing",
                    show_progress_bar=False)
                for task_result in result.task_results:
                    rows.append({"task": task_result.task_name, "layer": model.layer,
                                 "main_score": float(task_result.get_score())})
        finally:
            encoder.clear()
            if not preloaded:
                task.unload_data()
    return pd.DataFrame(rows, columns=["task", "layer", "main_score"])


def job_mteb_scores(job, loaded: LoadedModel, device, tasks: list[str],
                    output_folder: str | None) -> pd.DataFrame:
    """What the ``mteb`` metric gets as ``inputs.mteb``: :func:`run_mteb` over the job's model
    with its batch size, prompt length, pooling and ``skip_first``; results reused per layer
    under ``output_folder`` (None: <project>/mteb-results)."""
    from lw.job.identity import embedding_hash

    encoder = LayerwiseEncoder(loaded, batch_size=job.extraction.batch_size,
                               max_tokens=job.data.max_tokens,
                               skip_first=job.extraction.skip_first, device=device,
                               pooling=job.extraction.pooling, identity=embedding_hash(job))
    return run_mteb(encoder, tasks, output_folder=output_folder or Path.cwd() / "mteb-results")
