"""The offline training study's options (``lw.training.study.TrainFirst``): a small GPT-NeoX
trained from scratch, its log-spaced checkpoints, and the Seq-VCR regularizer.

Given as the Hydra callback's keys in an experiment yaml (``hydra.callbacks.train_first``), not
as job options: the jobs measure the checkpoints the training saved, by ``model.revision``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lw.config.schema import SEED_MAX
from lw.errors import check as _check


@dataclass
class SeqVCRConfig:
    on: bool = False                 # add the Seq-VCR loss to the language-modelling loss
    # whose states are regularized: an index into the model's hidden states (0 the embeddings,
    # 1..layers each block's output, -1 the last, after the final norm: the paper's choice)
    layer: int = -1
    projection_size: int = 256       # d': the linear projection's width (paper: 2048 for GPT-2)
    lambda_var: float = 1.0          # weight of the variance hinge max(0, 1 - sqrt(C_kk + eta))
    lambda_cov: float = 0.004        # weight of the squared off-diagonal covariances
    eta: float = 0.001               # added to each variance under the square root
    pause_tokens: int = 0            # pause tokens inserted into every sequence (paper: 2)
    pause_at: float = 0.5            # where they go, as a share of the sequence (the "question")

    def __post_init__(self) -> None:
        _check(self.projection_size >= 2,
               f"train.seq_vcr.projection_size={self.projection_size}: must be >= 2")
        _check(self.lambda_var >= 0, f"train.seq_vcr.lambda_var={self.lambda_var}: must be >= 0")
        _check(self.lambda_cov >= 0, f"train.seq_vcr.lambda_cov={self.lambda_cov}: must be >= 0")
        _check(self.eta > 0, f"train.seq_vcr.eta={self.eta}: must be > 0")
        _check(self.pause_tokens >= 0,
               f"train.seq_vcr.pause_tokens={self.pause_tokens}: must be >= 0")
        _check(0.0 < self.pause_at < 1.0,
               f"train.seq_vcr.pause_at={self.pause_at}: must lie strictly between 0 and 1")


TASKS = ("text", "multiplication")


@dataclass
class TrainConfig:
    out: str = "training/tiny-neox"  # folder of the checkpoints (<out>/step<N>/), under the cwd
    # what the model learns: "text" (the data option's texts, packed) or "multiplication"
    # (digit-multiplication problems drawn from problem_seed, one per row, only the answer
    # learnt; a digit tokenizer: data, texts, vocab_size, tokenizer and seq_len are not used)
    task: str = "text"
    digits: int = 3                  # multiplication: digits of each operand (paper: 4 and 5)
    train_problems: int = 16384      # multiplication: distinct problems trained on
    test_problems: int = 512         # multiplication: held-out problems, none trained on
    problem_seed: int = 0            # multiplication: draws the problems (fixed as seed varies)
    data: str = "wiki-vital"         # the text: an offline data option (conf/data/<name>.yaml)
    texts: int = 0                   # train on the data's first N texts (0: all of them)
    # > 0: the tokenizer is a byte-level BPE of this many tokens learnt from the text (Pythia's
    # kind, small so that the output layer does not dominate on CPUs); 0: `tokenizer`'s own
    vocab_size: int = 4096
    tokenizer: str = "smollm2"       # with vocab_size=0: whose tokenizer (an offline model)
    hidden_size: int = 64            # GPT-NeoX as Pythia's: rotary on 1/4 of a head, parallel
    layers: int = 4                  # transformer blocks
    heads: int = 4                   # attention heads (hidden_size a multiple of them)
    intermediate_size: int = 256     # MLP width
    steps: int = 256                 # optimizer steps
    batch_size: int = 16             # sequences per step
    seq_len: int = 128               # tokens per sequence (texts packed end to end, as Pythia)
    learning_rate: float = 0.001     # AdamW peak; warmup then cosine decay to 0
    warmup: float = 0.01             # share of the steps spent warming up (Pythia: 1%)
    seed: int = 0                    # initialisation, data order, Seq-VCR projection
    # steps saved; empty: 0, 1, 2, 4, ... up to and including `steps` (Pythia's log spacing)
    checkpoints: list[int] = field(default_factory=list)
    seq_vcr: SeqVCRConfig = field(default_factory=SeqVCRConfig)
    # measured while training (lw.LayerwiseCallback, text task): these metrics at each saved
    # step, logged to a training run with a step x depth heat map each; [] = none. Not part
    # of the training's identity: measuring never changes what is trained
    watch: list[str] = field(default_factory=lambda: ["prompt_entropy"])
    watch_prompts: int = 64          # prompts of the data option measured at each saved step

    def __post_init__(self) -> None:
        if isinstance(self.seq_vcr, dict):  # from a yaml or keyword arguments
            self.seq_vcr = SeqVCRConfig(**self.seq_vcr)
        self.checkpoints = [int(step) for step in self.checkpoints]
        _check(bool(self.out and self.out.strip()), "train.out is empty: name a folder")
        for name in ("hidden_size", "layers", "heads", "intermediate_size", "steps"):
            _check(getattr(self, name) >= 1, f"train.{name}={getattr(self, name)}: must be >= 1")
        _check(self.task in TASKS, f"train.task={self.task!r}: one of {', '.join(TASKS)}")
        _check(1 <= self.digits <= 9, f"train.digits={self.digits}: must lie in [1, 9]")
        _check(self.train_problems >= self.batch_size,
               f"train.train_problems={self.train_problems}: must be >= train.batch_size="
               f"{self.batch_size}")
        _check(self.test_problems >= 1, f"train.test_problems={self.test_problems}: must be >= 1")
        _check(0 <= self.problem_seed <= SEED_MAX,
               f"train.problem_seed={self.problem_seed}: must lie in [0, 2**63 - 1]")
        self.watch = [str(name) for name in self.watch]
        _check(self.watch_prompts >= 2,
               f"train.watch_prompts={self.watch_prompts}: must be >= 2")
        _check(self.texts >= 0, f"train.texts={self.texts}: must be >= 0 (0: all)")
        _check(self.vocab_size == 0 or self.vocab_size >= 300,
               f"train.vocab_size={self.vocab_size}: 0 (the tokenizer option's) or >= 300 (the "
               "256 bytes and merges)")
        _check(self.hidden_size % self.heads == 0,
               f"train.hidden_size={self.hidden_size} is not a multiple of train.heads="
               f"{self.heads}")
        _check(self.batch_size >= 2, f"train.batch_size={self.batch_size}: must be >= 2 (Seq-VCR's "
               "covariance is over the batch)")
        _check(self.seq_len >= 2, f"train.seq_len={self.seq_len}: must be >= 2")
        _check(self.learning_rate > 0, f"train.learning_rate={self.learning_rate}: must be > 0")
        _check(0.0 <= self.warmup < 1.0, f"train.warmup={self.warmup}: must lie in [0, 1)")
        _check(0 <= self.seed <= SEED_MAX, f"train.seed={self.seed}: must lie in [0, 2**63 - 1]")
        _check(all(0 <= step <= self.steps for step in self.checkpoints),
               f"train.checkpoints={self.checkpoints}: every step must lie in [0, train.steps="
               f"{self.steps}]")
        _check(-(self.layers + 1) <= self.seq_vcr.layer <= self.layers,
               f"train.seq_vcr.layer={self.seq_vcr.layer}: the model has hidden states 0.."
               f"{self.layers} (or -1..-{self.layers + 1} from the end)")

    def checkpoint_steps(self) -> list[int]:
        """The steps saved, sorted: the given ones, else 0 and the powers of 2 up to ``steps``,
        and ``steps`` itself."""
        if self.checkpoints:
            return sorted(set(self.checkpoints))
        steps, power = {0, self.steps}, 1
        while power < self.steps:
            steps.add(power)
            power *= 2
        return sorted(steps)
