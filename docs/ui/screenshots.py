"""Screenshots of the MLflow UI comparing smollm2 (30 layers) and minilm (6 layers) over
relative depth, taken with Debian's chromium in headless mode (`apt-get install chromium`).

    .venv/bin/python docs/ui/screenshots.py            # writes docs/ui/*.png

Runs a small real sweep (real weights, wiki-vital) into a temporary SQLite store, serves it
with `mlflow ui` on a free local port, and opens the experiment the way a new user would,
with the child runs listed (the filter keeps the sweep's parent out) and the chart view on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
OUT = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(url: str, path: Path, size: str) -> None:
    chromium = shutil.which("chromium") or sys.exit("no chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={profile}",
                        f"--window-size={size}", "--virtual-time-budget=30000",
                        f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"wrote {path}")


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lw-ui-"))
    store = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([str(PYTHON), "-m", "lw.run", "-m", "model=smollm2,minilm",
                    "data=wiki-vital", "data.n_prompts=32", "data.max_tokens=64",
                    "metrics=[prompt_entropy,curvature,dataset_entropy]",
                    "metric.normalizations=[max]", f"tracking.uri={store}",
                    f"tracking.artifact_location={tmp}/artifacts",
                    f"hydra.sweep.dir={tmp}/multirun"], check=True, env=env, cwd=tmp)
    port = free_port()
    ui = subprocess.Popen([str(PYTHON.parent / "mlflow"), "ui", "--backend-store-uri", store,
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(store).get_experiment_by_name("lw").experiment_id
        runs = f"{base}/#/experiments/{experiment}/runs"
        children = urllib.parse.urlencode({"searchFilter": "tags.lw.model != ''",
                                           "compareRunsMode": "CHART",
                                           "workflowType": "machine_learning"},
                                          quote_via=urllib.parse.quote)
        screenshot(f"{base}/#/experiments/{experiment}", OUT / "experiment_opens.png",
                   "1500,900")
        screenshot(f"{runs}?{children}", OUT / "charts_over_depth.png", "1500,2600")
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
