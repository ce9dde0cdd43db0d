"""Digit multiplication for the training study (``train.task=multiplication``): problems drawn
from a seed, a digit tokenizer, and the held-out exact-match accuracy by greedy decoding.

The format is the one the Seq-VCR paper (Arefin et al., ICLR 2025) trains on, the data of Deng
et al. (2023, implicit chain of thought): digits separated by spaces, every number written
least significant digit first, the product padded with zeros to twice the operands' digits::

    5431 x 3918 = 21278658   ->   question "1 3 4 5 * 8 1 9 3 ="   answer "8 5 6 8 7 2 1 2"

(Deng et al. write ``||`` and ``####`` around their chain of thought; without one, ``=`` is
the single separator here.) Only the answer and the closing EOS are learnt: the question's
labels are -100 (its digits are random, nothing to predict). Pause tokens go between the
question and the answer, as the paper puts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lw.errors import LwError, check

TIMES, EQUALS = "*", "="
EOS = "<|endoftext|>"  # the study's EOS (lw.training.study.EOS), also the padding token
# Bump when the format or the draw changes: a training's identity holds it.
TASK_VERSION = 1


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    digits: int

    @property
    def product(self) -> int:
        return self.a * self.b

    def question(self) -> str:
        return f"{reversed_digits(self.a, self.digits)} {TIMES} " \
               f"{reversed_digits(self.b, self.digits)} {EQUALS}"

    def answer(self) -> str:
        return reversed_digits(self.product, 2 * self.digits)


def reversed_digits(n: int, width: int) -> str:
    """``n`` zero-padded to ``width`` digits, least significant first, space-separated."""
    return " ".join(reversed(str(n).zfill(width)))


def operand_pairs(digits: int) -> int:
    """How many (a, b) pairs of ``digits``-digit numbers there are."""
    return (9 * 10 ** (digits - 1)) ** 2


def problems(digits: int, n_train: int, n_test: int, seed: int
             ) -> tuple[list[Problem], list[Problem]]:
    """``n_train`` training and ``n_test`` held-out problems: distinct (a, b) pairs of
    ``digits``-digit operands drawn without replacement from ``seed``; no pair is in both."""
    total = operand_pairs(digits)
    if n_train + n_test > total:
        raise LwError(f"train.train_problems + train.test_problems = {n_train + n_test}: "
                      f"{digits}-digit operands make only {total} distinct problems")
    low = 10 ** (digits - 1)
    drawn = np.random.default_rng(seed).choice(total, size=n_train + n_test, replace=False)
    pairs = [Problem(low + int(i) // (9 * low), low + int(i) % (9 * low), digits)
             for i in drawn]
    return pairs[n_test:], pairs[:n_test]


def digit_tokenizer():
    """A word-level tokenizer over the digits, ``*``, ``=`` and EOS (id 0, also padding):
    one token per space-separated symbol; decoding joins them with spaces (a round trip)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOS: 0, **{str(d): d + 1 for d in range(10)}, TIMES: 11, EQUALS: 12}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token=EOS, bos_token=EOS, unk_token=EOS,
        pad_token=EOS)


def encoded(tokenizer, batch: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids (question, answer, EOS) and labels (-100 on the question) of equal-length
    rows, one per problem."""
    rows, labels = [], []
    for problem in batch:
        question = tokenizer(problem.question(), add_special_tokens=False)["input_ids"]
        answer = tokenizer(problem.answer(), add_special_tokens=False)["input_ids"]
        rows.append(question + answer + [tokenizer.eos_token_id])
        labels.append([-100] * len(question) + answer + [tokenizer.eos_token_id])
    return torch.tensor(rows), torch.tensor(labels)


def question_length(digits: int) -> int:
    """Tokens in a question (``digits`` + ``*`` + ``digits`` + ``=``): where pauses go."""
    return 2 * digits + 2


class ProblemSet(torch.utils.data.Dataset):
    """The training problems as the study's Trainer takes them (input_ids, labels)."""

    def __init__(self, tokenizer, batch: list[Problem]) -> None:
        self.ids, self.labels = encoded(tokenizer, batch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def with_pauses(text: str, pause_token: str | None, n: int) -> str:
    """A question (or a whole problem) with ``n`` pause tokens after its ``=``, as the model
    trained with pauses reads it."""
    if not n or pause_token is None:
        return text
    question, _, rest = text.partition(EQUALS)
    return " ".join(part for part in (question.strip(), EQUALS, *[pause_token] * n,
                                      rest.strip()) if part)


@torch.no_grad()
def greedy_answers(model, tokenizer, batch: list[Problem], pause_token: str | None = None,
                   pause_tokens: int = 0, batch_size: int = 256) -> list[str]:
    """Each problem's answer as the model writes it: the question (and its pauses) in, then
    2 x digits tokens by greedy decoding (the answer's length: EOS is not awaited)."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(batch), batch_size):
            chunk = batch[start:start + batch_size]
            prompts = [with_pauses(p.question(), pause_token, pause_tokens) for p in chunk]
            ids = tokenizer(prompts, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = ids.to(next(model.parameters()).device)
            for _ in range(2 * chunk[0].digits):
                logits = model(input_ids=ids).logits[:, -1]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            new = ids[:, -2 * chunk[0].digits:]
            out += tokenizer.batch_decode(new, skip_special_tokens=False)
    finally:
        model.train(was_training)
    return out


def accuracy(answers: list[str], batch: list[Problem]) -> tuple[float, list[float]]:
    """The share of ``answers`` that write their problem's answer exactly (every digit of the
    padded product, nothing else: exact match), and the share right at each answer position
    (least significant digit first)."""
    check(len(answers) == len(batch), f"{len(answers)} answers for {len(batch)} problems")
    pairs = list(zip([text.split() for text in answers], [p.answer().split() for p in batch],
                     strict=True))
    exact = sum(written == truth for written, truth in pairs) / len(batch)
    width = 2 * batch[0].digits
    right = [sum(written[i:i + 1] == truth[i:i + 1] for written, truth in pairs) / len(batch)
             for i in range(width)]
    return exact, right
