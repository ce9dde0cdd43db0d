"""Prompt perturbations of METRICS.md ("Prompt perturbations"): token-level repetition and
randomness, random prompts, and nlpaug character/word noise for the view metrics. Pure functions:
every draw comes from the ``torch.Generator`` (or, for nlpaug, the seed) passed in.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from lw.config.schema import PerturbationConfig

Prompts = list[list[int]]


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token: ``tokenizer.all_special_ids`` plus added tokens marked special.

    The second part matters: SmolLM2's ``all_special_ids`` names 3 ids, yet ids 0..16
    (``<repo_name>``, ``<jupyter_code>``, ...) are added special tokens too.
    """
    ids = {int(i) for i in tokenizer.all_special_ids if i is not None}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return ids


def allowed_ids(tokenizer) -> torch.Tensor:
    """Ids a perturbation may draw: ``range(len(tokenizer))`` minus :func:`special_ids`.

    Returns:
        1-D long tensor ``(V - n_special,)``, ascending.
    """
    ids = torch.arange(len(tokenizer), dtype=torch.long)
    return ids[~torch.isin(ids, _as_tensor(special_ids(tokenizer)))]


def _as_tensor(ids: Iterable[int]) -> torch.Tensor:
    return torch.tensor(sorted(ids), dtype=torch.long)


def repetition(
    prompts: Sequence[Sequence[int]], p: float, special: Iterable[int],
    generator: torch.Generator,
) -> Prompts:
    """Repetition noise: per prompt, draw t* uniformly among its non-special positions (so
    frequent ids are likelier), then set each non-special token to t* with probability p.

    Args:
        prompts: N prompts of token ids, lengths L_i (may start/end with BOS/CLS/SEP).
        p: replacement probability in [0, 1]; 0 leaves prompts as they are, 1 makes every
            non-special token t*.
        special: ids never replaced nor drawn (:func:`special_ids`).
        generator: source of every draw.

    Returns:
        N prompts, lengths L_i, special positions untouched.
    """
    special_t = _as_tensor(special)
    device = generator.device
    out = []
    for prompt in prompts:
        ids = torch.as_tensor(list(prompt), dtype=torch.long)
        keep = torch.isin(ids, special_t)
        candidates = ids[~keep]
        if len(candidates) == 0:
            out.append(ids.tolist())
            continue
        pick = torch.randint(len(candidates), (1,), generator=generator, device=device).cpu()
        hit = torch.rand(len(ids), generator=generator, device=device).cpu() < p
        out.append(torch.where(hit & ~keep, candidates[pick], ids).tolist())
    return out


def randomness(
    prompts: Sequence[Sequence[int]], p: float, allowed: torch.Tensor, special: Iterable[int],
    generator: torch.Generator,
) -> Prompts:
    """Randomness noise: each non-special token, with probability p, becomes an id drawn
    uniformly from ``allowed`` (drawn with replacement; it may equal the original by chance).

    Args:
        prompts: N prompts of token ids, lengths L_i.
        p: replacement probability in [0, 1].
        allowed: 1-D long tensor of ids to draw from (:func:`allowed_ids`).
        special: ids kept in place (:func:`special_ids`).
        generator: source of every draw.

    Returns:
        N prompts, lengths L_i, special positions untouched.
    """
    lengths = [len(prompt) for prompt in prompts]
    flat = torch.tensor([i for prompt in prompts for i in prompt], dtype=torch.long)
    device = generator.device
    hit = torch.rand(len(flat), generator=generator, device=device).cpu() < p
    hit &= ~torch.isin(flat, _as_tensor(special))
    draws = allowed.cpu()[
        torch.randint(len(allowed), (len(flat),), generator=generator, device=device).cpu()]
    flat = torch.where(hit, draws, flat)
    return [part.tolist() for part in torch.split(flat, lengths)]


def random_prompts(n: int, T: int, allowed: torch.Tensor, generator: torch.Generator) -> Prompts:
    """N prompts of T ids drawn uniformly (with replacement) from ``allowed``.

    No BOS/CLS/SEP is added: there is no text, so no tokenizer call adds them, and METRICS.md
    asks for exactly T drawn ids.

    Returns:
        list of n lists of T ints (n x T).
    """
    index = torch.randint(len(allowed), (n, T), generator=generator, device=generator.device)
    return allowed.cpu()[index.cpu()].tolist()


def _augmenters() -> list:
    # nlpaug imports transformers and more (seconds): imported only when views are needed.
    import nlpaug.augmenter.char as nac
    import nlpaug.augmenter.word as naw

    # METRICS.md order, default settings. KeyboardAug reads the keyboard map shipped in nlpaug.
    return [naw.SplitAug(), nac.RandomCharAug(), nac.KeyboardAug()]


def _augment_one(augmenters: list, text: str) -> str:
    for augmenter in augmenters:
        out = augmenter.augment(text)  # a list of strings, or [] when nlpaug skips the text
        if out and out[0].strip():
            text = out[0]
    return text


def augment_views(texts: Sequence[str], views: int, seed: int) -> list[list[str]]:
    """Augmented copies of every text: word SplitAug, then char RandomCharAug, then char
    KeyboardAug (nlpaug, default settings).

    nlpaug draws from the global ``random`` and ``numpy.random`` generators: they are seeded
    from ``(seed, view)`` here and restored afterwards, so the call leaves no trace. A step that
    yields nothing (empty or very short text) keeps its input; texts of 1-3 characters come
    back unchanged (nlpaug's minimum lengths).

    Args:
        texts: N strings.
        views: number of augmented copies V.
        seed: the run's seed.

    Returns:
        V x N strings: ``result[v][i]`` is view v of text i.
    """
    augmenters = _augmenters()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        result = []
        for view in range(views):
            py_seed, np_seed = np.random.SeedSequence([seed % 2**64, view]).generate_state(2)
            random.seed(int(py_seed))
            np.random.seed(int(np_seed))
            result.append([_augment_one(augmenters, text) for text in texts])
        return result
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def perturb(
    prompts: Sequence[Sequence[int]], cfg: PerturbationConfig, tokenizer,
    generator: torch.Generator, vocab_size: int | None = None,
) -> Prompts:
    """The prompts as ``cfg.name`` perturbs them.

    ``none`` and ``augment`` return the prompts as they are (augmentation works on texts: see
    :func:`augment_views`); ``random`` returns ``len(prompts)`` prompts of ``cfg.T`` ids,
    replacing the prompts. ``vocab_size`` (the model's embedding rows) caps drawn ids where a
    tokenizer knows more tokens than the model embeds.
    """
    if cfg.name in ("none", "augment"):
        return [list(prompt) for prompt in prompts]
    special = special_ids(tokenizer)
    if cfg.name == "repetition":
        return repetition(prompts, cfg.p, special, generator)
    allowed = allowed_ids(tokenizer)
    if vocab_size is not None:
        allowed = allowed[allowed < vocab_size]
    if cfg.name == "randomness":
        return randomness(prompts, cfg.p, allowed, special, generator)
    if cfg.name == "random":
        return random_prompts(len(prompts), cfg.T, allowed, generator)
    raise ValueError(f"perturbation.name={cfg.name!r} is not handled by perturb")


def perturbation_tags(cfg: PerturbationConfig) -> dict[str, str]:
    """MLflow tags naming the perturbation and the one knob it uses, formatted so that string
    order is numeric order: p as ``0.250``, T as ``00064``, views as ``002``."""
    tags = {"lw.perturbation": cfg.name}
    if cfg.name in ("repetition", "randomness"):
        tags["lw.perturbation.p"] = f"{cfg.p:.3f}"
    elif cfg.name == "random":
        tags["lw.perturbation.T"] = f"{cfg.T:05d}"
    elif cfg.name == "augment":
        tags["lw.perturbation.views"] = f"{cfg.views:03d}"
    return tags
