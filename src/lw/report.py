"""Compare a sweep's runs: one metric over depth, a curve per level (`python -m lw.report`).

    python -m lw.report --metric prompt_entropy/max --hue lw.perturbation.p \
        --panels lw.perturbation lw.skip_first --out docs/figures/extreme_prompts.png
    python -m lw.report --best-layers mteb/      # per model: is the best layer the last?

Reads the child runs of a parent run (default: the latest sweep in the experiment) from the
MLflow store; computes nothing new, only gathers the logged per-layer values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from lw.config import LwError, TrackingConfig
from lw.tracking import client_for


def latest_parent(client, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LwError(f"tracking.experiment={experiment!r} does not exist in this store")
    runs = client.search_runs([found.experiment_id], filter_string="tags.lw.jobs != ''",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LwError(f"experiment {experiment!r} has no finished sweep (parent run)")
    return runs[0].info.run_id


def sweep_frame(client, parent: str, metrics: list[str]) -> pd.DataFrame:
    """Long rows, one per (child run, metric, layer): run tags, layer, depth_pct, value."""
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    rows = []
    for run in children:
        if run.info.status != "FINISHED":
            continue
        tags = {k: v for k, v in run.data.tags.items() if k.startswith("lw.")}
        n_layers = int(tags["lw.model.n_layers"])
        for metric in metrics:
            for point in client.get_metric_history(run.info.run_id, metric):
                rows.append({**tags, "run_id": run.info.run_id, "metric": metric,
                             "layer": point.step, "depth_pct": 100.0 * point.step / n_layers,
                             "value": point.value})
    if not rows:
        raise LwError(f"no finished child run of {parent} logged {', '.join(metrics)}")
    return pd.DataFrame(rows)


def best_layers(client, parent: str, prefix: str) -> pd.DataFrame:
    """Table 1 of "Does Representation Matter?" for a sweep: per model, over the tasks (every
    logged ``prefix*`` score, means and stds left out), the share whose best
    layer is not the last and the mean last- and best-layer scores. A task is one score of one
    child run (its data set and knobs)."""
    from lw.metrics.downstream import best_layer_table

    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    rows = []
    for run in children:
        keys = [k for k in run.data.metrics if k.startswith(prefix)
                and not k.endswith(("/mean", "_std"))]
        model = " ".join(filter(None, [run.data.tags.get("lw.model"),
                                       run.data.tags.get("lw.model.revision")]))
        for key in keys:
            for point in client.get_metric_history(run.info.run_id, key):
                rows.append({"model": model, "task": f"{run.info.run_name}: {key}",
                             "layer": point.step, "score": point.value})
    if not rows:
        raise LwError(f"no child run of {parent} logged a score starting with {prefix!r}")
    return best_layer_table(pd.DataFrame(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lw.report", description=__doc__.split("\n")[0])
    parser.add_argument("--uri", help="tracking URI (default: the local store in mlruns/)")
    parser.add_argument("--experiment", default="lw")
    parser.add_argument("--parent", help="parent run id (default: the latest sweep)")
    parser.add_argument("--metric", default="prompt_entropy/max")
    parser.add_argument("--hue", default="lw.model", help="tag giving one curve per value")
    parser.add_argument("--panels", nargs="*", default=[], help="tags giving one panel each")
    parser.add_argument("--out", type=Path, help="figure file (.png); also writes a .csv")
    parser.add_argument("--best-layers", metavar="PREFIX",
                        help="instead: best layer vs last layer per model over the scores "
                             "named PREFIX* (mteb/, probe/accuracy, cluster/v_measure)")
    args = parser.parse_args(argv)
    try:
        client = client_for(TrackingConfig(uri=args.uri, experiment=args.experiment))
        parent = args.parent or latest_parent(client, args.experiment)
        if args.best_layers:
            print(best_layers(client, parent, args.best_layers).round(4).to_string(index=False))
            return
        frame = sweep_frame(client, parent, [args.metric])
    except LwError as error:
        sys.exit(f"[lw] error: {error}")
    for tag in [args.hue, *args.panels]:
        if tag not in frame:
            sys.exit(f"[lw] error: no run of sweep {parent} has tag {tag!r}; tags: "
                     + ", ".join(c for c in frame.columns if c.startswith("lw.")))
    table = frame.pivot_table(index="layer", columns=[*args.panels, args.hue], values="value")
    print(f"{args.metric}, sweep {parent}")
    print(table.round(3).to_string())
    if args.out:
        from lw.plots import sweep_curves

        args.out.parent.mkdir(parents=True, exist_ok=True)
        sweep_curves(frame, args.metric, args.hue, args.panels,
                     title=f"{args.metric} over depth").savefig(args.out, dpi=110)
        table.to_csv(args.out.with_suffix(".csv"))
        print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
