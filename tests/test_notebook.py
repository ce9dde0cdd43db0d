"""docs/examples/quickstart.ipynb runs cell by cell on an ipykernel (nbclient), against a real
smollm2 + minilm sweep logged to a temporary SQLite store named by MLFLOW_TRACKING_URI; it is
stored with the outputs such a run gives (docs/examples/store_outputs.py), so a code host
shows them."""

from __future__ import annotations

import pytest

from conftest import ROOT, cli_env, lw_cli

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbclient)")


def test_the_quickstart_notebook_runs(tmp_path, monkeypatch):
    import nbformat

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = lw_cli(tmp_path, "-m", "model=smollm2,minilm", "data=wiki-vital",
                  "data.n_prompts=8", "data.max_tokens=32", "metrics=[prompt_entropy]",
                  f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path}/artifacts",
                  f"hydra.sweep.dir={tmp_path}/multirun")
    assert done.returncode == 0, done.stderr[-3000:]
    for key, value in cli_env(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1").items():
        monkeypatch.setenv(key, value)     # the kernel's environment
    path = ROOT / "docs" / "examples" / "quickstart.ipynb"
    stored = nbformat.read(path, as_version=4)  # as committed, before this run
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "2 models, 2 runs," in printed and "2 curves" in printed, printed
    assert any("image/png" in o.get("data", {}) for o in outputs)
    table = notebook.cells[2].outputs[-1]["data"]["text/plain"]
    assert "prompt_entropy/max" in table  # the measured table, shown
    # the stored file shows what a run shows (stderr, progress bars, left out), figure included
    for kept, ran in zip(stored.cells, notebook.cells, strict=True):
        shown = [o for o in ran.get("outputs", []) if o.get("name") != "stderr"]
        assert ({o.output_type for o in kept.get("outputs", [])}
                == {o.output_type for o in shown}), f"stored outputs of: {ran.source[:60]}"
    kept = [o for cell in stored.cells for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in kept)
    assert not [o for o in kept if o.output_type == "error"]
    assert path.stat().st_size < 1_000_000
