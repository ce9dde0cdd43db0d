"""Re-execute docs/examples/quickstart.ipynb and store it with its outputs (tables, printed
lines, the figure as PNG), so that a code host shows them.

It runs the notebook as tests/test_notebook.py does: a real sweep (smollm2, minilm x 8
wiki-vital prompts of up to 32 tokens, prompt entropy) logged to a temporary SQLite store that
MLFLOW_TRACKING_URI names, then every cell on an ipykernel (nbclient) from the project root;
the notebook is written back in place, without what the cells wrote to stderr (progress bars,
warnings: this machine's paths and timings). About a minute on 2 cores:

    .venv/bin/python docs/examples/store_outputs.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "docs" / "examples" / "quickstart.ipynb"


def environment(**extra: str) -> dict[str, str]:
    """The test's environment (tests/conftest.py cli_env): src on the path, no store or
    offline switch from the caller's shell, one OpenMP thread."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="lw-notebook-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        subprocess.run([sys.executable, "-m", "lw.run", "-m", "model=smollm2,minilm",
                        "data=wiki-vital", "data.n_prompts=8", "data.max_tokens=32",
                        "metrics=[prompt_entropy]", f"tracking.uri={uri}",
                        f"tracking.artifact_location={tmp}/artifacts",
                        f"hydra.sweep.dir={tmp}/multirun"],
                       cwd=tmp, env=environment(), check=True)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(environment(MLFLOW_TRACKING_URI=uri))  # the kernel's environment
        try:
            notebook = nbformat.read(NOTEBOOK, as_version=4)
            # no per-cell timestamps: a re-run then changes only what the cells show
            nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                    record_timing=False,
                                    resources={"metadata": {"path": str(ROOT)}}).execute()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    if errors:
        sys.exit(f"the notebook failed: {errors[0].ename}: {errors[0].evalue}")
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if not (o.output_type == "stream" and o.name == "stderr")]
    shown = "".join(str(o) for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    if tmp in shown:  # the temporary store is gone: a path to it would only mislead
        sys.exit(f"an output names the temporary folder {tmp}; not stored")
    nbformat.write(notebook, NOTEBOOK)
    print(f"stored {NOTEBOOK.relative_to(ROOT)} with outputs ({NOTEBOOK.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
