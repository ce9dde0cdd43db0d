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

from lw.config.schema import register_configs, validate
from lw.errors import LwError
from lw.job.distributed import current_ranks, shared_now
from lw.job.results import JobResult
from lw.job.stages import compute
from lw.loading.paths import CONF_DIR
from lw.sweep.callback import record_failure
from lw.sweep.checks import check_override_values, user_error
from lw.sweep.logged import logged_job, short_name
from lw.sweep.names import run_name
from lw.tracking.health import ResultsKept
from lw.tracking.resume import die_with_sweep

register_configs()
# Hydra's ${now:} is per process: ranks of one launch must agree on their sweep folder.
# use_cache: Hydra copies the sweep config's resolver cache into every job's config
# (load_sweep_config), so joblib workers and SLURM tasks read the parent's value instead of
# their own clock (which would put their job folders outside the sweep folder it checks).
OmegaConf.register_new_resolver("lw_now", shared_now, use_cache=True, replace=True)
# conf/hydra/launcher/submitit_{slurm,local}.yaml replace the plugin's nodes on purpose
# (same fields, values from the environment); Hydra 1.3 warns that it checks it against it.
warnings.filterwarnings("ignore",
                        message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated")


def run_job(cfg: DictConfig) -> JobResult | None:
    """Validate, then the logged job (lw.sweep.logged): claim its MLflow run, compute, log. A
    failure marks the run FAILED and re-raises. None when the job is skipped (done, or being
    done by another launch)."""
    ranks = current_ranks()
    job = validate(cfg)
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    name = job.run_name or run_name(job, overrides)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    label = f"job #{hydra_cfg.job.num} ({short_name(name)})" if multirun \
        else f"job ({short_name(name)})"
    result, _ = logged_job(cfg, job, name, overrides, label,
                           Path(hydra_cfg.runtime.output_dir),
                           lambda: compute(job, ranks), ranks, in_sweep=multirun)
    return result


def main() -> None:
    """The command: the command line's values checked (one line for one that its field cannot
    hold), then Hydra's run or sweep of :func:`hydra_main`."""
    check_override_values(sys.argv[1:])
    hydra_main()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    die_with_sweep()  # a worker of the sweep's process ends with it (lw.resume)
    try:
        run_job(cfg)
    except Exception as caught:
        kept = caught if isinstance(caught, ResultsKept) else caught.__cause__
        if isinstance(kept, ResultsKept):
            # computed, its store away: the job's last line says where its results wait
            job = f" #{HydraConfig.get().job.num}" if multirun else ""
            print(f"[lw] job{job}: {kept}", file=sys.stderr, flush=True)
            if not multirun:
                sys.exit(1)
            return  # the sweep counts its folder (KEPT_FILE) and exits non-zero
        error = user_error(caught, cfg)
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
