"""`python -m lw.run`: compose a config with Hydra, run the job, log it to MLflow.

    python -m lw.run model=minilm data=wiki-vital data.n_prompts=32
    python -m lw.run -m model=smollm2,minilm data=wiki-vital,medical-hpo
"""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lw.config import LwConfig, LwError, register_configs, validate
from lw.distributed import current_ranks, from_main, shared_now, together
from lw.identity import job_hash
from lw.job import compute
from lw.plots import depth_curves, entropy_histograms, subject_scatters
from lw.results import JobResult
from lw.resume import Heartbeat, finished_run
from lw.tracking import (
    SKIPPED_FILE,
    client_for,
    experiment_id,
    log_result,
    record_failure,
    save_result_files,
    start_job_run,
)

register_configs()
# Hydra's ${now:} is per process: ranks of one launch must agree on their sweep folder.
OmegaConf.register_new_resolver("lw_now", shared_now, replace=True)
# conf/hydra/launcher/submitit_slurm.yaml replaces the plugin's node of that name on purpose
# (same fields, values from the environment); Hydra 1.3 warns that it checks it against it.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated")


def figures_of(result: JobResult, title: str) -> dict:
    figures = {"metrics_vs_depth": depth_curves(result.table, title)}
    columns = [c for c in result.per_prompt.columns if c.startswith("prompt_entropy/")]
    if columns:
        column = "prompt_entropy/max" if "prompt_entropy/max" in columns else columns[0]
        figures["prompt_entropy_histograms"] = entropy_histograms(
            result.per_prompt, result.table, column, title)
    if "lw.mc.scatter_layers" in result.tags:  # entropy vs accuracy per subject (mc_accuracy)
        layers = [int(layer) for layer in result.tags["lw.mc.scatter_layers"].split(",")]
        figures.update(subject_scatters(result.per_prompt, result.table, layers, title=title))
    return figures


def run_name(job: LwConfig, overrides: list[str]) -> str:
    """Short enough for the MLflow table's default width: the model, then what the sweep
    varies ("smollm2 wiki-vital p=0.5", "pythia-70m step1000"); outside a sweep, the model,
    the data and a perturbation."""
    import os

    from lw.tracking import SWEEP_VARIES_ENV, short_value

    varies = os.environ.get(SWEEP_VARIES_ENV)
    if varies is None:
        parts = [job.data.name] + ([] if job.perturbation.name == "none"
                                   else [job.perturbation.name])
        return " ".join([job.model.name, *parts])
    keys = [k for k in varies.split(",") if k and k != "model"]
    values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return " ".join([job.model.name] + [short_value(k, values[k]) for k in keys if k in values])


def run_job(cfg: DictConfig) -> JobResult | None:
    """Validate, open the MLflow run, compute, log. A failure marks the run FAILED and re-raises.

    Under a multi-process launch every rank runs this; only rank 0 talks to MLflow and writes
    results, and every step ends with the ranks agreeing on how it went (lw.distributed)."""
    ranks = current_ranks()
    job = validate(cfg)
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    name = job.run_name or run_name(job, overrides)
    client = run_id = done = None
    with together("opening the MLflow run", ranks):
        if ranks.is_main:
            client = client_for(job.tracking)
            digest = job_hash(job)
            label = (f"job #{hydra_cfg.job.num} ({name})"
                     if hydra_cfg.mode == RunMode.MULTIRUN else f"job ({name})")
            # Resume: a job with a FINISHED run of the same hash is done (lw.resume).
            found = finished_run(client, experiment_id(client, job.tracking), digest, label)
            if found is not None and not job.tracking.rerun:
                done = found.info.run_id
                print(f"[lw] {label}: skipped, already FINISHED in run {done} "
                      f"(lw.job_hash={digest}; tracking.rerun=true runs it again)",
                      file=sys.stderr)
                if hydra_cfg.mode == RunMode.MULTIRUN:
                    (output_dir / SKIPPED_FILE).write_text(f"{label}: run {done}\n")
            else:
                run_id = start_job_run(client, cfg, name, overrides, digest)
    if from_main(done, ranks) is not None:
        return None
    try:
        with Heartbeat(client, run_id):  # rank 0: the run shows it is alive (lw.resume)
            result = compute(job, ranks)
            with together("saving and logging the results", ranks):
                if ranks.is_main:
                    # Results land on disk first, so a tracking failure cannot lose them.
                    save_result_files(result, output_dir / "results")
                    log_result(client, run_id, result, figures_of(result, name),
                               {"lw.output_dir": str(output_dir)})
                    client.set_terminated(run_id, "FINISHED")
        return result
    except BaseException as error:
        if run_id is not None:
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
        record_failure(f"#{HydraConfig.get().job.num} "
                       f"{' '.join(HydraConfig.get().overrides.task)}: "
                       f"{type(error).__name__}: {error}", HydraConfig.get().runtime.output_dir)
    # Under -m a failed job is FAILED in MLflow and the sweep goes on; the parent run's
    # callback reports the failures and sets the exit status at the end.


if __name__ == "__main__":
    main()
