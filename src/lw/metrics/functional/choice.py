"""Zero-shot multiple-choice accuracy from answer-letter log-likelihoods, and how a subject's
accuracy tracks its prompts' entropy layer by layer (the papers' Section 4.2, Figs. 5-6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lw.errors import LwError
from lw.metrics.functional.correlation import correlations

LOGIT_CHUNK = 512  # prompts per (chunk, V) logits matrix: 512 x 128k vocab x 4 B = 256 MB


def answer_logprobs(states: Tensor, head: Tensor, letter_ids: Tensor) -> Tensor:
    """Log-likelihood of each answer letter as the next token after the prompt.

    ``logp[i, k] = z_i[letter_k] - logsumexp_v z_i[v]`` with logits ``z_i = head @ h_i``.

    Args:
        states: ``(N, D)`` each prompt's last real token's state after the final norm (what the
            LM head reads).
        head: ``(V, D)`` the output embedding (for tied models the input embedding matrix).
        letter_ids: ``(K,)`` token ids of " A", " B", ...

    Returns:
        ``(N, K)`` float64 log-probabilities (the softmax is over the whole vocabulary).
    """
    # on the head's device (a GPU for big models): the (n, V) logits are the costly part
    head = head.float()
    letter_ids = letter_ids.to(head.device)
    out = []
    for chunk in states.to(head.device, torch.float32).split(LOGIT_CHUNK):  # bounds memory
        logits = chunk @ head.T                                            # (n, V)
        out.append((logits[:, letter_ids] - logits.logsumexp(-1, keepdim=True)).double().cpu())
    return torch.cat(out) if out else torch.empty(0, len(letter_ids), dtype=torch.float64)


def choice_correct(logprobs: Tensor, answers: Tensor, n_choices: Tensor) -> Tensor:
    """``(N,)`` bool: the most likely of a prompt's first ``n_choices`` letters is its answer.

    Args:
        logprobs: ``(N, K)`` from :func:`answer_logprobs`; answers, n_choices: ``(N,)`` long.
    """
    letters = torch.arange(logprobs.shape[1], device=logprobs.device)
    valid = letters.unsqueeze(0) < n_choices.unsqueeze(1).to(logprobs.device)
    return logprobs.masked_fill(~valid, -torch.inf).argmax(-1) == answers.to(logprobs.device)


def subject_means(values: Tensor, subjects: Sequence[str]) -> tuple[list[str], Tensor]:
    """Mean of ``values`` ``(N, ...)`` over each subject's prompts (NaNs left out).

    Returns:
        the subjects in sorted order, and ``(S, ...)`` float64 means.
    """
    names = sorted(set(subjects))
    code = torch.tensor([names.index(s) for s in subjects])
    one_hot = torch.nn.functional.one_hot(code, len(names)).double()            # (N, S)
    flat = values.double().reshape(len(subjects), -1)
    finite = flat.isfinite().double()
    sums = one_hot.T @ torch.nan_to_num(flat, nan=0.0)                          # (S, rest)
    means = sums / (one_hot.T @ finite)
    return names, means.reshape(len(names), *values.shape[1:])


def subject_correlations(entropy: Tensor, correct: Tensor,
                         subjects: Sequence[str]) -> dict[str, Tensor]:
    """Per layer, the correlation across subjects between a subject's mean prompt entropy and
    its accuracy.

    Args:
        entropy: ``(N, L+1)`` per-prompt prompt entropy.
        correct: ``(N,)`` bool, the prompt's question answered right.
        subjects: N subject names.

    Returns:
        ``pearson``, ``spearman``, ``pearson_pvalue``, ``spearman_pvalue``: ``(L+1,)`` float64
        over the S subjects (NaN with fewer than 3 subjects or constant accuracy).
    """
    _, entropy_s = subject_means(entropy, subjects)                             # (S, L+1)
    _, accuracy_s = subject_means(correct.double(), subjects)                   # (S,)
    return correlations(entropy_s.T, accuracy_s.unsqueeze(0))


LETTERS = "ABCDEFGHIJ"


def letter_ids(tokenizer, n: int) -> torch.Tensor:
    """``(n,)`` token ids of " A", " B", ... (the answer after "Answer:"); LwError when a letter
    is not a single token of this tokenizer."""
    ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
           for letter in LETTERS[:n]]
    split = [f"' {letter}' -> {i}" for letter, i in zip(LETTERS, ids, strict=False) if len(i) != 1]
    if split:
        raise LwError("metrics mc_accuracy scores the answer letter as one token, but this "
                      f"tokenizer splits {', '.join(split)}")
    return torch.tensor([i[0] for i in ids])
