"""What lw.LayerwiseCallback costs a training: one optimizer step against one measurement of N
prompts (lw's default metrics), best of 3, on the CPU.

    python bench/training_cost.py [--models tiny-pythia smollm2] [--n 64] [--batch 8]

Per model: the training step (forward, backward and AdamW on ``--batch`` wiki-vital texts of
up to 128 tokens), a plain no-gradient forward pass of the N prompts (batches of 16), lw's own
forward pass of them (``forward_seconds``) and the callback's whole measurement (forward,
metrics, the step's run, the training run's table and heat maps, into a local SQLite store).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def causal_lm(name: str, tokenizer):
    """The model option with its LM head, as a training would hold it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lw.api import compose_overrides
    from lw.config.schema import validate
    from lw.loading.model_sources import model_source

    cfg = validate(compose_overrides([f"model={name}"])).model
    if cfg.source == "random":
        config = AutoConfig.for_model(cfg.arch, **{**cfg.arch_config,
                                                   "vocab_size": len(tokenizer)})
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLM.from_pretrained(model_source(cfg).folder()[0])


REPEATS = 3


def best(times: list[float]) -> float:
    return min(times)


def cost(name: str, n: int, batch: int) -> dict:
    import lw
    from lw.api import compose_overrides
    from lw.config.schema import validate
    from lw.loading.model_sources import load_tokenizer_of
    from lw.loading.prompts import load_prompts

    tokenizer = load_tokenizer_of("smollm2")  # tiny-pythia borrows smollm2's
    model = causal_lm(name, tokenizer).train()
    data = validate(compose_overrides([f"data.n_prompts={max(n, batch)}"])).data
    texts = load_prompts(data, tokenizer).texts  # the wiki-vital texts lw measures
    step_batch = tokenizer(texts[:batch], return_tensors="pt", padding=True, truncation=True,
                           max_length=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    steps = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        model(**step_batch, labels=step_batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(time.perf_counter() - start)
    plain = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, 16):
                chunk = tokenizer(texts[i:i + 16], return_tensors="pt", padding=True,
                                  truncation=True, max_length=128)
                model.base_model(**chunk)
        plain.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        callback = lw.LayerwiseCallback("wiki-vital", data__n_prompts=n,
                                        tracking__uri=f"sqlite:///{tmp}/mlflow.db")
        callback.folder = Path(tmp) / "lw"
        measured, forward = [], []
        for step in range(REPEATS):
            start = time.perf_counter()
            table = callback.measure(model, tokenizer, step)
            measured.append(time.perf_counter() - start)
            forward.append(table.attrs["summary"]["forward_seconds"])
        callback.finish()
    return {"model": name, "n": n, "train_step_s": best(steps), "plain_forward_s": best(plain),
            "lw_forward_s": best(forward), "measure_s": best(measured)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-pythia", "smollm2"])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print("| model | N | training step (s) | forward of N, plain (s) | lw's forward (s) | "
          "whole measurement (s) |\n|---|---|---|---|---|---|")
    for name in args.models:
        row = cost(name, args.n, args.batch)
        print(f"| {row['model']} | {row['n']} | {row['train_step_s']:.3f} | "
              f"{row['plain_forward_s']:.3f} | {row['lw_forward_s']:.3f} | "
              f"{row['measure_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
