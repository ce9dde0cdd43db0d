"""A job's pooled vectors as an artifact (``extraction.log_pooled=true``): what a comparison of
finished runs reads on any store, with no activation cache and no forward pass.

``results/pooled.pt`` holds ``pooled``, ``(N, L+1, D)`` float16 (half the float32 size:
smollm2 at N = 512 is about 18 MB), and ``prompt_sha256``, the SHA-256 of each prompt's text in the
same order, so that two runs are compared on the prompts both measured, matched by text
without the texts themselves leaving the machine. Read with ``torch.load(weights_only=True)``:
tensors and strings only, safe for a teammate's artifact.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lw.errors import LwError

FILE = "pooled.pt"   # in the job's results/ folder
FORMAT = 1


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save(path: Path, pooled: torch.Tensor, texts: list[str]) -> None:
    if pooled.shape[0] != len(texts):
        raise ValueError(f"{pooled.shape[0]} pooled vectors for {len(texts)} prompts")
    torch.save({"format": FORMAT, "pooled": pooled.detach().to("cpu", torch.float16),
                "prompt_sha256": [text_hash(t) for t in texts]}, path)


def load(path: Path) -> tuple[torch.Tensor, list[str]]:
    """``((N, L+1, D) float32, [N text hashes])``."""
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unreadable file means the same
        raise LwError(f"{path}: not a pooled-vectors file lw can read "
                      f"({type(error).__name__})") from None
    if saved.get("format") != FORMAT:
        raise LwError(f"{path}: pooled-vectors format {saved.get('format')!r}, this lw reads "
                      f"{FORMAT}")
    return saved["pooled"].float(), list(saved["prompt_sha256"])


def common_rows(hashes_a: list[str], hashes_b: list[str]) -> tuple[list[int], list[int]]:
    """The rows of the prompts both measured, in a's order (a prompt twice: paired in
    order)."""
    where: dict[str, list[int]] = {}
    for row, key in enumerate(hashes_b):
        where.setdefault(key, []).append(row)
    rows_a, rows_b = [], []
    for row, key in enumerate(hashes_a):
        if where.get(key):
            rows_a.append(row)
            rows_b.append(where[key].pop(0))
    return rows_a, rows_b
