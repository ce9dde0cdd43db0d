"""The offline training study: a small GPT-NeoX (Pythia's architecture) trained from scratch on
offline text with ``transformers.Trainer``, saved at log-spaced steps as ``<out>/step<N>/``
(model and tokenizer: revisions of the folder for ``model.id=<out> model.revision=step<N>``),
with Seq-VCR added to the language-modelling loss when ``train.seq_vcr.on``.

``TrainFirst`` is the Hydra callback an experiment names; it trains once before the jobs run.
A finished training leaves ``<out>/lw-training.json``, its identity (the train config, the
data's identity, the study's code version, transformers' and torch's versions): the same
identity is not trained again, a different one is trained afresh (nothing silently stale).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from lw.config.training import TrainConfig
from lw.errors import LwError
from lw.training.seq_vcr import SeqVCRProjection, seq_vcr_loss, with_pause_tokens

log = logging.getLogger(__name__)

# Bump when a change here changes what a training saves: older folders are then retrained.
STUDY_VERSION = 2
MARKER = "lw-training.json"
PAUSE_TOKEN = "<|pause|>"
EOS = "<|endoftext|>"
_STEP_FOLDER = re.compile(r"step\d+")
WATCHED = "lw"  # <out>/lw/: what lw.LayerwiseCallback measured while training (its folder)
# options that do not change the checkpoints: where they go, and what is measured meanwhile
NOT_TRAINING = ("out", "watch", "watch_prompts")


def training_identity(cfg: TrainConfig) -> dict:
    """Everything the saved checkpoints depend on (the output folder aside)."""
    from lw.job.identity import data_identity
    from lw.loading.data_sources import corpus_config

    train = {k: v for k, v in asdict(cfg).items() if k not in NOT_TRAINING}
    if cfg.task == "multiplication":  # generated: the generator's version is its identity
        from lw.training.multiplication import TASK_VERSION
        data = {"task": cfg.task, "version": TASK_VERSION}
    else:
        data = data_identity(corpus_config(cfg.data))
    return {"study_version": STUDY_VERSION, "train": train, "data": data,
            "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}


def finished(cfg: TrainConfig, identity: dict) -> bool:
    """``cfg.out`` holds a finished training of this identity, every checkpoint in place."""
    out = Path(cfg.out)
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return done == identity and all((out / f"step{step}" / "config.json").is_file()
                                    for step in cfg.checkpoint_steps())


def train_once(cfg: TrainConfig, **watch_knobs: Any) -> bool:
    """Train unless ``cfg.out`` already holds this very training; whether it trained. With
    ``cfg.watch`` (text task), lw.LayerwiseCallback measures each saved step as it is saved
    (``watch_knobs``: more of its knobs, e.g. ``tracking__uri``)."""
    out = Path(cfg.out)
    identity = training_identity(cfg)
    if finished(cfg, identity):
        log.info("[lw] %s holds this training already (%s): not retrained", out, MARKER)
        return False
    if (out / MARKER).exists() or any(_owned(out)):
        log.warning("[lw] %s holds another training (its config or lw's training code "
                    "changed): training afresh", out)
    for path in _owned(out):  # only what a training writes: a user's other files stay
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    watcher = None
    if cfg.watch and cfg.task == "text":
        from lw.training.callback import LayerwiseCallback

        watcher = LayerwiseCallback(cfg.data, metrics=cfg.watch,
                                    data__n_prompts=cfg.watch_prompts,
                                    data__max_tokens=cfg.seq_len,
                                    data__min_tokens=max(2, cfg.seq_len // 2), **watch_knobs)
        watcher.folder = out / WATCHED
    try:
        train(cfg, watcher=watcher)
    finally:
        if watcher is not None:
            watcher.finish()
    (out / MARKER).write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")
    return True


def _owned(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return [p for p in out.iterdir()
            if p.name == MARKER or (p.is_dir() and (_STEP_FOLDER.fullmatch(p.name)
                                                    or p.name == WATCHED))]


def train(cfg: TrainConfig, callbacks: list | tuple = (), watcher=None) -> transformers.Trainer:
    """Train ``cfg``'s model from its seeded initialisation, saving ``<out>/step<N>/`` at
    each of ``cfg.checkpoint_steps()`` (step 0 before the first optimizer step).

    ``callbacks``: more ``transformers.TrainerCallback``s (``lw.LayerwiseCallback``); the
    tokenizer is the Trainer's ``processing_class``. ``watcher``: an lw.LayerwiseCallback
    that measures each checkpoint as it is saved (step 0 included). Returns the Trainer."""
    from lw.loading.model_sources import load_tokenizer_of
    from lw.loading.prompts import corpus_texts

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pause_position = None  # None: pause_at's share of each row
    if cfg.task == "multiplication":
        from lw.training import multiplication as task

        tokenizer = task.digit_tokenizer()
        problems, _ = task.problems(cfg.digits, cfg.train_problems, cfg.test_problems,
                                    cfg.problem_seed)
        pause_position = task.question_length(cfg.digits)
    else:
        texts = corpus_texts(cfg.data)[:cfg.texts or None]
        tokenizer = learnt_tokenizer(texts, cfg.vocab_size) if cfg.vocab_size else \
            load_tokenizer_of(cfg.tokenizer)
    vcr = cfg.seq_vcr
    if vcr.on and vcr.pause_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": [PAUSE_TOKEN]})
    model = initial_model(cfg, len(tokenizer))
    if cfg.task == "multiplication":
        dataset = task.ProblemSet(tokenizer, problems)
    else:
        dataset = _Blocks(packed_blocks(tokenizer, texts, cfg.seq_len))
    needed = cfg.steps * cfg.batch_size
    log.info("[lw] training %s: %d parameters, %d rows of %d tokens (%d steps x %d: %.2f "
             "epochs)", out, sum(p.numel() for p in model.parameters()), len(dataset),
             len(dataset[0]["input_ids"]), cfg.steps, cfg.batch_size, needed / len(dataset))
    steps = cfg.checkpoint_steps()
    if 0 in steps:
        save_checkpoint(model, tokenizer, out / "step0")
        if watcher is not None:
            watcher.measure(model, tokenizer, 0)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, warmup_steps=round(cfg.warmup * cfg.steps),
        lr_scheduler_type="cosine", weight_decay=0.01, seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="no", report_to="none", logging_steps=max(1, cfg.steps // 16),
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    projection = None
    if vcr.on:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)  # apart from the model's own draws
            projection = SeqVCRProjection(cfg.hidden_size, vcr.projection_size).to(args.device)
    params = list(model.parameters()) + (list(projection.parameters()) if projection else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
    trainer = _StudyTrainer(
        model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None),
        callbacks=[_SaveAt(steps, tokenizer, out, watcher), *callbacks], processing_class=tokenizer,
        data_collator=transformers.default_data_collator)  # rows of equal length: no padding
    trainer.study = cfg
    trainer.projection = projection
    trainer.pause_id = tokenizer.convert_tokens_to_ids(PAUSE_TOKEN) if vcr.pause_tokens else None
    trainer.pause_position = pause_position
    trainer.train()
    return trainer


def initial_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """The seeded initialisation: a GPT-NeoX shaped as Pythia's (step 0)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=2048, rotary_pct=0.25,  # Pythia's context (rotary: no weights)
        use_parallel_residual=True, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return GPTNeoXForCausalLM(config)


def learnt_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's and Pythia's kind) of ``vocab_size`` tokens learnt from the
    texts, EOS ``<|endoftext|>`` as Pythia's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS,
                                                bos_token=EOS, unk_token=EOS)


def packed_blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """The texts' tokens end to end, each text closed by EOS, cut into rows of ``seq_len``
    (the remainder dropped): Pythia's packing, no padding anywhere."""
    from lw.loading.prompts import tokenize

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text_ids in tokenize(tokenizer, texts):
        ids.extend(text_ids)
        ids.append(eos)
    rows = len(ids) // seq_len
    if rows == 0:
        raise LwError(f"train.seq_len={seq_len}: the data holds {len(ids)} tokens, not one block")
    return torch.tensor(ids[:rows * seq_len]).view(rows, seq_len)


def save_checkpoint(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class _StudyTrainer(transformers.Trainer):
    """The language-modelling loss, plus Seq-VCR on the chosen layer when it is on."""

    study: TrainConfig
    projection: torch.nn.Module | None
    pause_id: int | None
    pause_position: int | None  # where pauses go (a question's end); None: pause_at's share

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        vcr = self.study.seq_vcr
        ids, labels = inputs["input_ids"], inputs["labels"]
        if vcr.on and vcr.pause_tokens:
            at = self.pause_position or max(1, round(vcr.pause_at * ids.shape[1]))
            ids, labels = with_pause_tokens(ids, labels, vcr.pause_tokens, self.pause_id, at)
        outputs = model(input_ids=ids, labels=labels, output_hidden_states=vcr.on)
        loss = outputs.loss
        if vcr.on:
            z = self.projection(outputs.hidden_states[vcr.layer])
            loss = loss + seq_vcr_loss(z, vcr.lambda_var, vcr.lambda_cov, vcr.eta)
        return (loss, outputs) if return_outputs else loss


class _SaveAt(transformers.TrainerCallback):
    """Saves ``<out>/step<N>/`` after optimizer step N, for N in ``steps``, and has the
    watcher (lw.LayerwiseCallback) measure the weights it saved."""

    def __init__(self, steps: list[int], tokenizer, out: Path, watcher=None) -> None:
        self.steps, self.tokenizer, self.out = set(steps), tokenizer, out
        self.watcher = watcher

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            save_checkpoint(model, self.tokenizer, self.out / f"step{state.global_step}")
            if self.watcher is not None:
                self.watcher.measure(model, self.tokenizer, state.global_step)


@contextlib.contextmanager
def _ends_the_launch():
    """Hydra turns an exception in a callback into a warning and runs the jobs anyway, on
    checkpoints that were never saved: a failed training ends the launch instead, with lw's
    line for it (one line for the user's own mistakes, the traceback otherwise)."""
    try:
        yield
    except LwError as error:
        print(f"[lw] error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except Exception:
        traceback.print_exc()
        raise SystemExit(1) from None


class TrainFirst(Callback):
    """Hydra callback: trains the study's model once before a run or sweep starts.

    Its keys in the experiment yaml are ``TrainConfig``'s (``train.*`` in the docs)::

        hydra:
          callbacks:
            train_first:
              _target_: lw.training.study.TrainFirst
              out: training/tiny-neox
              steps: 256
    """

    def __init__(self, **train: Any) -> None:
        plain = {k: OmegaConf.to_container(v, resolve=True)
                 if isinstance(v, DictConfig | ListConfig) else v for k, v in train.items()}
        self.cfg = TrainConfig(**plain)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with _ends_the_launch():
            train_once(self.cfg, **_tracking_knobs(config))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with _ends_the_launch():
            trained = train_once(self.cfg, **_tracking_knobs(config))
            self._check_revisions(config)
        if trained:  # the sweep's check of identical revisions ran before the folder existed
            import dataclasses

            from lw.sweep.callback import sweep_values
            from lw.sweep.revisions import note_same_weights
            from lw.tracking import sweep_state

            same = note_same_weights(config, sweep_values(config))
            sweep_state.begin(dataclasses.replace(sweep_state.current(), same_weights=same))

    def _check_revisions(self, config: DictConfig) -> None:
        """A swept ``model.revision`` the training did not save: said before any job runs."""
        from lw.sweep.callback import sweep_values

        saved = [f"step{step}" for step in self.cfg.checkpoint_steps()]
        missing = [r for r in sweep_values(config).get("model.revision", []) if r not in saved]
        if missing:
            raise LwError(f"model.revision={','.join(missing)}: not saved by the training in "
                          f"{self.cfg.out}; it saves {','.join(saved)}")


def _tracking_knobs(config: DictConfig) -> dict[str, Any]:
    """The run's store and experiment, for the watcher's training run beside the jobs' runs."""
    tracking = (config.get("tracking") if config is not None else None) or {}
    knobs = {f"tracking__{key}": tracking[key] for key in ("uri", "artifact_location",
                                                          "experiment")
             if tracking.get(key) is not None}
    return knobs
