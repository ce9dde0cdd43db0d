"""One job as stages (no tracking here):

    plan (prompts, perturbation, views; from the job's seed, before any model loads)
      -> forward (one process, this rank's share of N ranks, or an activation-cache hit)
      -> products (pooled vectors, per-prompt spectra and values), gathered on rank 0
      -> measure (metrics -> the per-layer results table), rank 0 only

The forward products are one value (``lw.cache.PassProducts``) whichever way they came, so the
metrics never know whether they came from 1 process, 8 GPUs or the disk.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from lw.config.schema import LwConfig
from lw.errors import LwError
from lw.job import cache, sublayers
from lw.job.distributed import Ranks, from_main, gather_extraction, shard, together
from lw.job.encoder import job_mteb_scores
from lw.job.extract import Extraction, extract
from lw.job.identity import forward_hash
from lw.job.perturb import augment_views, perturb
from lw.job.results import JobResult, add_prompt_columns, build_result
from lw.loading.models import LoadedModel, embedding_rows, load_model, load_tokenizer
from lw.loading.prompts import Question, corpus_texts, load_prompts, tokenize
from lw.metrics import registry
from lw.metrics.registry import token_products_needed, views_needed

SINGLE = Ranks()


@dataclass
class JobPlan:
    """What the job measures, drawn from its seed: the same on every rank."""

    ids: list[list[int]]               # the prompts measured (after the perturbation)
    texts: list[str]                   # their texts (decoded when a perturbation changed ids)
    labels: list[str] | None           # data.label_field values
    view_ids: list[list[int]]          # n_views x N augmented copies, view-major; [] if none
    n_views: int
    views_seed: int                    # nlpaug's seed: view j is the same for any n_views > j
    generator: torch.Generator         # after the plan's draws: DiME's permutations follow
    questions: list[Question] | None = None  # multiple-choice data: subject, answer per prompt
    # What the views are copies of: "text" (the prompts' own text) or "decoded_ids" (the
    # perturbed ids decoded to text, which re-tokenizes to other ids for some prompts), and
    # the share of prompts whose text re-tokenizes to exactly the ids measured.
    views_of: str = "text"
    views_roundtrip: float = float("nan")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LwError(f"extraction.device={name}: no CUDA device here; use auto or cpu")
    return device


def _draw_seed(generator: torch.Generator) -> int:
    """A seed for libraries with their own RNG (nlpaug), drawn from the job's generator."""
    return int(torch.randint(2**31 - 1, (1,), generator=generator))


def job_prompts(job: LwConfig, tokenizer, generator: torch.Generator,
                vocab_size: int | None = None):
    """The prompts the job measures (token ids, after its perturbation), their texts, labels
    (None without data.label_field) and questions (None but for multiple-choice data)."""
    prompts = load_prompts(job.data, tokenizer)
    p = job.perturbation
    if p.name == "augment":
        # views augmented copies of every prompt, each measured as a prompt of its own
        texts = [t for view in augment_views(prompts.texts, p.views, seed=_draw_seed(generator))
                 for t in view]
        labels = prompts.labels * p.views if prompts.labels else None
        questions = prompts.questions * p.views if prompts.questions else None
        return tokenize(tokenizer, texts, job.data.max_tokens), texts, labels, questions
    ids = perturb(prompts.input_ids, p, tokenizer, generator, vocab_size)
    if p.name == "none":
        return ids, prompts.texts, prompts.labels, prompts.questions
    questions = None if p.name == "random" else prompts.questions  # random: no questions left
    return ids, tokenizer.batch_decode(ids, skip_special_tokens=True), prompts.labels, questions


def plan_job(job: LwConfig, tokenizer) -> JobPlan:
    """Prompts, perturbation and augmented views, from the job's seed (no model needed)."""
    torch.manual_seed(job.seed)
    generator = torch.Generator().manual_seed(job.seed)
    rows = embedding_rows(job.model, tokenizer)
    ids, texts, labels, questions = job_prompts(job, tokenizer, generator, rows)
    highest = max(max(prompt) for prompt in ids)
    if highest >= rows:  # the embedding lookup would fail deep in the forward pass
        raise LwError(f"model {job.model.name} embeds token ids below {rows} (its vocab_size) "
                      f"but tokenizer {job.model.tokenizer or job.model.id!r} gives id "
                      f"{highest}; set model.arch_config.vocab_size >= {highest + 1}")
    if job.extraction.skip_first >= min(map(len, ids)):
        raise LwError(f"extraction.skip_first={job.extraction.skip_first} leaves no token of "
                      f"the shortest prompt ({min(map(len, ids))} tokens); raise "
                      "data.min_tokens")
    n_views, views_seed = views_needed(job), _draw_seed(generator)
    view_ids = view_prompts(texts, n_views, views_seed, tokenizer, job.data.max_tokens)
    plan = JobPlan(ids, texts, labels, view_ids, n_views, views_seed, generator, questions)
    registry.check_plan(job, tokenizer, plan)  # fails here, before the model loads
    if n_views:
        # nlpaug works on text: the views are copies of the measured prompts only as far as
        # their text re-tokenizes to the measured ids, which decoded random ids often do not.
        plan.views_of = "text" if job.perturbation.name in ("none", "augment") else "decoded_ids"
        again = tokenize(tokenizer, texts, job.data.max_tokens)
        plan.views_roundtrip = sum(a == b for a, b in zip(again, ids, strict=True)) / len(ids)
        if plan.views_roundtrip < 1:
            say(f"views: nlpaug copies of {plan.views_of} text; only "
                f"{plan.views_roundtrip:.0%} of the prompts re-tokenize to the ids measured")
    return plan


def view_prompts(texts: list[str], n_views: int, seed: int, tokenizer,
                 max_tokens: int) -> list[list[int]]:
    """Token ids of ``n_views`` nlpaug copies of every text, view-major (n_views x N)."""
    if not n_views:
        return []
    views = augment_views(texts, n_views, seed=seed)
    return [prompt for view in views for prompt in tokenize(tokenizer, view, max_tokens)]


def check_context(job: LwConfig, loaded: LoadedModel, plan: JobPlan) -> None:
    longest = max(map(len, plan.ids + plan.view_ids))
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context is not None and longest > context:
        knob = (f"perturbation.T={job.perturbation.T}" if job.perturbation.name == "random"
                else f"data.max_tokens={job.data.max_tokens}")
        raise LwError(f"prompts of {longest} tokens ({knob}) exceed model {job.model.name}'s "
                      f"context of {context} positions; set at most {context}")


def forward_stage(job: LwConfig, loaded: LoadedModel, plan: JobPlan, device: torch.device,
                  ranks: Ranks = SINGLE, products: list[str] | None = None,
                  n_views: int | None = None,
                  view_ids: list[list[int]] | None = None) -> cache.PassProducts | None:
    """The forward pass over this rank's share of the prompts (and of the views), gathered on
    rank 0 (None elsewhere). ``products`` / ``n_views`` / ``view_ids``: what to keep (default:
    what the job's metrics need)."""
    products = token_products_needed(job) if products is None else products
    n_views = plan.n_views if n_views is None else n_views
    view_ids = plan.view_ids if view_ids is None else view_ids
    batching = dict(batch_size=job.extraction.batch_size, skip_first=job.extraction.skip_first,
                    device=device, pooling=job.extraction.pooling, progress=ranks.is_main)
    jobs = [("prompts", plan.ids, sublayers.token_functions(job, loaded, products))]
    if n_views:
        jobs.append((f"{n_views} views", view_ids, {}))
    started = time.perf_counter()
    gathered: list[Extraction | None] = []
    for what, prompts, token_fns in jobs:
        shares = shard([len(p) for p in prompts], ranks.world)
        with together(f"the forward pass over {what}", ranks):
            mine = extract(loaded, [prompts[i] for i in shares[ranks.rank]],
                           token_metrics=token_fns,
                           desc=f"{job.model.name} {job.data.name} {what}", **batching)
        with together(f"gathering the products of the forward pass over {what}", ranks):
            whole = gather_extraction(mine, shares, len(prompts), ranks)
            if whole is not None:
                whole.n_tokens = torch.tensor([len(p) for p in prompts])
        gathered.append(whole)
    if not ranks.is_main:
        return None
    return cache.PassProducts(info=loaded.info, prompts=gathered[0],
                              views=gathered[1] if n_views else None, n_views=n_views,
                              forward_seconds=time.perf_counter() - started)


def measure(job: LwConfig, products: cache.PassProducts, plan: JobPlan,
            loaded: LoadedModel | None = None, device: torch.device | None = None) -> JobResult:
    """Every metric of the job from the forward products: the per-layer results table."""
    info, prompts = products.info, products.prompts
    rows = (prompts.n_tokens - job.extraction.skip_first).clamp(min=0)
    views = None
    if plan.n_views:
        n = len(plan.ids)
        views = products.views.pooled[:plan.n_views * n]                    # (J N, L+1, D)
        views = views.view(plan.n_views, n, *views.shape[1:]).permute(1, 2, 0, 3)

    def model() -> LoadedModel:  # an activation-cache hit loaded none: load it when asked
        nonlocal loaded
        if loaded is None:
            loaded = load_model_once(job.model, device or pick_device(job.extraction.device),
                                     job.seed)
        return loaded

    inputs = registry.Inputs(
        job=job, knobs=None, info=info, pooled=prompts.pooled, products=prompts.per_prompt,
        rows=rows, values={}, per_layer={}, views=views, labels=plan.labels, texts=plan.texts,
        questions=plan.questions, generator=plan.generator, device=device, load_model=model,
        corpus=corpus_texts,
        mteb=lambda tasks, folder: job_mteb_scores(job, model(), device, tasks, folder),
        sublayers=job.extraction.sublayers and sublayers.supported(info.architecture))
    sublayers.announce(job, info, token_products_needed(job))
    outputs = registry.measure(job, inputs)
    per_prompt = {name: value for name, value in prompts.per_prompt.items()
                  if name.startswith("token_norm/")}
    per_layer: dict[str, torch.Tensor] = {}
    for out in outputs:
        per_prompt.update(out.per_prompt)
        per_layer.update(out.per_layer)
    result = build_result(info, per_prompt, per_layer, prompts.n_tokens,
                          registry.summaries_of(job), registry.scores_of(job),
                          registry.agreement_of(job))
    for out in outputs:
        add_prompt_columns(result, out.columns)
        result.summary.update(out.summary)
        result.tags.update(out.tags)
        result.tables.update(out.tables)
        result.figures.update(out.figures)
    if job.extraction.log_pooled:
        result.pooled = (prompts.pooled, list(plan.texts))
    if plan.n_views:
        result.tags["lw.views.of"] = plan.views_of
        result.summary["views/roundtrip_share"] = plan.views_roundtrip
    result.summary.update({"n_prompts": float(len(plan.ids)),
                           "n_tokens": float(prompts.n_tokens.sum()),
                           "forward_seconds": products.forward_seconds,
                           "activation_cache_hit": float(products.from_cache),
                           "prompts_per_second": len(plan.ids) / products.forward_seconds})
    return result


def say(message: str, ranks: Ranks = SINGLE) -> None:
    if ranks.is_main:
        print(f"[lw] {message}", file=sys.stderr)


# The last model this process loaded: a launcher's worker (joblib) running jobs of one model
# one after another loads it once. Loading touches no global RNG (models.py forks it).
_LAST_MODEL: dict = {}


def load_model_once(cfg, device: torch.device, seed: int) -> LoadedModel:
    key = (repr(cfg), str(device), seed)
    if key not in _LAST_MODEL:
        _LAST_MODEL.clear()  # one model at a time: the previous one is freed first
        _LAST_MODEL[key] = load_model(cfg, device, seed=seed)
    return _LAST_MODEL[key]


_LAST_TOKENIZER: dict = {}


def load_tokenizer_once(cfg):
    """The model's tokenizer, read once per process for consecutive jobs of the model (lw
    never changes a tokenizer after loading it)."""
    key = repr(cfg)
    if key not in _LAST_TOKENIZER:
        _LAST_TOKENIZER.clear()
        _LAST_TOKENIZER[key] = load_tokenizer(cfg)
    return _LAST_TOKENIZER[key]


def compute(job: LwConfig, ranks: Ranks = SINGLE) -> JobResult | None:
    """The whole job, no tracking: plan -> forward (or cache) -> measure. On rank 0 the
    result; on other ranks None (they only run their share of the forward pass)."""
    with together("planning the prompts", ranks):
        if job.extraction.cache and ranks.is_main:
            cache.check()  # a bad LW_CACHE_DIR / LW_CACHE_MAX_GB: said before the model loads
        plan = plan_job(job, load_tokenizer_once(job.model))
    products = None
    key = forward_hash(job) if job.extraction.cache else None
    needed, n_views = token_products_needed(job), plan.n_views
    if key is not None:
        with together("reading the activation cache", ranks):
            found = cache.load(key) if ranks.is_main else None
            missing = found.missing(needed, n_views) if found is not None else None
        if from_main(found is not None and not missing, ranks):
            products = found
            say(f"activation cache hit {key}: no model loaded, no forward pass", ranks)
        elif found is not None:
            say(f"activation cache entry {key} lacks {', '.join(missing)}: running the "
                "forward pass", ranks)
            # Keep what the entry had, so the rewritten entry serves both jobs.
            needed = sorted(set(needed) | {name for name in found.prompts.per_prompt
                                           if not name.startswith("token_norm/")})
            n_views = max(n_views, found.n_views)
        else:
            say(f"activation cache miss {key}: running the forward pass", ranks)
        # Only rank 0 read the entry: every rank must compute the same products.
        needed, n_views = from_main((needed, n_views), ranks)
    loaded, device = None, ranks.device or pick_device(job.extraction.device)
    if products is None or registry.needs(job, "model"):
        with together("loading the model", ranks):
            loaded = load_model_once(job.model, device, job.seed)
            check_context(job, loaded, plan)
    if products is None:
        views = plan.view_ids
        if n_views > plan.n_views:  # the entry had more views than this job needs
            views = view_prompts(plan.texts, n_views, plan.views_seed, loaded.tokenizer,
                                 job.data.max_tokens)
        products = forward_stage(job, loaded, plan, device, ranks, needed, n_views, views)
        if key is not None:
            with together("storing the activation cache entry", ranks):
                if ranks.is_main:
                    cache.store(key, products)
    # Rank 0 measures alone; the other ranks wait in the agreement (no collective timeout:
    # lw.distributed), so a failure here ends the job on every rank, in step.
    result = None
    with together("measuring the metrics", ranks):
        if ranks.is_main:
            result = measure(job, products, plan, loaded, device)
    return result
