"""`python -m lw.run`: compose a config with Hydra, run the job, log it to MLflow.

    python -m lw.run model=minilm data=wiki-vital data.n_prompts=32
    python -m lw.run -m model=smollm2,minilm data=wiki-vital,medical-hpo
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lw.config import LwConfig, LwError, register_configs, validate
from lw.data import load_prompts, tokenize
from lw.extract import extract
from lw.metrics import (
    downstream_metrics,
    pooled_metrics,
    token_metrics,
    view_metrics,
    views_needed,
)
from lw.models import PROJECT_ROOT, load_model
from lw.perturb import augment_views, perturb
from lw.plots import depth_curves, entropy_histograms
from lw.results import JobResult, build_result
from lw.tracking import (
    FAILED_JOBS,
    client_for,
    log_result,
    save_result_files,
    start_job_run,
)

register_configs()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LwError(f"extraction.device={name}: no CUDA device here; use auto or cpu")
    return device


def job_prompts(job: LwConfig, tokenizer, generator: torch.Generator,
                vocab_size: int | None = None):
    """The prompts the job measures (token ids, after its perturbation), their texts and
    labels (None without data.label_field)."""
    prompts = load_prompts(job.data, tokenizer)
    p = job.perturbation
    if p.name == "augment":
        # views augmented copies of every prompt, each measured as a prompt of its own
        texts = [t for view in augment_views(prompts.texts, p.views, seed=_draw_seed(generator))
                 for t in view]
        labels = prompts.labels * p.views if prompts.labels else None
        return tokenize(tokenizer, texts, job.data.max_tokens), texts, labels
    ids = perturb(prompts.input_ids, p, tokenizer, generator, vocab_size)
    if p.name == "none":
        return ids, prompts.texts, prompts.labels
    return ids, tokenizer.batch_decode(ids, skip_special_tokens=True), prompts.labels


def _draw_seed(generator: torch.Generator) -> int:
    """A seed for libraries with their own RNG (nlpaug), drawn from the job's generator."""
    return int(torch.randint(2**31 - 1, (1,), generator=generator))


def compute(job: LwConfig) -> JobResult:
    """Prompts -> one forward pass -> per-layer metrics: the whole job, no tracking."""
    torch.manual_seed(job.seed)
    generator = torch.Generator().manual_seed(job.seed)
    device = pick_device(job.extraction.device)
    loaded = load_model(job.model, device, seed=job.seed)
    vocab_size = loaded.model.get_input_embeddings().num_embeddings
    ids, texts, labels = job_prompts(job, loaded.tokenizer, generator, vocab_size)
    shortest, longest = min(map(len, ids)), max(map(len, ids))
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context is not None and longest > context:
        knob = (f"perturbation.T={job.perturbation.T}" if job.perturbation.name == "random"
                else f"data.max_tokens={job.data.max_tokens}")
        raise LwError(f"prompts of {longest} tokens ({knob}) exceed model {job.model.name}'s "
                      f"context of {context} positions; set at most {context}")
    if job.extraction.skip_first >= shortest:
        raise LwError(f"extraction.skip_first={job.extraction.skip_first} leaves no token of "
                      f"the shortest prompt ({shortest} tokens); raise data.min_tokens")
    batching = dict(batch_size=job.extraction.batch_size, skip_first=job.extraction.skip_first,
                    device=device)
    started = time.perf_counter()
    extraction = extract(loaded, ids, token_metrics=token_metrics(job),
                         desc=f"{job.model.name} {job.data.name}", **batching)
    seconds = time.perf_counter() - started
    per_layer = pooled_metrics(job, extraction.pooled)
    if labels is not None:
        per_layer.update(downstream_metrics(job, extraction.pooled, labels))
    if views_needed(job):
        per_layer.update(view_metrics(job, pooled_views(job, loaded, texts, generator, batching),
                                      generator))
    if "mteb" in job.metrics:
        per_layer.update(mteb_scores(job, loaded, device))
    norms = job.metric.normalizations
    dip_of = None
    if "dip" in job.metrics:
        dip_of = f"prompt_entropy/{'max' if 'max' in norms else norms[0]}"
    result = build_result(loaded.info, extraction.per_prompt, per_layer, extraction.n_tokens,
                          dip_of)
    result.summary.update({"n_prompts": float(len(ids)),
                           "n_tokens": float(extraction.n_tokens.sum()),
                           "prompts_per_second": len(ids) / seconds})
    return result


def pooled_views(job: LwConfig, loaded, texts: list[str], generator: torch.Generator,
                 batching: dict) -> torch.Tensor:
    """Pooled vectors (N, L+1, J, D) of J nlpaug copies of every prompt, J as the view
    metrics need; taken with the same batched pass as the prompts themselves."""
    n_views = views_needed(job)
    views = augment_views(texts, n_views, seed=_draw_seed(generator))
    ids = [prompt for view in views
           for prompt in tokenize(loaded.tokenizer, view, job.data.max_tokens)]
    pooled = extract(loaded, ids, desc=f"{n_views} views", **batching).pooled  # (J N, L+1, D)
    return pooled.view(n_views, len(texts), *pooled.shape[1:]).permute(1, 2, 0, 3)


def mteb_scores(job: LwConfig, loaded, device: torch.device) -> dict[str, torch.Tensor]:
    """Every layer's MTEB main score per task, one forward pass per task's sentences."""
    from lw.encoder import LayerwiseEncoder, run_mteb

    encoder = LayerwiseEncoder(loaded, batch_size=job.extraction.batch_size,
                               max_tokens=job.data.max_tokens,
                               skip_first=job.extraction.skip_first, device=device)
    folder = job.metric.mteb.output_folder or PROJECT_ROOT / "mteb-results"
    frame = run_mteb(encoder, list(job.metric.mteb.tasks), output_folder=folder)
    curves = frame.pivot(index="layer", columns="task", values="main_score").sort_index()
    values = {f"mteb/{task}": torch.tensor(curves[task].to_numpy()) for task in curves}
    values["mteb/mean"] = torch.tensor(curves.mean(axis=1).to_numpy())
    return values


def figures_of(result: JobResult, title: str) -> dict:
    figures = {"metrics_vs_depth": depth_curves(result.table, title)}
    columns = [c for c in result.per_prompt.columns if c.startswith("prompt_entropy/")]
    if columns:
        column = "prompt_entropy/max" if "prompt_entropy/max" in columns else columns[0]
        figures["prompt_entropy_histograms"] = entropy_histograms(
            result.per_prompt, result.table, column, title)
    return figures


def run_name(job: LwConfig, overrides: list[str]) -> str:
    """"smollm2 wiki-vital repetition perturbation.p=0.5": the choices, then the other knobs
    (where results are stored is left out: it is the same for every job of a sweep)."""
    groups = ("model=", "data=", "perturbation=", "tracking", "hydra.", "+experiment=")
    return " ".join([job.model.name, job.data.name, job.perturbation.name]
                    + [o for o in overrides if not o.lstrip("+~").startswith(groups)])


def run_job(cfg: DictConfig) -> JobResult:
    """Validate, open the MLflow run, compute, log. A failure marks the run FAILED and re-raises."""
    job = validate(cfg)
    client = client_for(job.tracking)
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    name = job.run_name or run_name(job, overrides)
    run_id = start_job_run(client, cfg, name, overrides)
    try:
        result = compute(job)
        # Results land on disk first, so a tracking failure cannot lose them.
        save_result_files(result, output_dir / "results")
        figures = figures_of(result, name)
        log_result(client, run_id, result, figures, {"lw.output_dir": str(output_dir)})
        client.set_terminated(run_id, "FINISHED")
        return result
    except BaseException as error:
        client.set_tag(run_id, "lw.error", f"{type(error).__name__}: {error}"[:5000])
        client.log_text(run_id, traceback.format_exc(), "error.txt")
        client.set_terminated(run_id, "FAILED")
        raise


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run_job(cfg)
    except Exception as error:
        if isinstance(error, LwError):  # the user's to fix: the message says what and how
            job = f" in job #{HydraConfig.get().job.num}" if multirun else ""
            print(f"[lw] error{job}: {error}", file=sys.stderr)
        else:
            traceback.print_exc()
        if not multirun:
            sys.exit(1)
        FAILED_JOBS.append(f"#{HydraConfig.get().job.num} "
                           f"{' '.join(HydraConfig.get().overrides.task)}: "
                           f"{type(error).__name__}: {error}")
    # Under -m a failed job is FAILED in MLflow and the sweep goes on; the parent run's
    # callback reports the failures and sets the exit status at the end.


if __name__ == "__main__":
    main()
