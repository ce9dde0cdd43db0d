"""Checkpoints of one training run: the step x depth heat map, local revisions as subfolders of a
model folder, revisions that hold identical weights, and the report on a checkpoints sweep."""

import numpy as np
import pandas as pd

from lw.job.plots import plt, step_depth_heatmap


def test_step_depth_heatmap_puts_steps_in_columns_depth_upwards_and_blanks_nan():
    steps, layers = [0, 1, 2, 4, 16, 128], 5
    rows = pd.DataFrame([(step, layer / (layers - 1), step + 10.0 * layer)
                         for step in steps for layer in range(layers)],
                        columns=["step", "depth", "value"])
    rows.loc[(rows["step"] == 2) & (rows["depth"] == 0.5), "value"] = np.nan
    fig = step_depth_heatmap(rows.sample(frac=1, random_state=0), "prompt_entropy/max")
    ax = fig.axes[0]
    cells = ax.collections[0].get_array()
    assert cells.shape == (layers, len(steps))  # one row per layer, one column per step
    # steps in numeric order (not as they came), depth 0 in the bottom row
    expected = np.array([[step + 10.0 * layer for step in steps] for layer in range(layers)])
    np.testing.assert_array_equal(cells.filled(np.nan)[~cells.mask], expected[~cells.mask])
    assert cells.mask.sum() == 1 and cells.mask[2, steps.index(2)]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(s) for s in steps]
    assert ax.get_ylim()[0] < 0 < 1 < ax.get_ylim()[1]
    assert fig.axes[1].get_ylabel() == "prompt_entropy/max"  # the colour bar
    plt.close(fig)
