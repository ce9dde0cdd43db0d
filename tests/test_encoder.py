"""lw.encoder on the random tiny-pythia: one forward pass serves every layer, the vectors equal an
unbatched Hugging Face forward pass, and run_mteb fails fast and clearly without the hub."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import lw.loading.hub
from conftest import load_option
from lw.errors import LwError
from lw.job.encoder import PAPER_TASKS, PAPER_TASKS_BY_TYPE, LayerwiseEncoder, run_mteb

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Hello",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Paris is the capital of France.",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "She sells sea shells by the sea shore.",
    "Why?",
    "The mitochondria is the powerhouse of the cell, or so the textbooks say.",
    "Rain again today.",
]


@pytest.fixture(scope="module")
def loaded():
    return load_option("tiny-pythia", seed=0)


@pytest.fixture
def hub_unreachable(monkeypatch):
    """lw's hub probe fails as on a machine without internet: a closed local port."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    lw.loading.hub.hub_reachable.cache_clear()
    yield
    lw.loading.hub.hub_reachable.cache_clear()


def hf_means(loaded, text: str, skip_first: int = 0) -> torch.Tensor:
    """Independent reference (L+1, D): one sentence, no padding, mean over its tokens."""
    batch = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=True)
    with torch.no_grad():
        out = loaded.model(**batch, output_hidden_states=True)
    return torch.stack([h[0, skip_first:].float().mean(0) for h in out.hidden_states])


def test_all_layers_cost_one_pass(loaded):
    encoder = LayerwiseEncoder(loaded, batch_size=4)
    n_states = loaded.info.n_layers + 1
    everything = encoder.encode_all_layers(SENTENCES)
    assert everything.shape == (10, n_states, loaded.info.hidden_size)
    assert everything.dtype == torch.float32 and torch.isfinite(everything).all()
    assert (encoder.passes, encoder.forward_batches, encoder.encoded_sentences) == (1, 3, 10)
    for k in range(n_states):
        vectors = encoder.for_layer(k).encode(SENTENCES, task_metadata=None, batch_size=32)
        assert isinstance(vectors, np.ndarray) and vectors.shape == (10, loaded.info.hidden_size)
        np.testing.assert_array_equal(vectors, everything[:, k].numpy())
    assert (encoder.passes, encoder.forward_batches, encoder.encoded_sentences) == (1, 3, 10)
    # A second call, repeated sentences: still no new forward pass.
    again = encoder.encode_all_layers(SENTENCES[::-1] + SENTENCES[:3])
    torch.testing.assert_close(again[:10], everything.flip(0), rtol=0, atol=0)
    assert (encoder.passes, encoder.encoded_sentences) == (1, 10)


def test_layers_fill_the_cache_for_each_other(loaded):
    """Asking for one layer first computes all of them: the other layers are then free."""
    encoder = LayerwiseEncoder(loaded, batch_size=8)
    last = encoder.for_layer(-1)
    assert last.layer == loaded.info.n_layers
    first = last.encode(SENTENCES[:6])
    assert (encoder.passes, encoder.encoded_sentences) == (1, 6)
    # mteb 2.x hands encode a DataLoader of {"text": [...]} batches.
    batches = [{"text": SENTENCES[:4]}, {"text": SENTENCES[4:]}]
    middle = encoder.for_layer(2).encode(batches)
    assert (encoder.passes, encoder.encoded_sentences) == (2, 10)   # only the 4 new ones
    reference = LayerwiseEncoder(loaded, batch_size=3).encode_all_layers(SENTENCES)
    np.testing.assert_allclose(first, reference[:6, -1].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(middle, reference[:, 2].numpy(), rtol=1e-5, atol=1e-5)
    assert len(encoder) == 10
    encoder.clear()
    assert len(encoder) == 0
    with pytest.raises(LwError, match="layer 7 out of range.*0..6"):
        encoder.for_layer(7)


def test_vectors_equal_an_unbatched_hf_forward(loaded):
    encoder = LayerwiseEncoder(loaded, batch_size=4)
    everything = encoder.encode_all_layers(SENTENCES)
    for i, text in enumerate(SENTENCES):
        torch.testing.assert_close(everything[i], hf_means(loaded, text), rtol=1e-4, atol=1e-5)
    skipping = LayerwiseEncoder(loaded, batch_size=4, skip_first=1)
    vectors = skipping.for_layer(3).encode(SENTENCES[:2])
    for i in range(2):
        np.testing.assert_allclose(vectors[i], hf_means(loaded, SENTENCES[i], 1)[3].numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_cosine_similarity(loaded):
    view = LayerwiseEncoder(loaded).for_layer(1)
    a, b = view.encode(SENTENCES[:3]), view.encode(SENTENCES[3:6])
    unit_a = a / np.linalg.norm(a, axis=1, keepdims=True)
    unit_b = b / np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(view.similarity(a, b).numpy(), unit_a @ unit_b.T, atol=1e-5)
    np.testing.assert_allclose(view.similarity_pairwise(a, b).numpy(),
                               (unit_a * unit_b).sum(1), atol=1e-5)


def test_paper_tasks():
    assert len(PAPER_TASKS) == 32 == len(set(PAPER_TASKS))
    assert {k: len(v) for k, v in PAPER_TASKS_BY_TYPE.items()} == {
        "Classification": 10, "Clustering": 6, "PairClassification": 3, "Reranking": 4,
        "STS": 9}
    assert not any("P2P" in name or "Retrieval" in name for name in PAPER_TASKS)


def test_run_mteb_without_hub_fails_fast(loaded, hub_unreachable):
    encoder = LayerwiseEncoder(loaded)
    with pytest.raises(LwError, match=r"MTEB tasks Banking77Classification, STS12 .*"
                                      r"Hugging Face hub.*unreachable"):
        run_mteb(encoder, ["Banking77Classification", "STS12"], layers=[0], output_folder="x")
    assert encoder.passes == 0


def test_run_mteb_without_mteb_says_how_to_install(loaded, monkeypatch):
    # mteb is an optional extra: as if it were not installed (None in sys.modules fails import)
    monkeypatch.setitem(sys.modules, "mteb", None)
    with pytest.raises(LwError, match=r"pip install '\.\[mteb\]'"):
        run_mteb(LayerwiseEncoder(loaded), [], output_folder="x")


def test_run_mteb_on_mteb_local_tasks(loaded, tmp_path):
    """The real mteb call path, on mteb's own tiny in-memory tasks (no hub)."""
    from mteb.mocks.mock_tasks.classification import MockClassificationTask
    from mteb.mocks.mock_tasks.clustering import MockClusteringTask
    from mteb.models.models_protocols import EncoderProtocol

    encoder = LayerwiseEncoder(loaded, batch_size=4)
    assert isinstance(encoder.for_layer(0), EncoderProtocol)
    tasks = [MockClassificationTask(), MockClusteringTask()]
    frame = run_mteb(encoder, tasks, layers=[0, 3, -1], output_folder=tmp_path)
    n_states = loaded.info.n_layers + 1
    assert list(frame.columns) == ["task", "layer", "main_score"]
    assert list(frame["task"]) == ["MockClassificationTask"] * 3 + ["MockClusteringTask"] * 3
    assert list(frame["layer"]) == [0, 3, n_states - 1] * 2
    assert frame["main_score"].between(0, 1).all()
    # Later layers read what layer 0 computed: as many passes as for layer 0 alone.
    alone = LayerwiseEncoder(loaded, batch_size=4)
    run_mteb(alone, [MockClassificationTask(), MockClusteringTask()], layers=[0],
             output_folder=tmp_path / "alone")
    assert encoder.passes == alone.passes and encoder.encoded_sentences == alone.encoded_sentences
    # Results already in output_folder are read back, not recomputed.
    before = encoder.passes
    again = run_mteb(encoder, [MockClassificationTask()], layers=[-1], output_folder=tmp_path)
    assert encoder.passes == before and list(again["layer"]) == [n_states - 1]
    expected = frame[(frame["task"] == "MockClassificationTask")
                     & (frame["layer"] == n_states - 1)]["main_score"].item()
    assert again["main_score"].item() == pytest.approx(expected)


def test_empty_text_gets_a_finite_vector(loaded):
    encoder = LayerwiseEncoder(loaded)
    vectors = encoder.encode_all_layers(["", "Hello"])
    assert torch.isfinite(vectors).all()
    assert encoder.encode_all_layers([]).shape == (0, loaded.info.n_layers + 1,
                                                   loaded.info.hidden_size)
