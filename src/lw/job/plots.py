"""Figures from a results table: every metric against relative depth, and per-layer histograms of
prompt entropy with the dip statistic (the most bimodal layer marked); and from a sweep's runs:
curves over depth per model / level, histograms of many runs as heat maps."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # no screen on servers and CI
from typing import TYPE_CHECKING  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

if TYPE_CHECKING:  # results import torch; a report draws without it
    from lw.job.results import JobResult

ID_COLUMNS = ("layer", "depth")
DEPTH_LABEL = "relative depth (0 = embeddings, 1 = last layer)"


def set_margins(fig: plt.Figure, n_rows: int, n_cols: int, left: float, right: float,
                bottom: float, top: float, between_cols: float, between_rows: float) -> None:
    """Fixed margins and gaps between panels, in inches. Why not ``tight_layout``: it stays on
    the figure as its layout engine, so saving draws the figure twice and lays it out again;
    for a job's two small figures that was ~1 s, most of what a tiny job costs."""
    width, height = fig.get_size_inches()
    panel_w = (width - left - right - between_cols * (n_cols - 1)) / n_cols
    panel_h = (height - top - bottom - between_rows * (n_rows - 1)) / n_rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=between_cols / panel_w,
                        hspace=between_rows / panel_h)


def depth_curves(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """One panel per metric column, its per-layer value against relative depth."""
    columns = [c for c in table.columns if c not in ID_COLUMNS]
    n_cols = min(4, len(columns))
    n_rows = math.ceil(len(columns) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3 * n_rows), squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        ax.plot(table["depth"], table[column], marker="o", markersize=3)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel(DEPTH_LABEL, fontsize=8)
        ax.locator_params(nbins=4)  # fewer ticks: making tick artists is most of a save
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.suptitle(title)
    # room for tick labels left of each panel, a title above, the depth label below
    set_margins(fig, n_rows, n_cols, left=0.55, right=0.15, bottom=0.5, top=0.6,
                between_cols=0.6, between_rows=0.75)
    return fig


def entropy_histograms(per_prompt: pd.DataFrame, table: pd.DataFrame,
                       column: str = "prompt_entropy/max", title: str = "") -> plt.Figure:
    """Per-layer histograms of per-prompt ``column`` values, each titled with its dip test."""
    layers = sorted(per_prompt["layer"].unique())
    n_cols = min(6, len(layers))
    n_rows = math.ceil(len(layers) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.8 * n_cols, 2.5 * n_rows),
                             squeeze=False, sharex=True)
    by_layer = table.set_index("layer")
    bimodal = (by_layer["dip/stat"].idxmax() if "dip/stat" in by_layer
               and by_layer["dip/stat"].notna().any() else None)
    for ax, layer in zip(axes.flat, layers, strict=False):
        values = per_prompt.loc[per_prompt["layer"] == layer, column].to_numpy()
        values = values[np.isfinite(values)]
        counts, edges = np.histogram(values, bins=min(30, max(5, len(values) // 3)))
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.8)  # one artist, not n bars
        label = f"layer {layer}"
        if "dip/stat" in by_layer:
            row = by_layer.loc[layer]
            label += f"\ndip {row['dip/stat']:.3f} p={row['dip/pvalue']:.2f}"
        if layer == bimodal:  # the most bimodal layer (largest dip)
            label += " (max)"
            for spine in ax.spines.values():
                spine.set_color("tab:red")
        ax.set_title(label, fontsize=9, color="tab:red" if layer == bimodal else "black")
        ax.tick_params(labelsize=7, labelbottom=True)
        ax.locator_params(nbins=4)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    if title:
        fig.suptitle(f"{title} {column}")
    # two-line panel titles (layer, dip) above each panel
    set_margins(fig, n_rows, n_cols, left=0.4, right=0.15, bottom=0.35, top=0.85,
                between_cols=0.4, between_rows=0.75)
    return fig


def sweep_curves(frame: pd.DataFrame, metric: str, hue: str, panels: list[str],
                 title: str = "", labels: dict | None = None) -> plt.Figure:
    """One panel per combination of ``panels`` tags, a curve of ``metric`` over relative depth
    per value of the ``hue`` tag, named in the legend by ``labels[value]`` where given.
    ``frame``: long rows (run tags..., metric, depth, value)."""
    rows = frame[frame["metric"] == metric]
    groups = list(rows.groupby(panels, sort=True)) if panels else [((), rows)]
    n_cols = min(3, len(groups))
    n_rows = math.ceil(len(groups) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.5 * n_cols, 3.4 * n_rows),
                             squeeze=False, sharey=True)
    # fixed margins (tight_layout costs seconds on a figure of many panels); the saved figure
    # is cut to what is drawn (bbox_inches="tight"), so long labels are never clipped
    fig.subplots_adjust(left=0.1 / min(n_cols, 2), right=0.98, bottom=0.3 / n_rows + 0.02,
                        top=1 - 0.35 / n_rows, wspace=0.12, hspace=0.5)
    handles: dict[str, object] = {}
    for i, (ax, (key, group)) in enumerate(zip(axes.flat, groups, strict=False)):
        levels = sorted(group[hue].unique())
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(levels)))
        for color, level in zip(colors, levels, strict=True):
            curve = group[group[hue] == level].groupby("depth")["value"].mean()
            label = (labels or {}).get(level, f"{level}")
            (line,) = ax.plot(curve.index, curve.values, color=color, marker="o", markersize=2,
                              label=label)
            handles.setdefault(label, line)
        key = key if isinstance(key, tuple) else (key,)
        ax.set_title(", ".join(str(k) for k in key), fontsize=10)
        ax.set_xlabel(DEPTH_LABEL, fontsize=9)
        if i % n_cols == 0:
            ax.set_ylabel(metric, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    if len(handles) <= 40:  # one legend for the figure, beside the panels, off the data
        fig.legend(handles.values(), handles.keys(), title=hue, fontsize=8, title_fontsize=8,
                   loc="upper left", bbox_to_anchor=(1.0, 1 - 0.35 / n_rows), frameon=False,
                   ncols=1 + len(handles) // 20)
    if title:
        fig.suptitle(title)
    return fig


def entropy_heatmaps(runs: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
                     column: str = "prompt_entropy/max", title: str = "") -> plt.Figure:
    """Per-layer histograms of per-prompt ``column`` values for many runs at once: one panel
    per run, one row per layer (its histogram as a colour strip, share of prompts per bin),
    the most bimodal layer (largest dip) marked in red and named with its dip test.
    ``runs``: name -> (per_prompt rows (prompt, layer, column), results table)."""
    values = np.concatenate([p[column].to_numpy() for p, _ in runs.values()])
    values = values[np.isfinite(values)]
    edges = np.linspace(values.min(), values.max() + 1e-9, 31) if len(values) else np.arange(2)
    n_cols = min(4, len(runs))
    n_rows = math.ceil(len(runs) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.2 * n_rows),
                             squeeze=False)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.3 / n_rows + 0.02,
                        top=1 - 0.4 / n_rows, wspace=0.3, hspace=0.75)
    for ax, (name, (per_prompt, table)) in zip(axes.flat, runs.items(), strict=False):
        layers = sorted(per_prompt["layer"].unique())
        counts = np.stack([np.histogram(per_prompt.loc[per_prompt["layer"] == layer, column],
                                        bins=edges)[0] for layer in layers]).astype(float)
        counts /= np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(counts, aspect="auto", origin="lower", cmap="Blues", interpolation="nearest",
                  extent=(edges[0], edges[-1], -0.5, len(layers) - 0.5))
        label = name
        if "dip/stat" in table and table["dip/stat"].notna().any():
            best = table.loc[table["dip/stat"].idxmax()]
            ax.axhline(best["layer"], color="tab:red", lw=1)
            label += (f"\nmost bimodal: layer {int(best['layer'])} "
                      f"(dip {best['dip/stat']:.3f}, p={best['dip/pvalue']:.2f})")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(column, fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig


def figures_of(result: JobResult, title: str) -> dict:
    figures = {"metrics_vs_depth": depth_curves(result.table, title)}
    columns = [c for c in result.per_prompt.columns if c.startswith("prompt_entropy/")]
    if columns:
        column = "prompt_entropy/max" if "prompt_entropy/max" in columns else columns[0]
        figures["prompt_entropy_histograms"] = entropy_histograms(
            result.per_prompt, result.table, column, title)
    for make in result.figures.values():  # the figures metrics add (lw.metrics.registry)
        figures.update(make(result, title))
    return figures


STEP_MARK = "*"  # after a training step whose weights another step holds too


def _step_axis(ax: plt.Axes, steps: list, marked=()) -> None:
    """Training steps as evenly spaced categories (log-spaced steps stay readable), at most ~16
    labelled; a step in ``marked`` (its weights are another step's) labelled with STEP_MARK."""
    labels = [(f"{step:g}" if isinstance(step, float) else str(step))
              + (STEP_MARK if step in marked else "") for step in steps]
    every = max(1, len(labels) // 16)
    ax.set_xticks(range(0, len(labels), every), labels[::every], rotation=45, fontsize=7)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_xlabel("training step" + (f" ({STEP_MARK} identical weights to another step)"
                                     if marked else ""), fontsize=9)


def step_depth_heatmap(values: pd.DataFrame, title: str, marked=()) -> plt.Figure:
    """A metric over training: x = training step (each measured step one column, evenly spaced,
    so log-spaced steps 0, 1, 2, 4, ... stay readable), y = relative depth 0 (bottom) .. 1 (top),
    colour = ``value`` (a missing or NaN cell left blank), the colour bar labelled ``title``.
    ``values``: rows (step, depth, value); repeated (step, depth) cells are averaged. Steps in
    ``marked`` hold the same weights as another step (lw.sweep.revisions): labelled so."""
    cells = values.assign(depth=values["depth"].astype(float).round(9))
    grid = cells.groupby(["depth", "step"])["value"].mean().unstack("step")
    grid = grid.reindex(columns=sorted(grid.columns, key=float)).sort_index()
    depths = grid.index.to_numpy(dtype=float)
    # cell edges halfway between measured depths: layers of one model are evenly spaced, but a
    # model whose depths are not still gets each cell where its layer is
    middles = (depths[1:] + depths[:-1]) / 2
    first = depths[0] - (middles[0] - depths[0] if len(depths) > 1 else 0.5)
    last = depths[-1] + (depths[-1] - middles[-1] if len(depths) > 1 else 0.5)
    depth_edges = np.concatenate([[first], middles, [last]])
    step_edges = np.arange(grid.shape[1] + 1) - 0.5
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * grid.shape[1] + 3.0), 3.6))
    mesh = ax.pcolormesh(step_edges, depth_edges, np.ma.masked_invalid(grid.to_numpy(float)),
                         cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax).set_label(title, fontsize=9)
    _step_axis(ax, list(grid.columns), marked)
    ax.set_ylabel(DEPTH_LABEL.replace(" (", "\n("), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=10)
    _step_margins(fig, right=0.45)  # the colour bar's label
    return fig


def _step_margins(fig: plt.Figure, right: float = 0.2) -> None:
    width, height = fig.get_size_inches()  # room in inches for the rotated steps and labels
    fig.subplots_adjust(left=0.8 / width, right=1 - right / width, bottom=0.8 / height,
                        top=1 - 0.35 / height)


def step_curves(values: pd.DataFrame, title: str, depths=(0, 0.25, 0.5, 0.75, 1),
                marked=()) -> plt.Figure:
    """A metric over training step (evenly spaced, as in step_depth_heatmap) at a few relative
    ``depths``, each the nearest measured layer's, one line per depth. ``values``: rows
    (step, depth, value) of one model; ``marked`` as in step_depth_heatmap."""
    steps = sorted(values["step"].unique(), key=float)
    present = np.sort(values["depth"].astype(float).unique())
    nearest = sorted({float(present[np.abs(present - d).argmin()]) for d in depths})
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * len(steps) + 2.5), 3.6))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(nearest)))
    for color, depth in zip(colors, nearest, strict=True):
        rows = values[np.isclose(values["depth"].astype(float), depth)]
        curve = rows.groupby("step")["value"].mean().reindex(steps)
        ax.plot(range(len(steps)), curve.to_numpy(float), color=color, marker="o",
                markersize=3, label=f"{depth:.2f}")
    _step_axis(ax, steps, marked)
    ax.set_ylabel(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(title="relative depth", fontsize=7, title_fontsize=7, frameon=False)
    ax.set_title(title, fontsize=10)
    _step_margins(fig)
    return fig
