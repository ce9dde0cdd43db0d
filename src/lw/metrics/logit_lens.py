"""logit_lens (causal LMs): every layer's token states read as next-token predictions, through
the model's final norm and output embedding (nostalgebraist 2020; tuned-lens is the trained
variant).

For state l of token t (a predicted token: t and t+1 real, t after ``extraction.skip_first``),
``p_l = softmax(W norm(h_l))`` with W (V, D) the output embedding and norm the model's final
norm (not applied again to state L when the architecture's last state is already after it).
Per layer, averaged over every predicted token of every prompt (token-weighted):

    logit_lens/ce    = -log p_l[x_{t+1}]                      (nats; layer L: the model's loss)
    logit_lens/kl    = KL(p_L || p_l) = sum_v p_L (log p_L - log p_l)    (layer L: 0)
    logit_lens/top1  = share of tokens with argmax p_l = argmax p_L      (layer L: 1)

Computed inside the forward pass, batch by batch and in chunks of predicted tokens with all
layers at once: at most ``CHUNK_ELEMENTS`` logits are alive (no N x T x V tensor); its products
(per-prompt means and counts) are cached like the others. Cost: (L+1) x tokens x V x D
multiply-adds on top of the forward pass (the vocabulary projection of every layer).

The token ids are not among the forward pass's products: they are read back from state 0,
which is the input embedding of the ids for every causal architecture lw registers (checked:
a mismatch fails naming the model).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lw.errors import LwError, check
from lw.metrics.registry import Metric, Output

CHUNK_ELEMENTS = 2**25               # logits alive at once: (L+1) x tokens x V float32, 128 MB
FINAL_NORMS = ("norm", "final_layer_norm", "norm_f", "ln_f")  # attribute of the base model
SERIES = ("ce", "kl", "top1")


def lens_products(hidden: Tensor, kept: Tensor, ids: Tensor, norm, head: Tensor,
                  last_normed: bool, chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, Tensor]:
    """Per prompt and layer, the mean logit-lens CE, KL and top-1 agreement, and the count.

    Args:
        hidden: ``(L+1, B, T, D)`` token states; kept: ``(B, T)`` bool, the tokens that may
            predict (real, after skip_first); ids: ``(B, T)`` the token ids.
        norm: the final norm (a module or function on ``(..., D)``); head: ``(V, D)``.
        last_normed: state L is already after the final norm (do not apply it again).

    Returns:
        ``{logit_lens/ce, logit_lens/kl, logit_lens/top1, logit_lens/n: (L+1, B)}`` (float64;
        NaN means for prompts with no predicted token).
    """
    states, batch = hidden.shape[:2]
    predicts = kept[:, :-1] & kept[:, 1:]                                  # (B, T-1)
    rows, cols = predicts.nonzero(as_tuple=True)
    targets = ids[rows, cols + 1]
    sums = torch.zeros((len(SERIES), states, batch), dtype=torch.float64, device=hidden.device)
    step = max(1, chunk_elements // (states * head.shape[0]))
    for start in range(0, len(rows), step):
        r, c = rows[start:start + step], cols[start:start + step]
        x = hidden[:, r, c]                                                 # (L+1, P, D)
        normed = norm(x) if not last_normed else torch.cat([norm(x[:-1]), x[-1:]])
        logp = torch.log_softmax(normed.float() @ head.T, dim=-1)          # (L+1, P, V)
        ce = -logp.gather(-1, targets[start:start + step].expand(states, -1).unsqueeze(-1))
        final = logp[-1]
        kl = (final.exp() * (final - logp)).sum(dim=-1)
        top1 = logp.argmax(dim=-1) == final.argmax(dim=-1)
        values = torch.stack([ce.squeeze(-1), kl, top1.float()]).double()  # (3, L+1, P)
        sums.index_add_(2, r, values)
    count = predicts.sum(dim=1).double().expand(states, -1)                 # (L+1, B)
    means = sums / count
    out = {f"logit_lens/{name}": means[i] for i, name in enumerate(SERIES)}
    out["logit_lens/n"] = count.clone()
    return out


def token_ids(state0: Tensor, embedding: Tensor, what: str) -> Tensor:
    """``(B, T)`` the ids whose input embeddings (``(V, D)``) state 0 ``(B, T, D)`` holds."""
    weight = embedding.float()
    flat = state0.reshape(-1, state0.shape[-1]).float()
    step = max(1, CHUNK_ELEMENTS // weight.shape[0])
    half_sq = 0.5 * (weight * weight).sum(dim=1)
    ids = torch.cat([(flat[i:i + step] @ weight.T - half_sq).argmax(dim=1)
                     for i in range(0, len(flat), step)])
    if not torch.allclose(weight[ids], flat, rtol=1e-4, atol=1e-5):
        raise LwError(f"logit_lens: {what}'s layer 0 is not its input embedding of the ids, "
                      "so the next tokens cannot be read from it")
    return ids.view(state0.shape[:-1])


def _final_norm(model):
    for name in FINAL_NORMS:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise LwError(f"logit_lens: no final norm ({', '.join(FINAL_NORMS)}) on "
                  f"{type(model).__name__}")


def _token_fn(job, loaded, wanted: list[str]):
    from lw.answers import output_embedding

    model = loaded.model
    module = _final_norm(model)
    dtype = next(module.parameters()).dtype
    embedding = model.get_input_embeddings().weight.detach()
    head = output_embedding(model)

    def batch_products(hidden: Tensor, kept: Tensor) -> dict[str, Tensor]:
        device = hidden.device
        ids = token_ids(hidden[0], embedding.to(device), loaded.info.name)
        weights = head.to(device=device, dtype=torch.float32)
        return lens_products(hidden, kept.to(device), ids,
                             lambda x: module(x.to(dtype)).float(), weights,
                             loaded.info.last_state_after_final_norm)

    return batch_products


def _check(job) -> None:
    check(job.model.family != "encoder",
          f"metrics logit_lens needs a causal LM (model.family decoder or ssm), not "
          f"model={job.model.name} (family {job.model.family})")


def _compute(inputs) -> Output:
    count = inputs.products["logit_lens/n"]                                 # (N, L+1)
    total = count.sum(dim=0)
    per_layer = {f"logit_lens/{name}":
                 (count * inputs.products[f"logit_lens/{name}"].nan_to_num(0.0)).sum(dim=0)
                 / total for name in SERIES}
    top1 = per_layer["logit_lens/top1"]
    reached = (top1 >= 0.5).nonzero()
    summary = {"logit_lens/model_loss": float(per_layer["logit_lens/ce"][-1]),
               "logit_lens/predicted_tokens": float(total[-1]),
               "summary/logit_lens/top1/first_layer_over_half":
                   float(reached[0]) if len(reached) else math.nan}
    return Output(per_layer=per_layer, summary=summary)


METRIC = Metric(
    name="logit_lens", compute=_compute, needs=("tokens", "output_embedding"),
    logs={"logit_lens/ce": False, "logit_lens/kl": False, "logit_lens/top1": True},
    summaries={"logit_lens/ce": "min"},
    products=lambda job: [f"logit_lens/{name}" for name in (*SERIES, "n")],
    token_fn=_token_fn, check=_check,
    description="each layer through the final norm and output embedding: next-token CE, KL "
                "from the last layer, top-1 agreement")
