"""Compare a sweep's runs (`python -m lw.report`).

    python -m lw.report --all --out report/      # the whole sweep: PNGs + index.html, logged
    python -m lw.report --metric prompt_entropy/max --hue lw.perturbation.p \
        --panels lw.perturbation lw.skip_first --out docs/figures/extreme_prompts.png
    python -m lw.report --best-layers mteb/      # per model: is the best layer the last?

Reads the child runs of a parent run (default: the latest sweep in the experiment) from the
MLflow store; computes nothing new, only gathers the logged per-layer values. Reads in bulk:
one search for the runs (tags, summaries), then each run's ``results/`` artifacts (its
per-layer table, every logged curve, and per-prompt values), runs in parallel: never one
history request per metric per run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from lw.errors import LwError
from lw.tracking.read import latest_parent, open_store, read_sweep, sweep_frame


def line_grouping(curves: pd.DataFrame) -> tuple[str, list[str]]:
    """What a line and a panel stand for: a perturbation level that varies, else a training
    step (checkpoints), else the model; a panel per data set (and per model when the lines
    are levels or steps of several models)."""
    def varies(tag: str) -> bool:
        return tag in curves and curves[tag].nunique() > 1

    levels = [c for c in curves.columns if c.startswith("lw.perturbation.") and varies(c)]
    hue = (levels[0] if levels else "training step" if varies("training step")
           else "lw.model")
    panels = ["lw.data"] if "lw.data" in curves else []
    if hue != "lw.model" and varies("lw.model"):
        panels.append("lw.model")
    return hue, panels


def training_step(revision: str) -> float:
    """Pythia-style checkpoint names: "step143000" -> 143000 (NaN for others)."""
    digits = "".join(ch for ch in str(revision) if ch.isdigit())
    return float(digits) if str(revision).startswith("step") and digits else float("nan")


def summary_table(runs: list) -> pd.DataFrame:
    """One row per run: its name, what it varied (model, data, level, revision) and its
    summaries (best / extreme layers, NaN counts, prompts/s) as logged."""
    rows = []
    for run in runs:
        tags = run.data.tags
        row = {"run": run.info.run_name, "model": tags.get("lw.model"),
               "revision": tags.get("lw.model.revision"), "layers": tags.get("lw.model.n_layers"),
               "data": tags.get("lw.data"), "perturbation": tags.get("lw.perturbation")}
        row.update({k[len("lw.perturbation."):]: v for k, v in tags.items()
                    if k.startswith("lw.perturbation.")})
        if "lw.model.same_weights" in tags:  # lw.sweep.revisions: its curves are another's
            row["same weights as"] = tags["lw.model.same_weights"]
        row.update({k: v for k, v in sorted(run.data.metrics.items())
                    if k.startswith("summary/") or k in ("n_prompts", "prompts_per_second")})
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["model", "data", "run"]).reset_index(drop=True)


def write_report(client, parent: str, out: Path, log: bool = True) -> Path:
    """The sweep's whole report in ``out``: a PNG per logged per-layer metric over depth, the
    prompt-entropy histograms (every run as a heat map, the most bimodal run in full), the
    summary table (CSV), and index.html showing them; logged under ``report/`` of the parent
    run when ``log``. Returns the HTML page."""
    from lw.job.plots import entropy_heatmaps, entropy_histograms, plt, sweep_curves

    sweep = read_sweep(client, parent)
    curves = sweep.curves
    curves["training step"] = curves["lw.model.revision"].map(training_step) \
        if "lw.model.revision" in curves else float("nan")
    hue, panels = line_grouping(curves)
    labels = step_labels(curves) if hue == "training step" else None
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []
    for metric in sorted(curves["metric"].unique()):
        if curves.loc[curves["metric"] == metric, "value"].isna().all():
            continue
        name = f"curve_{metric.replace('/', '_')}.png"
        figure = sweep_curves(curves, metric, hue, panels, labels=labels)  # titled by the page
        figure.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(figure)
        figures.append((metric, name))
    histograms: list[tuple[str, str]] = []
    names = {r.info.run_id: r.info.run_name for r in sweep.runs}
    entropy = next((c for c in ("prompt_entropy/max", "prompt_entropy/raw")
                    if all(c in p for p in sweep.per_prompt.values())), None)
    if entropy and sweep.per_prompt:
        runs = {names[i]: (sweep.per_prompt[i], sweep.tables[i]) for i in sweep.per_prompt}
        figure = entropy_heatmaps(runs, entropy)
        # fixed margins: a tight bounding box costs one more draw of many panels
        figure.savefig(out / "histograms_all_runs.png", dpi=100)
        plt.close(figure)
        histograms.append((f"{entropy} per layer, every run: a row per layer, red = largest dip",
                           "histograms_all_runs.png"))
        dips = {i: t["dip/stat"].max() for i, t in sweep.tables.items() if "dip/stat" in t}
        if dips:
            most = max(dips, key=lambda i: dips[i])
            figure = entropy_histograms(sweep.per_prompt[most], sweep.tables[most], entropy)
            figure.savefig(out / "histograms_most_bimodal_run.png", dpi=100,
                           bbox_inches="tight")
            plt.close(figure)
            histograms.append((f"the run with the largest dip: {names[most]}",
                               "histograms_most_bimodal_run.png"))
    cross = cross_model_figures(client, parent, out)
    steps = training_figures(curves, out) if hue == "training step" else []
    summary = summary_table(sweep.runs)
    summary.to_csv(out / "summary.csv", index=False)
    page = out / "index.html"
    page.write_text(report_html(parent, len(sweep.runs), hue, panels, summary, figures,
                                histograms, sweep.missing, cross, steps))
    for line in sweep.missing:
        print(f"[lw] left out of the report: {line}")
    if log:
        try:
            client.log_artifacts(parent, str(out), artifact_path="report")
            print(f"[lw] logged under report/ of parent run {parent}")
        except Exception as error:  # noqa: BLE001 - a READ user still gets the files
            reason = str(error).strip().splitlines()[0][:200]
            print(f"[lw] could not log the report to parent run {parent} ({reason}); "
                  "the files are kept in {out}/ (--no-log skips logging)".replace("{out}",
                                                                                str(out)))
    return page


def same_weights_steps(rows: pd.DataFrame) -> dict[int, str]:
    """Training step -> the revisions holding its very weights (tag lw.model.same_weights)."""
    if "lw.model.same_weights" not in rows:
        return {}
    marked = rows[rows["lw.model.same_weights"].fillna("") != ""]
    return {int(step): ", ".join(sorted(set(group["lw.model.same_weights"])))
            for step, group in marked.groupby("training step")}


def step_labels(curves: pd.DataFrame) -> dict[float, str]:
    """The legend's name of each training step, with the revisions that share its weights."""
    same = same_weights_steps(curves)
    return {step: f"{step:.0f}" + (f" (same weights: {same[int(step)]})"
                                   if int(step) in same else "")
            for step in curves["training step"].dropna().unique()}


def training_figures(curves: pd.DataFrame, out: Path) -> list[tuple[str, str]]:
    """A checkpoints sweep, per metric and model (and data set): the step x depth heat map and
    the curves over training step at depths 0, 0.25, 0.5, 0.75, 1 (each the nearest layer);
    steps holding another's weights marked."""
    import re

    from lw.job.plots import STEP_MARK, plt, step_curves, step_depth_heatmap

    rows = curves[curves["training step"].notna() & curves["value"].notna()]
    keys = [k for k in ("lw.model", "lw.data") if k in rows]
    found = []
    for key, group in rows.groupby(["metric", *keys], sort=True):
        metric, *names = key
        marked = set(same_weights_steps(group))
        values = pd.DataFrame({"step": group["training step"].astype(int),
                               "depth": group["depth"], "value": group["value"]})
        stem = re.sub(r"[^\w.-]+", "_", "_".join([metric, *map(str, names)]))
        for kind, draw, what in (("heatmap", step_depth_heatmap, "over training step x depth"),
                                 ("curves", step_curves, "over training step at depths")):
            figure = draw(values, metric, marked=marked)
            figure.savefig(out / f"steps_{kind}_{stem}.png", dpi=100)
            plt.close(figure)
            note = f" ({STEP_MARK}: identical weights to another step)" if marked else ""
            found.append((f"{metric}, {' '.join(map(str, names))}: {what}{note}",
                          f"steps_{kind}_{stem}.png"))
    return found


def cross_model_figures(client, parent: str, out: Path) -> list[tuple[str, str]]:
    """The cross-model matrices logged to the parent (``cross_<measure>/<a>__<b>.csv``, and
    ``..._calibrated.csv``, by lw.sweep.crossmodel at the sweep's end): a heat map each over
    relative depth, and the CSVs."""
    import torch

    from lw.job.plots import plt
    from lw.metrics import registry
    from lw.sweep.crossmodel import depth_diagonal, heat_map

    found = []
    folders = [item.path for item in client.list_artifacts(parent)
               if item.is_dir and item.path.startswith("cross_")]
    with tempfile.TemporaryDirectory() as tmp:
        for folder in folders:
            measure = folder[len("cross_"):]
            compare = registry.every().get(measure)
            label = getattr(compare.across_models, "label", measure) if compare else measure
            for item in client.list_artifacts(parent, folder):
                if not item.path.endswith(".csv"):
                    continue
                table = pd.read_csv(client.download_artifacts(parent, item.path, tmp))
                key = Path(item.path).stem
                shown = label + (" (calibrated)" if key.endswith("_calibrated") else "")
                a, b, *group = key.removesuffix("_calibrated").split("__")  # <a>__<b>[__<group>]
                # column 0: a's depth (depth_pct, 0-100, in files logged before depth was 0-1)
                matrix = torch.tensor(table.iloc[:, 1:].to_numpy())
                table.to_csv(out / f"{folder}_{key}.csv", index=False)
                figure = heat_map(matrix, a, b, shown)
                figure.savefig(out / f"{folder}_{key}.png", dpi=100, bbox_inches="tight")
                plt.close(figure)
                found.append((f"{a} x {b}{' ' + group[0] if group else ''}: {shown} over "
                              f"relative depth (mean at equal depth "
                              f"{depth_diagonal(matrix):.3f})", f"{folder}_{key}.png"))
    return found


def report_html(parent: str, n_runs: int, hue: str, panels: list[str], summary: pd.DataFrame,
                figures: list[tuple[str, str]], histograms: list[tuple[str, str]],
                missing: list[str] = (), cross: list[tuple[str, str]] = (),
                steps: list[tuple[str, str]] = ()) -> str:
    from html import escape

    def images(items, css: str):
        return f'<div class="{css}">' + "\n".join(
            f'<figure><figcaption>{escape(title)}</figcaption><a href="{name}">'
            f'<img src="{name}" alt="{escape(title)}"></a></figure>' for title, name in items
        ) + "</div>"

    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lw sweep {parent}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:sans-serif;margin:1.5em;max-width:1800px}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,600px),1fr));
gap:1.2em}}
.wide{{display:grid;gap:1.2em}}
figure{{margin:0}} figcaption{{font-weight:bold;margin-bottom:.3em}}
img{{width:100%;height:auto}} .wide img{{max-width:1400px}}
.table{{overflow:auto;max-height:60vh;border:1px solid #ccc}}
table{{border-collapse:collapse;font-size:12px;white-space:nowrap}}
td,th{{border:1px solid #ddd;padding:2px 6px}} th{{position:sticky;top:0;background:#f4f4f4}}
.missing{{background:#fff4e5;border:1px solid #f0b35a;padding:.5em 1em;margin:1em 0}}
</style></head><body>
<h1>Sweep {parent}</h1>
<p>{n_runs} finished runs. Curves over relative depth (0 = embeddings, 1 = last layer): a line
per {escape(hue)}, a panel per {escape(", ".join(panels) or "sweep")}.</p>
{missing_html(missing)}<h2>Summary</h2>
<div class="table">
{summary.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")}
</div>
<h2>Per-layer metrics over depth</h2>
{images(figures, "grid")}
{"<h2>Over training steps</h2>" + images(steps, "grid") if steps else ""}
<h2>Prompt-entropy histograms and dip test</h2>
{images(histograms, "wide")}
{"<h2>Cross-model CKA</h2>" + images(cross, "grid") if cross else ""}
</body></html>
"""


def missing_html(missing: list[str]) -> str:
    from html import escape

    if not missing:
        return ""
    items = "".join(f"<li>{escape(line)}</li>" for line in missing)
    return (f'<div class="missing"><b>{len(missing)} result file(s) could not be read; '
            f"those runs are left out:</b><ul>{items}</ul></div>\n")


def best_layers(client, parent: str, prefix: str) -> pd.DataFrame:
    """Table 1 of "Does Representation Matter?" for a sweep: per model, over the tasks (every
    logged ``prefix*`` score, means and stds left out), the share whose best
    layer is not the last and the mean last- and best-layer scores. A task is one score of one
    child run (its data set and knobs)."""
    from lw.metrics.functional.downstream import best_layer_table

    curves = read_sweep(client, parent, per_prompt=False).curves
    scores = curves[curves["metric"].str.startswith(prefix)
                    & ~curves["metric"].str.endswith(("/mean", "_std"))]
    revision = scores.get("lw.model.revision", pd.Series("", index=scores.index)).fillna("")
    rows = pd.DataFrame({"model": (scores["lw.model"].fillna("") + " " + revision).str.strip(),
                         "task": scores["run_name"] + ": " + scores["metric"],
                         "layer": scores["layer"], "score": scores["value"]})
    if rows.empty:
        raise LwError(f"no child run of {parent} logged a score starting with {prefix!r}")
    return best_layer_table(rows.reset_index(drop=True))


def parser() -> argparse.ArgumentParser:
    """The command's flags (also the docs' CLI reference)."""
    parser = argparse.ArgumentParser(prog="python -m lw.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else "
                                         "./mlruns/mlflow.db)")
    parser.add_argument("--experiment", default="lw")
    parser.add_argument("--parent", help="parent run id (default: the latest sweep)")
    parser.add_argument("--metric", default="prompt_entropy/max")
    parser.add_argument("--hue", default="lw.model", help="tag giving one curve per value")
    parser.add_argument("--panels", nargs="*", default=[], help="tags giving one panel each")
    parser.add_argument("--out", type=Path, help="figure file (.png); also writes a .csv")
    parser.add_argument("--all", action="store_true",
                        help="the whole sweep's report: every metric, histograms, summary "
                             "(PNGs + index.html in --out, default report/), logged to the "
                             "parent run")
    parser.add_argument("--no-log", action="store_true", help="with --all: write files only")
    parser.add_argument("--best-layers", metavar="PREFIX",
                        help="instead: best layer vs last layer per model over the scores "
                             "named PREFIX* (mteb/, probe/accuracy, cluster/v_measure)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run
    try:
        client = open_store(args.uri)
        parent = args.parent or latest_parent(client, args.experiment)
        if args.all:
            started = time.perf_counter()
            page = write_report(client, parent, args.out or Path("report"), log=not args.no_log)
            print(f"[lw] report of sweep {parent} ({time.perf_counter() - started:.1f} s): "
                  f"open {page.resolve()}")
            return
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
        from lw.job.plots import sweep_curves

        args.out.parent.mkdir(parents=True, exist_ok=True)
        sweep_curves(frame, args.metric, args.hue, args.panels,
                     title=f"{args.metric} over depth").savefig(args.out, dpi=110)
        table.to_csv(args.out.with_suffix(".csv"))
        print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
