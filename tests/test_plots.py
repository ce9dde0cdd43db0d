"""A job's two figures draw what its tables hold, with fixed margins (no layout engine left on
the figure, which would make every save lay it out again)."""

import numpy as np
import pandas as pd

from lw.job.plots import depth_curves, entropy_histograms, plt


def tables(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    layers = np.arange(5)
    per_prompt = pd.DataFrame({"layer": np.repeat(layers, 20), "prompt": np.tile(np.arange(20), 5),
                               "prompt_entropy/max": rng.random(100)})
    per_prompt.loc[3, "prompt_entropy/max"] = np.nan  # a NaN prompt is left out, not drawn
    table = pd.DataFrame({"layer": layers, "depth": layers / 4,
                          "prompt_entropy/max": rng.random(5), "dip/stat": [.1, .3, .2, .1, .1],
                          "dip/pvalue": rng.random(5)})
    return per_prompt, table


def test_depth_curves_draw_each_metric_over_depth(tmp_path):
    per_prompt, table = tables()
    fig = depth_curves(table, "title")
    drawn = {ax.get_title(): ax.lines[0].get_xydata() for ax in fig.axes if ax.lines}
    assert set(drawn) == {"prompt_entropy/max", "dip/stat", "dip/pvalue"}
    for column, xy in drawn.items():
        np.testing.assert_array_equal(xy, table[["depth", column]].to_numpy())
    assert {ax.get_xlabel() for ax in fig.axes if ax.lines} == {
        "relative depth (0 = embeddings, 1 = last layer)"}
    assert fig.get_layout_engine() is None
    fig.savefig(tmp_path / "curves.png")
    plt.close(fig)


def test_entropy_histograms_count_each_layers_prompts_and_mark_the_largest_dip():
    per_prompt, table = tables()
    fig = entropy_histograms(per_prompt, table)
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 5
    for layer, ax in enumerate(panels):
        values = per_prompt.loc[per_prompt["layer"] == layer, "prompt_entropy/max"].dropna()
        counts = ax.patches[0].get_data().values
        assert counts.sum() == len(values)
        assert ("(max)" in ax.get_title()) == (layer == 1)  # dip/stat is largest at layer 1
    assert fig.get_layout_engine() is None
    plt.close(fig)
