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
from lw.data import load_prompts
from lw.extract import extract
from lw.metrics import pooled_metrics, token_metrics
from lw.models import load_model
from lw.plots import depth_curves, entropy_histograms
from lw.results import JobResult, build_result
from lw.tracking import client_for, log_result, save_result_files, start_job_run

register_configs()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LwError(f"extraction.device={name}: no CUDA device here; use auto or cpu")
    return device


def compute(job: LwConfig) -> JobResult:
    """Prompts -> one forward pass -> per-layer metrics: the whole job, no tracking."""
    torch.manual_seed(job.seed)
    device = pick_device(job.extraction.device)
    loaded = load_model(job.model, device, seed=job.seed)
    prompts = load_prompts(job.data, loaded.tokenizer)
    shortest = min(len(ids) for ids in prompts.input_ids)
    if job.extraction.skip_first >= shortest:
        raise LwError(f"extraction.skip_first={job.extraction.skip_first} leaves no token of "
                      f"the shortest prompt ({shortest} tokens); raise data.min_tokens")
    started = time.perf_counter()
    extraction = extract(loaded, prompts.input_ids, batch_size=job.extraction.batch_size,
                         skip_first=job.extraction.skip_first,
                         token_metrics=token_metrics(job), device=device,
                         desc=f"{job.model.name} {job.data.name}")
    seconds = time.perf_counter() - started
    norms = job.metric.normalizations
    dip_of = None
    if "dip" in job.metrics:
        dip_of = f"prompt_entropy/{'max' if 'max' in norms else norms[0]}"
    result = build_result(loaded.info, extraction.per_prompt,
                          pooled_metrics(job, extraction.pooled), extraction.n_tokens, dip_of)
    result.summary.update({"n_prompts": float(len(prompts.input_ids)),
                           "n_tokens": float(extraction.n_tokens.sum()),
                           "prompts_per_second": len(prompts.input_ids) / seconds})
    return result


def figures_of(result: JobResult, title: str) -> dict:
    figures = {"metrics_vs_depth": depth_curves(result.table, title)}
    columns = [c for c in result.per_prompt.columns if c.startswith("prompt_entropy/")]
    if columns:
        column = "prompt_entropy/max" if "prompt_entropy/max" in columns else columns[0]
        figures["prompt_entropy_histograms"] = entropy_histograms(
            result.per_prompt, result.table, column, title)
    return figures


def run_job(cfg: DictConfig) -> JobResult:
    """Validate, open the MLflow run, compute, log. A failure marks the run FAILED and re-raises."""
    job = validate(cfg)
    client = client_for(job.tracking)
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    name = job.run_name or " ".join([job.model.name, job.data.name, job.perturbation.name]
                                    + [o for o in overrides
                                       if not o.startswith(("model=", "data=", "perturbation="))])
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
    except LwError as error:
        print(f"[lw] error: {error}", file=sys.stderr)
        if not multirun:
            sys.exit(1)
    except Exception:
        traceback.print_exc()
        if not multirun:
            sys.exit(1)
    # Under -m a failed job is FAILED in MLflow and the sweep goes on; the parent run's
    # callback reports the failures and sets the exit status at the end.


if __name__ == "__main__":
    main()
