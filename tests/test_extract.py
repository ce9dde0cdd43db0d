"""lw.extract on tiny random-init models (tiny-pythia: GPT-NeoX, tiny-mamba: Mamba): the layer
convention of all_layers, padding and batching that leave per-prompt values unchanged, and one
end-to-end check against an unbatched forward pass and the float64 numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import reference as ref
from conftest import compose_job
from lw.job.extract import all_layers, extract, length_batches, pad_batch, skip_leading
from lw.metrics import token_products, token_products_needed, token_values
from lw.metrics.functional.curvature import curvature
from lw.metrics.functional.entropy import prompt_entropy

TEXTS = [
    "The cat sat on the mat.",
    "A much longer sentence about rivers, mountains and the long history of the valley below.",
    "Hello there, world!",
    "Seven words are in this sentence here.",
    "Rain.",
    "Numbers like 3.14159 and 2.71828 show up in many places in mathematics and physics.",
    "Short one again.",
]


def entropy_and_curvature(h: torch.Tensor, mask: torch.Tensor, _ids: torch.Tensor
                          ) -> dict[str, torch.Tensor]:
    values = {f"prompt_entropy/{k}": v for k, v in prompt_entropy(h, mask).items()}
    values["curvature"] = curvature(h, mask)
    return values


METRICS = {"token": entropy_and_curvature}


def encode(loaded, texts=TEXTS) -> list[list[int]]:
    return [loaded.tokenizer(text).input_ids for text in texts]


# Pooled vectors of the same prompts from batches of another shape (batch size, padding) or an
# unbatched pass: float32 matmul kernels block, and so sum, by the batch's shape, so a state
# agrees to a few float32 ulps (eps 1.2e-7) of its layer's magnitude, and so does a mean of
# states; a mean near 0 of states far from it has no relative precision of its own.
# Seen: 5 ulps of the layer's largest value (tiny-mamba alone and together).
POOLED_ULPS = 32


def assert_pooled_close(got, expected, scale=None, what: str = "") -> None:
    """``got`` and ``expected`` (``(..., L+1, D)``) agree to POOLED_ULPS float32 ulps of
    ``scale``: by default each layer's largest ``|expected|``."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if scale is None:
        layer_axis = expected.ndim - 2
        others = tuple(i for i in range(expected.ndim) if i != layer_axis)
        scale = np.abs(expected).max(axis=others, keepdims=True)
    tolerance = np.broadcast_to(POOLED_ULPS * np.finfo(np.float32).eps * scale, got.shape)
    off = np.abs(got - expected)
    worst = np.unravel_index(np.argmax(off / tolerance), off.shape)
    where = [int(i) for i in worst]
    assert off[worst] <= tolerance[worst], (
        f"{what} pooled{where}: {got[worst]} vs {expected[worst]}, off by {off[worst]:.3g} > "
        f"{tolerance[worst]:.3g} ({POOLED_ULPS} float32 ulps of the layer's magnitude)")


def assert_same_values(a, b, rows_a, rows_b, rtol=1e-5, atol=1e-6):
    """Per-prompt values and pooled vectors of prompts rows_a in ``a`` and rows_b in ``b``."""
    assert a.per_prompt.keys() == b.per_prompt.keys()
    for name in a.per_prompt:
        assert_close(a.per_prompt[name][rows_a], b.per_prompt[name][rows_b], rtol=rtol,
                     atol=atol, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
    assert_pooled_close(a.pooled[rows_a], b.pooled[rows_b])


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = True
    return ids, mask


def block_outputs(loaded, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Embedding output and every block's output, caught with forward hooks (independent of
    how Hugging Face assembles ``hidden_states``)."""
    model = loaded.model
    caught: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(
        lambda _m, _i, out: caught.append(out[0] if isinstance(out, tuple) else out))
        for block in model.layers]
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.inference_mode():
        embedded = model.get_input_embeddings()(ids)
    return embedded, caught


# --- batching ---------------------------------------------------------------------------------

def test_length_batches():
    lengths = [5, 9, 5, 3, 9, 9, 5, 1]
    free = length_batches(lengths, 3, equal_lengths=False)
    assert free == [[1, 4, 5], [0, 2, 6], [3, 7]]  # longest first, ties by index
    equal = length_batches(lengths, 2, equal_lengths=True)
    assert sorted(i for batch in equal for i in batch) == list(range(len(lengths)))
    assert all(len(b) <= 2 and len({lengths[i] for i in b}) == 1 for b in equal)
    assert equal == [[1, 4], [5], [0, 2], [6], [3], [7]]


def test_pad_batch_and_skip_leading():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert skip_leading(mask, 1).tolist() == [[False, True, True], [False, False, False]]
    _, left = left_padded([[5, 6, 7], [8, 9]], pad_id=0)
    assert skip_leading(left, 1).tolist() == [[False, True, True], [False, False, True]]


def test_mamba_prompt_values_do_not_depend_on_batch_mates(tiny_mamba):
    """An SSM has no attention mask: extract only batches prompts of equal length, so a prompt's
    values are the same alone or among prompts of other lengths (and of its own length)."""
    prompts = encode(tiny_mamba) + [encode(tiny_mamba, ["The dog sat on the rug."])[0]]
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) < len(lengths) and lengths[-1] == lengths[0]  # a same-length pair
    together = extract(tiny_mamba, prompts, batch_size=8, token_metrics=METRICS)
    for i, prompt in enumerate(prompts):
        alone = extract(tiny_mamba, [prompt], batch_size=8, token_metrics=METRICS)
        assert_same_values(together, alone, [i], [0])
    assert not together.per_prompt["prompt_entropy/raw"].isnan().any()


@torch.inference_mode()
def test_mamba_left_padding_leaks_into_the_state(tiny_mamba):
    """Why extract never pads Mamba: pads in front of a prompt run through the recurrence and
    change its states at every real position after the embedding layer. (Pads behind a prompt
    cannot: the model is causal.) A regression to padded Mamba batches fails the test above."""
    long, short = encode(tiny_mamba, [TEXTS[1], TEXTS[2]])
    alone = all_layers(tiny_mamba, torch.tensor([short]), torch.ones(1, len(short), dtype=bool))
    ids, mask = left_padded([long, short], pad_id=0)
    padded = all_layers(tiny_mamba, ids, mask)[:, 1][:, mask[1]]
    change = (padded - alone[:, 0]).norm(dim=-1) / alone[:, 0].norm(dim=-1)  # (L+1, T)
    assert change[0].max() < 1e-6                          # embeddings: per token
    assert change[1:].amin(dim=0).max() > 1e-2 and change[1:].max() > 0.1  # the recurrence
    ids, mask = pad_batch([long, short], pad_id=0)
    behind = all_layers(tiny_mamba, ids, mask)[:, 1][:, mask[1]]
    assert_close(behind, alone[:, 0], rtol=1e-4, atol=1e-5)


def test_transformer_batch_size_does_not_change_values(tiny_pythia):
    prompts = encode(tiny_pythia)
    one = extract(tiny_pythia, prompts, batch_size=1, token_metrics=METRICS)
    eight = extract(tiny_pythia, prompts, batch_size=8, token_metrics=METRICS)
    three = extract(tiny_pythia, prompts, batch_size=3, token_metrics=METRICS)
    rows = list(range(len(prompts)))
    assert_same_values(one, eight, rows, rows)
    assert_same_values(one, three, rows, rows)


@torch.inference_mode()
def test_transformer_left_and_right_padding_agree(tiny_pythia):
    prompts = encode(tiny_pythia)
    right_ids, right_mask = pad_batch(prompts, pad_id=0)
    left_ids, left_mask = left_padded(prompts, pad_id=0)
    right = all_layers(tiny_pythia, right_ids, right_mask)
    left = all_layers(tiny_pythia, left_ids, left_mask)
    for row in range(len(prompts)):
        assert_close(left[:, row][:, left_mask[row]], right[:, row][:, right_mask[row]],
                     rtol=1e-4, atol=1e-5)
    # The token metrics only see the mask, so they agree across padding sides too.
    for skip in (0, 2):
        a = entropy_and_curvature(left, skip_leading(left_mask, skip), left_ids)
        b = entropy_and_curvature(right, skip_leading(right_mask, skip), right_ids)
        for name in a:
            assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, equal_nan=True)


# --- layer convention and what an extraction holds -------------------------------------------

@pytest.mark.parametrize("name", ["tiny_pythia", "tiny_mamba"])
@torch.inference_mode()
def test_all_layers_is_embedding_then_blocks(name, request):
    """L+1 states: 0 = embedding output, k = block k's output, L = after the final norm."""
    loaded = request.getfixturevalue(name)
    ids = torch.tensor(encode(loaded, TEXTS[:1]))
    states = all_layers(loaded, ids, torch.ones_like(ids, dtype=torch.bool))
    n_layers = loaded.info.n_layers
    assert states.shape == (n_layers + 1, 1, ids.shape[1], loaded.info.hidden_size)
    assert states.dtype == torch.float32
    embedded, blocks = block_outputs(loaded, ids)
    assert len(blocks) == n_layers
    assert_close(states[0], embedded)
    for k in range(1, n_layers):
        assert_close(states[k], blocks[k - 1], msg=f"layer {k}")
    final_norm = loaded.model.norm_f if name == "tiny_mamba" else loaded.model.final_layer_norm
    assert_close(states[n_layers], final_norm(blocks[-1]))
    assert_close(states[n_layers], loaded.model(input_ids=ids).last_hidden_state)
    assert loaded.info.last_state_after_final_norm


def test_extraction_shapes_and_diagnostics(tiny_pythia):
    prompts = encode(tiny_pythia)
    n, states, width = len(prompts), tiny_pythia.info.n_layers + 1, tiny_pythia.info.hidden_size
    out = extract(tiny_pythia, prompts, batch_size=4, skip_first=1, token_metrics=METRICS)
    assert out.pooled.shape == (n, states, width) and out.pooled.dtype == torch.float32
    assert out.n_tokens.tolist() == [len(p) for p in prompts]
    expected = {"token_norm/max_over_median", "token_norm/argmax_position", "curvature",
                *(f"prompt_entropy/{k}" for k in ("raw", "max", "logN", "logD"))}
    assert set(out.per_prompt) == expected
    for name, values in out.per_prompt.items():
        assert values.shape == (n, states) and values.dtype == torch.float64, name
    ratio = out.per_prompt["token_norm/max_over_median"]
    assert (ratio >= 1).all()
    position = out.per_prompt["token_norm/argmax_position"]
    assert ((position >= 0) & (position < out.n_tokens[:, None])).all()
    assert (position == position.round()).all()
    short = out.n_tokens.argmin()
    assert out.n_tokens[short] == 2  # "Rain." : one token after skip_first, entropy undefined
    assert out.per_prompt["prompt_entropy/raw"][short].isnan().all()
    assert not out.per_prompt["prompt_entropy/raw"][out.n_tokens > 2].isnan().any()


# --- against an independent computation ------------------------------------------------------

@pytest.mark.parametrize("skip_first", [0, 2])
def test_tiny_pythia_matches_unbatched_numpy_reference(tiny_pythia, skip_first):
    """extract (batched, padded, registry metrics) vs a plain unbatched forward pass per prompt
    and tests/reference.py in float64."""
    job = compose_job(["model=tiny-pythia", "metrics=[prompt_entropy,curvature]"])
    prompts = [p for p in encode(tiny_pythia) if len(p) > skip_first + 2]
    out = extract(tiny_pythia, prompts, batch_size=8, skip_first=skip_first,
                  token_metrics=token_products(token_products_needed(job)))
    rows = torch.tensor([len(p) - skip_first for p in prompts])
    out.per_prompt.update(token_values(job, out.per_prompt, rows, tiny_pythia.info.hidden_size))
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            hidden = tiny_pythia.model(input_ids=torch.tensor([prompt]),
                                       output_hidden_states=True).hidden_states
        assert len(hidden) == tiny_pythia.info.n_layers + 1
        for layer, h in enumerate(hidden):
            rows = h[0, skip_first:].double().numpy()
            z = ref.prep(rows)
            expected = ref.normalized(ref.entropy(z, alpha=1.0), len(rows), rows.shape[1])
            for norm, value in expected.items():
                got = float(out.per_prompt[f"prompt_entropy/{norm}"][i, layer])
                assert math.isclose(got, value, rel_tol=1e-5), (i, layer, norm, got, value)
            got = float(out.per_prompt["curvature"][i, layer])
            assert math.isclose(got, ref.curvature(z), rel_tol=1e-5, abs_tol=1e-7)
            assert_pooled_close(out.pooled[i, layer], rows.mean(axis=0),
                                scale=np.abs(rows).max(), what=f"prompt {i} layer {layer}")
