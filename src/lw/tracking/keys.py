"""What a run logs: every tag, param, metric key and artifact, declared once.

Patterns are shell-style (``fnmatch``): ``*`` stands for any text. The docs' reference page is
generated from these lists, and tests/test_sweep.py checks that every tag and artifact a real
sweep logs matches one of them (a new key without a line here fails the test).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class Key:
    pattern: str
    meaning: str
    on: str = "job"  # job: each job's run; parent: the sweep's parent run (or a comparison's
    #                  run, python -m lw.crossmodel <run id>...); both; training: the training
    #                  run lw.LayerwiseCallback logs under (its measurements are its children)


TAGS: tuple[Key, ...] = (
    # What the job is
    Key("lw.model", "the model option (`model=`)"),
    Key("lw.model.id", "the hub id the weights are, or stand for"),
    Key("lw.model.revision", "the revision measured (a hub branch, tag or commit; "
        "`random-init-seed<N>` for random weights)"),
    Key("lw.model.commit", "the hub commit that revision resolved to"),
    Key("lw.model.same_weights", "a sweep over revisions: the revisions (this one among them) "
        "whose weight files have the same sha256, so their curves coincide"),
    Key("lw.model.family", "decoder, encoder or ssm"),
    Key("lw.model.n_layers", "L: the run's curves have L+1 points (0 = embeddings)"),
    Key("lw.model.*", "the rest of the model's shape (hidden_size, n_params, ...: "
        "`results/model.json`)"),
    Key("lw.data", "the data option (`data=`)"),
    Key("lw.data.commit", "the hub data set's resolved commit"),
    Key("lw.perturbation", "the perturbation option"),
    Key("lw.perturbation.*", "its knobs, zero-padded so they sort (p, T, views)"),
    Key("lw.skip_first", "`extraction.skip_first`"),
    Key("lw.seed", "`seed`"),
    Key("lw.views.of", "augmentation metrics: what the views augment: the prompts' text, or "
        "perturbed ids decoded to text (decoded_ids)"),
    Key("lw.mc.scatter_layers", "mc_accuracy: the layers of its entropy-vs-accuracy scatter"),
    Key("lw.layer_distance.prunable", "layer_distance: the layers whose removal changes the "
        "stream least"),
    # Identity and resume
    Key("lw.job_hash", "the job's identity (docs: explanation/identity.md); a re-run with the "
        "same hash finds this run"),
    Key("lw.job_key", "the job as configured, before data and weights are hashed"),
    Key("lw.overrides", "the command-line overrides of the job (or the sweep)", "both"),
    Key("lw.output_dir", "the job's folder on the machine that ran it"),
    Key("lw.sweep_dir", "the sweep's folder", "parent"),
    Key("lw.jobs", "the sweep's number of jobs", "parent"),
    Key("lw.failed_jobs", "how many failed or did not finish", "parent"),
    Key("lw.skipped_jobs", "how many were found done already and skipped", "parent"),
    # Who ran it, where
    Key("lw.version", "lw's version", "both"),
    Key("lw.git_commit", "lw's commit when run from its checkout (-dirty: with local "
        "changes), else unknown", "both"),
    Key("lw.host", "the machine", "both"),
    Key("lw.pid", "the process (a RUNNING run whose process is gone is taken over)", "both"),
    Key("lw.pid_started", "that process's start time (pids are reused)", "both"),
    Key("lw.heartbeat", "the last time the owner said it was alive (seconds since 1970)",
        "both"),
    Key("lw.slurm_task", "the SLURM task (`<array job>_<index>` or the job id)", "both"),
    Key("lw.error", "why the job failed, one line"),
    Key("lw.killed_by", "who marked a dead run KILLED, and why", "both"),
    Key("lw.crossmodel.of", "a comparison's run: the run ids it compares", "parent"),
    Key("lw.crossmodel.measure", "a comparison's run: the pairwise measure", "parent"),
    Key("lw.synced_from", "the job folder `python -m lw.sync` logged this run from"),
    Key("lw.train.step", "a measurement during training (lw.LayerwiseCallback): the training "
        "step it measured; its parent is the training run"),
    # MLflow's own, set by lw
    Key("mlflow.parentRunId", "the sweep's parent run (a measurement during training: the "
        "training run)"),
    Key("mlflow.runName", "the run's name: what the sweep varies (`smollm2 wiki-vital`)",
        "both"),
    Key("mlflow.runColor", "one colour per model, the same in every sweep"),
    Key("mlflow.user", "MLFLOW_TRACKING_USERNAME on a server, else the OS user", "both"),
    Key("mlflow.source.name", "lw.run (lw.training on a training run lw.LayerwiseCallback "
        "opened itself)", "both"),
    Key("mlflow.source.type", "LOCAL", "both"),
    Key("mlflow.loggedArtifacts", "the tables MLflow's UI lists (results/table.json)"),
)

PARAMS: tuple[Key, ...] = (
    Key("<group>.<option>", "every option of the composed config, flattened (`model.name`, "
        "`data.n_prompts`, `metric.lidar.J`, ...: docs reference/config.md); values are cut "
        "at MLflow's 6,000 characters, the whole config is `config/config.yaml`"),
)

# Besides these, each metric's own per-layer series (its ``logs`` in the registry: the docs'
# reference/metrics.md names them), logged with step = layer (0 = embeddings .. L).
METRICS: tuple[Key, ...] = (
    Key("depth/*", "each per-layer series again over relative depth: step = round(1000 x "
        "layer / L), so models of different depths overlay in MLflow's charts"),
    Key("summary/*", "per-job numbers: the layer where a series takes its extreme "
        "(`summary/<series>/min_layer`, `..._depth` its relative depth), best layers of "
        "downstream scores and the metrics' agreement with them"),
    Key("nan_count/*", "how many of that series' values are NaN, over prompts and layers "
        "(NaN means undefined: identical prompts, too few tokens); per-layer means skip them"),
    Key("token_norm/max_over_median", "per layer: the largest token norm over the median one, "
        "averaged over prompts (hundreds: a massive activation, docs: "
        "explanation/first-token.md)"),
    Key("token_norm/argmax_position", "per layer: the position of the largest-norm token, "
        "averaged over prompts"),
    Key("views/roundtrip_share", "augmentation metrics: the share of prompts whose text "
        "re-tokenizes to exactly the ids measured (`lw.views.of` says which text was "
        "augmented)"),
    Key("cross_*/*/depth_diagonal", "the cross-model comparison at equal relative depth, "
        "averaged over a's layers", "parent"),
    Key("cross_*/*/n_prompts", "the prompts both models measured", "parent"),
    Key("cross_*/*/depth_diagonal_*", "with `calibrate=true`: the same of the permutation "
        "null (`_null`) and of the calibrated score (`_calibrated`)", "parent"),
    Key("n_prompts", "the prompts measured"),
    Key("n_tokens", "the tokens measured"),
    Key("forward_seconds", "the forward pass's time"),
    Key("prompts_per_second", "prompts over forward_seconds"),
    Key("activation_cache_hit", "1 when the forward pass came from the activation cache"),
)

ARTIFACTS: tuple[Key, ...] = (
    Key("config/config.yaml", "the composed config"),
    Key("config/overrides.yaml", "the command-line overrides"),
    Key("config/identity.json", "what the job's identity hashes (docs: explanation/"
        "identity.md)"),
    Key("results/table.csv", "one row per layer: layer, depth (0..1), one column per series"),
    Key("results/table.json", "the same table, for MLflow's table view"),
    Key("results/per_prompt.parquet", "one row per (prompt, layer) of the per-prompt series"),
    Key("results/model.json", "the model's shape (n_layers, hidden_size, ...)"),
    Key("results/summary.json", "the summary numbers"),
    Key("results/*.csv", "a metric's own tables (`cka_matrix.csv`, ...)"),
    Key("results/pooled.pt", "`extraction.log_pooled=true`: the pooled vectors (float16) and "
        "each prompt's text hash, what `python -m lw.crossmodel <run id>...` compares"),
    Key("figures/*.png", "the job's figures (`metrics_vs_depth.png`, histograms, a metric's "
        "own); on the parent, the cross-model heat maps (`cross_cka_<a>__<b>.png`)", "both"),
    Key("layers/table.csv", "lw.LayerwiseCallback: every measurement so far, long: step, "
        "layer, depth (0..1), metric (a per-layer series), value", "training"),
    Key("layers/*.png", "lw.LayerwiseCallback: a heat map per series over (training step x "
        "relative depth), redrawn after each measurement", "training"),
    Key("error.txt", "a failed job's error and traceback (also in its folder)"),
    Key("report/*", "`python -m lw.report --all`: the sweep's report page and figures",
        "parent"),
    Key("cross_*/*.csv", "the end-of-sweep comparison of each pair of models (`cross_cka/"
        "<a>__<b>.csv`: a's layers x b's, by relative depth; `..._calibrated.csv` with "
        "`calibrate=true`)", "parent"),
)


def declared(key: str, keys: tuple[Key, ...]) -> Key | None:
    """The declaration ``key`` falls under (the first that matches), or None."""
    return next((k for k in keys if fnmatchcase(key, k.pattern)), None)
