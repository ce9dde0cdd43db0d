"""The multiplication task of the training study (lw.training.multiplication): the drawn
problems' answers are their products in Deng et al.'s reversed-digit format, the split does not
overlap, the digit tokenizer round-trips; and a Seq-VCR training's first loss is the vanilla
one plus the regularizer, both against float64 recomputations from the initial model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lw.config.training import TrainConfig
from lw.errors import ConfigError, LwError
from lw.training import multiplication as task
from lw.training.seq_vcr import SeqVCRProjection
from lw.training.study import PAUSE_TOKEN, initial_model, train


def _number(reversed_text: str) -> int:
    return int("".join(reversed(reversed_text.split())))


def test_problems_are_products_split_apart_and_seeded():
    # a line of Deng et al.'s 4x4 test set (their chain of thought left out): 5431 x 3918
    known = task.Problem(5431, 3918, 4)
    assert (known.question(), known.answer()) == ("1 3 4 5 * 8 1 9 3 =", "8 5 6 8 7 2 1 2")

    train_set, test_set = task.problems(3, 3000, 400, seed=7)
    assert (len(train_set), len(test_set)) == (3000, 400)
    for p in train_set + test_set:
        left, right = p.question().removesuffix(" =").split(" * ")
        a, b = _number(left), _number(right)
        assert 100 <= a <= 999 and 100 <= b <= 999 and len(left.split()) == 3
        assert _number(p.answer()) == a * b and len(p.answer().split()) == 6
    pairs = lambda problems: {(p.a, p.b) for p in problems}  # noqa: E731
    assert len(pairs(train_set)) == 3000 and len(pairs(test_set)) == 400
    assert not pairs(train_set) & pairs(test_set)
    assert task.problems(3, 3000, 400, seed=7) == (train_set, test_set)
    assert pairs(task.problems(3, 3000, 400, seed=8)[1]) != pairs(test_set)
    two = [task.Problem(12, 34, 2), task.Problem(99, 99, 2)]  # 408 and 9801
    assert task.accuracy(["8 0 4 0", "1 0 8 8"], two) == (0.5, [1.0, 1.0, 1.0, 0.5])
    # the product without its padding zero is not the answer; a wrong symbol is one digit off
    assert task.accuracy(["8 0 4", "1 0 x 9"], two) == (0.0, [1.0, 1.0, 0.5, 0.5])
    assert task.accuracy(["8 0 4 0 0", "1 0 8 9"], two) == (0.5, [1.0, 1.0, 1.0, 1.0])

    # 2-digit operands: 90 x 90 pairs, all of them drawable, one more is one [lw] line
    assert len(pairs(sum(task.problems(2, 8000, 100, seed=0), []))) == 8100
    with pytest.raises(LwError, match=r"8101: 2-digit operands make only 8100"):
        task.problems(2, 8001, 100, seed=0)
    with pytest.raises(ConfigError, match=r"train.task='addition': one of text, multiplication"):
        TrainConfig(task="addition")


def test_tokenizer_round_trips_and_only_the_answer_is_learnt():
    tokenizer = task.digit_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [PAUSE_TOKEN]})
    for p in task.problems(4, 20, 5, seed=1)[0]:
        for text in (f"{p.question()} {p.answer()}",
                     task.with_pauses(f"{p.question()} {p.answer()}", PAUSE_TOKEN, 2)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
        assert PAUSE_TOKEN not in tokenizer.decode(tokenizer(p.question())["input_ids"])
    p = task.Problem(12, 34, 2)
    ids, labels = task.encoded(tokenizer, [p])
    assert ids.shape == (1, task.question_length(2) + 4 + 1)
    assert tokenizer.decode(ids[0]) == f"{p.question()} {p.answer()} {task.EOS}"
    assert (labels[0, :6] == -100).all() and torch.equal(labels[0, 6:], ids[0, 6:])


def _first_loss(tmp_path, name: str, **seq_vcr) -> tuple[float, TrainConfig]:
    from transformers import TrainerCallback

    losses: list[float] = []

    class FirstLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            losses.append(logs["loss"]) if logs and "loss" in logs else None

    # one step on one batch holding every training problem: the batch's order is the only
    # thing the data order changes, and neither loss depends on it
    cfg = TrainConfig(out=str(tmp_path / name), task="multiplication", digits=2,
                      train_problems=48, test_problems=8, hidden_size=16, layers=2, heads=2,
                      intermediate_size=32, steps=1, batch_size=48, seed=5, checkpoints=[1],
                      seq_vcr=seq_vcr)
    train(cfg, callbacks=[FirstLoss()])
    return losses[0], cfg


def _reference_regularizer(z: np.ndarray, lambda_var, lambda_cov, eta) -> float:
    """Per position: numpy's covariance over the batch (1/(B-1)), then the hinge and the
    squared off-diagonals, averaged over positions and dimensions."""
    total = 0.0
    for t in range(z.shape[1]):
        cov = np.cov(z[:, t, :], rowvar=False)
        off = cov - np.diag(np.diag(cov))
        total += lambda_var * np.maximum(0.0, 1.0 - np.sqrt(np.diag(cov) + eta)).sum()
        total += lambda_cov * (off ** 2).sum()
    return total / (z.shape[1] * z.shape[2])


@pytest.mark.slow
def test_seq_vcr_loss_is_the_vanilla_loss_plus_the_regularizer(tmp_path):
    vanilla, cfg = _first_loss(tmp_path, "vanilla")
    knobs = dict(on=True, layer=1, projection_size=12, lambda_var=1.0, lambda_cov=0.05)
    with_vcr, vcr_cfg = _first_loss(tmp_path, "vcr", **knobs)

    # float64 recomputation from the same initialisation on the same problems
    tokenizer = task.digit_tokenizer()
    ids, labels = task.encoded(tokenizer, task.problems(2, 48, 8, seed=0)[0])
    model = initial_model(cfg, len(tokenizer)).double()
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        learnt = target != -100
        lm = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][learnt].mean().item()
        torch.manual_seed(vcr_cfg.seed + 1)  # the study draws its projection so
        projection = SeqVCRProjection(cfg.hidden_size, knobs["projection_size"]).double()
        z = projection(out.hidden_states[knobs["layer"]]).numpy()
    vcr = vcr_cfg.seq_vcr
    regularizer = _reference_regularizer(z, vcr.lambda_var, vcr.lambda_cov, vcr.eta)
    assert regularizer > 0.1  # large next to the tolerance: a loss without it fails
    assert vanilla == pytest.approx(lm, abs=1e-5)
    assert with_vcr - vanilla == pytest.approx(regularizer, abs=2e-5)
