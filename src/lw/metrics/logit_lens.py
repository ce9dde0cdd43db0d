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

Computed inside the forward pass (:class:`LensPass`): each batch's predicted tokens are
gathered and projected onto the vocabulary with all layers at once, in chunks of tokens from as
many batches as it takes: at most ``CHUNK_ELEMENTS`` logits are alive (no N x T x V tensor),
and the projection runs as one large matrix product rather than a few rows per batch; its
products (per-prompt means and counts) are cached like the others. Cost: (L+1) x tokens x V x D
multiply-adds on top of the forward pass (the vocabulary projection of every layer).

The next tokens are the batch's own ids, which the forward pass hands to every token function.

``metric.logit_lens.tokens`` is how many predicted tokens per prompt it measures, a sample
seeded by ``seed`` and the prompt's own ids (so a prompt gets the same sample in any batch): an
integer K >= 1 draws K per prompt without replacement; a share 0 < f < 1 draws one token from
each of a seeded share f of the prompts (a prompt is in or out by its own hash, so a smaller
share's prompts are among a larger one's); 0 measures every predicted token. The projection's
cost is per token: even one token projects onto the vocabulary at every state, (L+1) x V x D
multiply-adds (smollm2: 31 x 49,152 x 576 = 0.88 G, against ~14 G for the forward pass of a
128-token prompt), and on a CPU its float32 matrix product runs no faster than the model's.
Measured on smollm2 at N = 512 (`bench/bench.py --metric-costs --n 512 --cases +logit_lens`, one
process, quiet, against the bare forward pass): one token per prompt +0.233 floors when each
batch's few tokens were projected alone, +0.105 with :class:`LensPass`'s chunks (a timer inside:
19 s in the lens, three quarters of it the matrix product): still over a tenth, so the default
is 0.5, measured +0.045 (7 s over 161 s; at N = 64 its second of work is within the noise). A
sample is noisy at small N (docs/FINDINGS.md): use ``tokens=0`` or many prompts for a curve to
read closely. Every measured token counts equally in the means, so a sample weighs prompts
equally instead of by length.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lw.errors import LwError, check
from lw.metrics.registry import Metric, Output

CHUNK_ELEMENTS = 2**25               # logits alive at once: (L+1) x tokens x V float32, 128 MB
FINAL_NORMS = ("norm", "final_layer_norm", "norm_f", "ln_f")  # attribute of the base model
SERIES = ("ce", "kl", "top1")


@dataclass
class LogitLensKnobs:
    # predicted tokens per prompt, a seeded sample: K >= 1 per prompt, a share 0 < f < 1 of the
    # prompts with one each, 0 = every token
    tokens: float = 0.5

    def __post_init__(self) -> None:
        check(self.tokens >= 0 and (self.tokens < 1 or self.tokens == int(self.tokens)),
              f"metric.logit_lens.tokens={self.tokens}: use 0 (every predicted token), a "
              "share of the prompts between 0 and 1 (one token each), or a whole number of "
              "tokens per prompt")


def sample_predicted(predicts: Tensor, ids: Tensor, tokens: float, seed: int) -> Tensor:
    """``predicts`` ``(B, T-1)`` bool, keeping a seeded sample of each row's predicted tokens:
    ``tokens`` K >= 1 per row, drawn without replacement; 0 < f < 1: one token in a share f of
    the rows; 0: every one. Seeded by ``seed`` and the row's own ids (the same sample for a
    prompt in any batch, padding aside)."""
    if tokens <= 0:
        return predicts
    per_row = max(1, int(tokens))
    kept = torch.zeros_like(predicts)
    for row in range(predicts.shape[0]):
        where = predicts[row].nonzero().squeeze(1)
        if not len(where):
            continue
        real = ids[row, :where[-1] + 2].cpu().numpy().tobytes()   # the prompt up to its end
        digest = hashlib.sha256(real + seed.to_bytes(8, "little", signed=False)).digest()
        if tokens < 1 and int.from_bytes(digest[8:16], "little") >= tokens * 2**64:
            continue                                              # not in the share
        if len(where) <= per_row:
            kept[row, where] = True
            continue
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        chosen = torch.randperm(len(where), generator=generator)[:per_row]
        kept[row, where[chosen.to(where.device)]] = True
    return kept


def lens_values(x: Tensor, targets: Tensor, norm, head: Tensor, last_normed: bool,
                logits: Tensor) -> Tensor:
    """``(3, L+1, P)`` float64 CE, KL and top-1 agreement of ``P`` predicted tokens.

    Args:
        x: ``(L+1, P, D)`` their states; targets: ``(P,)`` the next tokens; norm, head,
            last_normed: as :func:`lens_products`; logits: a float32 buffer of at least
            ``(L+1) x P x V`` elements, overwritten.
    """
    states, count, vocab = x.shape[0], x.shape[1], head.shape[0]
    normed = (norm(x) if not last_normed else torch.cat([norm(x[:-1]), x[-1:]])).float()
    logits = logits[:states * count * vocab].view(states, count, vocab)
    torch.matmul(normed, head.T, out=logits)                               # (L+1, P, V)
    # only what needs the whole vocabulary runs over it: the argmax, the final layer's
    # softmax, and the log-normalizer (in place); the rest are D-long dot products
    top, top1_ids = logits.max(dim=-1)                                      # (L+1, P)
    final = torch.softmax(logits[-1], dim=-1)                               # (P, V)
    mixed = (final @ head).double()                                         # (P, D): E_pL[W_v]
    lse = top.double() + logits.sub_(top.unsqueeze(-1)).exp_().sum(dim=-1).log().double()
    wide = normed.double()
    target = (wide * head[targets].double()).sum(dim=-1)                    # z_l[x_t+1]
    expected = (wide * mixed).sum(dim=-1)                                   # sum_v p_L z_l
    ce = lse - target                                                       # -log p_l[x_t+1]
    # KL(p_L || p_l) = sum_v p_L (log p_L - log p_l) = (E z_L - lse_L) - (E z_l - lse_l)
    kl = (expected[-1] - lse[-1]) - (expected - lse)
    top1 = (top1_ids == top1_ids[-1]).double()
    return torch.stack([ce, kl, top1])


class LensPass:
    """The logit lens over one forward pass, as extract's token function: each batch's
    predicted tokens (after the sample) are gathered, and projected onto the vocabulary in
    full chunks of tokens from as many batches as it takes, through one logits buffer.

    Why not batch by batch: with one token per prompt a batch has a few tokens, and the
    projection of a few rows streams the whole (V, D) head for little work, into a fresh
    buffer each time; chunks of ``chunk_elements // ((L+1) x V)`` tokens keep the matrix
    product at its full rate. The products come out of :meth:`flush`, one dict per batch.
    """

    def __init__(self, norm, head: Tensor, last_normed: bool, *,
                 chunk_elements: int = CHUNK_ELEMENTS, tokens: float = 0, seed: int = 0,
                 prefix: str = "logit_lens/") -> None:
        self.norm, self.head, self.last_normed = norm, head, last_normed
        self.chunk_elements, self.tokens, self.seed, self.prefix = (chunk_elements, tokens,
                                                                    seed, prefix)
        self.sums: list[Tensor] = []          # per batch (3, L+1, B) float64
        self.counts: list[Tensor] = []        # per batch (B,) predicted tokens
        self.pending: list[tuple[Tensor, Tensor, Tensor, int]] = []  # (x, targets, rows, batch)
        self.pending_tokens = 0
        self.buffer: Tensor | None = None

    def __call__(self, hidden: Tensor, kept: Tensor, ids: Tensor) -> dict[str, Tensor]:
        states, batch = hidden.shape[:2]
        kept = kept.to(hidden.device)
        if self.head.device != hidden.device:   # once: a model spread over GPUs ends elsewhere
            self.head = self.head.to(hidden.device)
        predicts = sample_predicted(kept[:, :-1] & kept[:, 1:], ids, self.tokens,
                                    self.seed)                              # (B, T-1)
        rows, cols = predicts.nonzero(as_tuple=True)
        self.sums.append(torch.zeros((len(SERIES), states, batch), dtype=torch.float64,
                                     device=hidden.device))
        self.counts.append(predicts.sum(dim=1))
        # gathered a chunk at a time (a copy: the batch's states are freed), so that what is
        # held beyond the batch is at most one chunk of tokens, also with every token
        step, start, batch_no = self._step(states), 0, len(self.sums) - 1
        while start < len(rows):
            take = min(step - self.pending_tokens, len(rows) - start)
            r, c = rows[start:start + take], cols[start:start + take]
            self.pending.append((hidden[:, r, c], ids[r, c + 1], r, batch_no))
            self.pending_tokens += take
            start += take
            if self.pending_tokens == step:
                self._project()
        return {}

    def flush(self) -> list[dict[str, Tensor]]:
        """Projects what is left; one products dict per batch seen, in order:
        ``{<prefix>ce, <prefix>kl, <prefix>top1, <prefix>n: (L+1, B)}`` (float64; NaN means
        for prompts with no predicted token)."""
        if self.pending_tokens:
            self._project()
        out = []
        for sums, count in zip(self.sums, self.counts, strict=True):
            count = count.double().expand(sums.shape[1], -1)                # (L+1, B)
            means = sums / count
            values = {f"{self.prefix}{name}": means[i] for i, name in enumerate(SERIES)}
            values[f"{self.prefix}n"] = count.clone()
            out.append(values)
        self.sums, self.counts, self.buffer = [], [], None
        return out

    def _step(self, states: int) -> int:
        return max(1, self.chunk_elements // (states * self.head.shape[0]))

    def _project(self) -> None:
        """The pending tokens (at most one chunk) through the lens, into their batches' sums."""
        taken, size = self.pending, self.pending_tokens
        self.pending, self.pending_tokens = [], 0
        x = torch.cat([t[0] for t in taken], dim=1)
        states, vocab = x.shape[0], self.head.shape[0]
        if self.buffer is None or self.buffer.numel() < states * size * vocab:
            self.buffer = torch.empty(states * size * vocab, device=x.device)
        values = lens_values(x, torch.cat([t[1] for t in taken]), self.norm, self.head,
                             self.last_normed, self.buffer)                 # (3, L+1, P)
        start = 0
        for _, _, rows, batch in taken:
            self.sums[batch].index_add_(2, rows, values[:, :, start:start + len(rows)])
            start += len(rows)


def lens_products(hidden: Tensor, kept: Tensor, ids: Tensor, norm, head: Tensor,
                  last_normed: bool, chunk_elements: int = CHUNK_ELEMENTS, tokens: float = 0,
                  seed: int = 0, prefix: str = "logit_lens/") -> dict[str, Tensor]:
    """Per prompt and layer of one batch, the mean logit-lens CE, KL and top-1 agreement, and
    the count (:class:`LensPass` over that batch alone).

    Args:
        hidden: ``(L+1, B, T, D)`` token states; kept: ``(B, T)`` bool, the tokens that may
            predict (real, after skip_first); ids: ``(B, T)`` the token ids.
        norm: the final norm (a module or function on ``(..., D)``); head: ``(V, D)``.
        last_normed: state L is already after the final norm (do not apply it again).
        tokens: the sample of predicted tokens (:func:`sample_predicted`, with ``seed``); 0:
            all.

    Returns:
        ``{<prefix>ce, <prefix>kl, <prefix>top1, <prefix>n: (L+1, B)}`` (float64; NaN means
        for prompts with no predicted token).
    """
    lens = LensPass(norm, head, last_normed, chunk_elements=chunk_elements, tokens=tokens,
                    seed=seed, prefix=prefix)
    lens(hidden, kept, ids)
    return lens.flush()[0]


def _final_norm(model):
    for name in FINAL_NORMS:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise LwError(f"logit_lens: no final norm ({', '.join(FINAL_NORMS)}) on "
                  f"{type(model).__name__}")


def product_prefix(job) -> str:
    """The in-pass products of this sample size (cached apart: another size is another
    product)."""
    tokens = job.metric.logit_lens.tokens
    return "logit_lens/" if tokens == 0 else f"logit_lens/t{tokens:g}/"


def _token_fn(job, loaded, wanted: list[str]):
    model = loaded.model
    module = _final_norm(model)
    dtype = next(module.parameters()).dtype
    head = loaded.output_embedding()
    return LensPass(lambda x: module(x.to(dtype)).float(), head.float(),
                    loaded.info.last_state_after_final_norm,
                    tokens=job.metric.logit_lens.tokens, seed=job.seed,
                    prefix=product_prefix(job))


def _check(job) -> None:
    check(job.model.family != "encoder",
          f"metrics logit_lens needs a causal LM (model.family decoder or ssm), not "
          f"model={job.model.name} (family {job.model.family})")


def _compute(inputs) -> Output:
    prefix = product_prefix(inputs.job)
    count = inputs.products[f"{prefix}n"]                                   # (N, L+1)
    total = count.sum(dim=0)
    per_layer = {f"logit_lens/{name}":
                 (count * inputs.products[f"{prefix}{name}"].nan_to_num(0.0)).sum(dim=0)
                 / total for name in SERIES}
    top1 = per_layer["logit_lens/top1"]
    reached = (top1 >= 0.5).nonzero()
    summary = {"logit_lens/model_loss": float(per_layer["logit_lens/ce"][-1]),
               "logit_lens/predicted_tokens": float(total[-1]),
               "summary/logit_lens/top1/first_layer_over_half":
                   float(reached[0]) if len(reached) else math.nan}
    return Output(per_layer=per_layer, summary=summary)


METRIC = Metric(
    name="logit_lens", definition="Layer-comparison measures (beyond the papers)/Logit lens",
    compute=_compute, needs=("tokens", "output_embedding"),
    logs={"logit_lens/ce": False, "logit_lens/kl": False, "logit_lens/top1": True},
    summaries={"logit_lens/ce": "min"},
    products=lambda job: [f"{product_prefix(job)}{name}" for name in (*SERIES, "n")],
    knobs=LogitLensKnobs, version=2,
    token_fn=_token_fn, check=_check,
    description="each layer through the final norm and output embedding: next-token CE, KL "
                "from the last layer, top-1 agreement")
