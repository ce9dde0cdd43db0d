"""Screenshots of the MLflow UI comparing smollm2 (30 layers) and minilm (6 layers) over
relative depth, taken by driving Debian's chromium, headless, the way a new user clicks.

    apt-get install -y chromium chromium-driver
    make screenshots                 # writes docs/ui/*.png (selenium: the venv's dev extra)
    .venv/bin/pip install -e '.[docs]'                 # selenium, in another environment
    .venv/bin/python docs/ui/screenshots.py --uri sqlite:///path/mlflow.db   # no new sweep

Runs a small real sweep (real weights, wiki-vital, 16 prompts) into a temporary SQLite store,
serves it on a free local port with the app `make ui` serves (`python -m lw.server_app server
--app-name lw-ui`), and, each time in a fresh browser profile:
1. opens the experiment's plain URL: lw's page lands a fresh browser on the runs table
   ("Model training"), not MLflow 3.17's GenAI overview (`experiment_opens.png`);
2. opens the URL `make ui` prints (`?workflowType=machine_learning`): the runs table; closes
   the assistant panel and expands the sweep's parent run: its jobs, named by lw, each in its
   model's colour (lw's tag `mlflow.runColor`) (`runs_view.png`);
3. switches to the chart view, hides the parent (the eye), filters the charts to
   `^(depth/)?prompt_entropy/max$` and enlarges the two cards (`charts_over_depth.png`);
4. opens the depth chart full screen (`depth_chart_fullscreen.png`);
5. writes the sweep's `python -m lw.report --all` page and shows it on a laptop-sized window
   (1366 x 768): its top (`report_page.png`) and its figure grid (`report_grid.png`).
It fails unless the experiment opens on its runs, the table shows the sweep's run names, the
depth chart draws one curve per model, each in the colour lw gave its run, over 0..1000
per-mille depth (MLflow's step for `depth/<metric>`), and the per-layer chart runs over
smollm2's 0..30 layers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
if not PYTHON.exists():  # another checkout's environment
    PYTHON = Path(sys.executable)
OUT = Path(__file__).resolve().parent
CHART_FILTER = "^(depth/)?prompt_entropy/max$"
DEPTH_CHART, LAYER_CHART = "depth/prompt_entropy/max", "prompt_entropy/max"
MODELS = ("smollm2", "minilm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep(tmp: Path) -> str:
    store = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([str(PYTHON), "-m", "lw.run", "-m", "model=smollm2,minilm",
                    "data=wiki-vital", "data.n_prompts=16", "data.max_tokens=64",
                    "metrics=[prompt_entropy,curvature,dataset_entropy]",
                    "metric.normalizations=[max]", f"tracking.uri={store}",
                    f"tracking.artifact_location={tmp}/artifacts",
                    f"hydra.sweep.dir={tmp}/multirun"], check=True, env=env, cwd=tmp)
    return store


class Browser:
    """Debian's chromium through Debian's chromedriver (no driver download), fresh profile."""

    def __init__(self, width: int, height: int):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        chromium = shutil.which("chromium") or sys.exit("no chromium: apt-get install chromium")
        driver = shutil.which("chromedriver") or sys.exit(
            "no chromedriver: apt-get install chromium-driver")
        self.profile = tempfile.mkdtemp(prefix="lw-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars", f"--window-size={width},{height}",
                    f"--user-data-dir={self.profile}"):
            options.add_argument(arg)
        self.d = webdriver.Chrome(options=options, service=Service(driver))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.d.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    def wait(self, condition, timeout: float = 90, what: str = ""):
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        # a chart redrawn between finding it and reading its paths is read again, not a failure
        return WebDriverWait(self.d, timeout, poll_frequency=0.5,
                             ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: condition(d), message=what)

    def find(self, xpath: str, timeout: float = 90):
        from selenium.webdriver.common.by import By

        return self.wait(lambda d: (d.find_elements(By.XPATH, xpath) or [None])[0], timeout,
                         f"no element {xpath}")

    def click(self, xpath: str, timeout: float = 90) -> None:
        self.d.execute_script("arguments[0].click()", self.find(xpath, timeout))

    def shot(self, path: Path) -> None:
        time.sleep(1.5)  # the last animation frame
        self.d.save_screenshot(str(path))
        print(f"wrote {path.relative_to(ROOT)}  ({self.d.current_url})")

    def close_assistant(self) -> None:
        from selenium.webdriver.common.by import By

        # MLflow 3.17's assistant panel opens by itself on a first visit
        close = "button[data-component-id='mlflow.assistant.chat_panel.close']"
        for _ in range(20):
            buttons = self.d.find_elements(By.CSS_SELECTOR, close)
            if buttons:
                self.d.execute_script("arguments[0].click()", buttons[0])
                return
            time.sleep(0.5)


def card(name: str) -> str:
    """The chart card titled `name`, with its resize handle (a sibling of the card)."""
    return (f"//div[contains(@class,'react-resizable')][div[@data-testid="
            f"'experiment-view-compare-runs-card'][.//*[normalize-space(text())='{name}']]]")


def curves(b: Browser, name: str, root: str = "") -> tuple[dict[str, str], list[float]]:
    """The curves drawn in a chart (plotly line path -> its colour) and its x tick values."""
    from selenium.webdriver.common.by import By

    chart = b.find(root or card(name))
    # MLflow draws each run's line twice (the line with its points, and a copy for hover)
    lines = {p.get_attribute("d"): p.value_of_css_property("stroke")
             for p in chart.find_elements(By.CSS_SELECTOR, "g.trace.scatter path.js-line")}
    lines.pop("", None)
    lines.pop(None, None)
    ticks = []
    for t in chart.find_elements(By.CSS_SELECTOR, "g.xtick text"):
        try:
            ticks.append(float(t.text.replace(",", "").replace("\u2212", "-")))
        except ValueError:
            pass
    return lines, ticks


def rgb(color: str) -> str:
    """'#0072B2' as the browser writes a stroke: 'rgb(0, 114, 178)'."""
    return "rgb({}, {}, {})".format(*(int(color[i:i + 2], 16) for i in (1, 3, 5)))


def check(b: Browser, name: str, colors: int | list[str], last: float, root: str = "") -> None:
    """A curve per colour (the runs' mlflow.runColor; or `colors` curves in as many colours),
    the x axis up to `last`."""
    n = colors if isinstance(colors, int) else len(colors)
    want = None if isinstance(colors, int) else {rgb(c) for c in colors}

    def ok(_):
        lines, ticks = curves(b, name, root)
        return (len(lines) == len(set(lines.values())) == n
                and want in (None, set(lines.values())) and ticks and max(ticks) == last)
    try:
        b.wait(ok, 180)  # a busy machine draws slowly
    except Exception:
        lines, ticks = curves(b, name, root)
        b.d.save_screenshot(str(OUT / "failed.png"))
        sys.exit(f"chart {name}: {len(lines)} curves in colours {sorted(set(lines.values()))} "
                 f"over x ticks {ticks}; expected {n} curves in "
                 f"{sorted(want) if want else n} colours up to {last}")
    lines, ticks = curves(b, name, root)
    print(f"  {name}: {len(lines)} curves in {sorted(set(lines.values()))}, x ticks {ticks}")


def row_names(b: Browser, names: dict[str, str]) -> None:
    """Each run's row in the table shows its name (run id -> name, as the store has it)."""
    for run, name in names.items():
        b.find(f"//div[@row-id='{run}']//*[normalize-space(text())='{name}']", 60)


def screenshots(base: str, experiment: str, parent: tuple[str, str],
                children: dict[str, tuple[str, str]]) -> None:
    """parent: (run id, name); children: run id -> (name, mlflow.runColor)."""
    from selenium.webdriver.common.action_chains import ActionChains

    parent, parent_name = parent
    colors = [color for _, color in children.values()]
    with Browser(1500, 900) as b:  # what a fresh browser shows on the experiment's plain URL
        b.d.get(f"{base}/#/experiments/{experiment}")
        b.wait(lambda d: "/overview" in d.current_url or "/runs" in d.current_url, 90,
               "the experiment page did not open")
        if "/runs" not in b.d.current_url:
            sys.exit(f"the experiment's plain URL opened {b.d.current_url}, not its runs: "
                     "lw's page (lw.server_app) no longer sets the runs as the default view")
        b.close_assistant()
        row_names(b, {parent: parent_name})
        b.shot(OUT / "experiment_opens.png")

    with Browser(1600, 1400) as b:
        b.d.get(f"{base}/#/experiments/{experiment}?workflowType=machine_learning")
        b.wait(lambda d: "/runs" in d.current_url, 90, "not on the runs view")
        b.close_assistant()
        b.click(f"//div[@row-id='{parent}']//button[contains(@data-component-id,"
                "'runnamecellrenderer')]")  # expand the sweep's parent run
        row_names(b, {child: name for child, (name, _) in children.items()})
        b.d.set_window_size(1600, 600)
        b.shot(OUT / "runs_view.png")
        b.d.set_window_size(1600, 1400)

        b.click("//input[@type='radio'][@value='CHART']")  # the chart view
        b.click(f"//div[@row-id='{parent}']//label[.//input[contains(@class,"
                "'is-visibility-toggle-checkbox')]]")      # hide the parent (no metrics)
        b.find("//input[@placeholder='Search metric charts']").send_keys(CHART_FILTER)
        for name in (DEPTH_CHART, LAYER_CHART):            # enlarge both cards
            handle = b.find(card(name) + "//*[@data-testid='draggable-card-resize-handle']")
            b.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", handle)
            drag = ActionChains(b.d).click_and_hold(handle)
            for _ in range(10):
                drag = drag.move_by_offset(50, 10).pause(0.05)
            drag.release().perform()
        b.d.execute_script("""for (let e = arguments[0]; e; e = e.parentElement) {
                                  e.scrollTop = 0; }""", b.find(card(DEPTH_CHART)))  # to the top
        ActionChains(b.d).move_to_element(b.find("//*[contains(text(),'matching runs')]")) \
            .perform()  # the pointer off the charts
        check(b, DEPTH_CHART, colors, 1000)
        check(b, LAYER_CHART, colors, 30)
        b.shot(OUT / "charts_over_depth.png")

    with Browser(1600, 1000) as b:
        b.d.get(f"{base}/#/experiments/{experiment}?workflowType=machine_learning")
        b.wait(lambda d: "/runs" in d.current_url, 90, "not on the runs view")
        b.close_assistant()
        b.click(f"//div[@row-id='{parent}']//button[contains(@data-component-id,"
                "'runnamecellrenderer')]")
        b.click("//input[@type='radio'][@value='CHART']")
        b.click(f"//div[@row-id='{parent}']//label[.//input[contains(@class,"
                "'is-visibility-toggle-checkbox')]]")
        b.find("//input[@placeholder='Search metric charts']").send_keys(CHART_FILTER)
        b.click(card(DEPTH_CHART) + "//button[@data-component-id='fullscreen_button_chartcard']")
        modal = "//div[@role='dialog'][.//*[contains(@class,'js-plotly-plot')]]"
        b.find(modal)
        check(b, DEPTH_CHART, colors, 1000, root=modal)
        b.shot(OUT / "depth_chart_fullscreen.png")


def report_page(store: str, tmp: Path) -> None:
    """The sweep's report page as a laptop shows it; fails if anything runs off its right
    edge (the summary table scrolls in its own box)."""
    from selenium.webdriver.common.by import By

    out = tmp / "report"
    subprocess.run([str(PYTHON), "-m", "lw.report", "--all", "--no-log", "--uri", store,
                    "--out", str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    with Browser(1366, 768) as b:
        b.d.get((out / "index.html").as_uri())
        b.wait(lambda d: d.execute_script("return [...document.images].every("
                                          "i => i.complete && i.naturalWidth > 0)"), 60,
               "the report's figures did not load")
        page, window = b.d.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        if page > window:
            sys.exit(f"the report page is {page} px wide in a {window} px window")
        b.shot(OUT / "report_page.png")
        grid = b.d.find_element(By.CSS_SELECTOR, ".grid")
        b.d.execute_script("arguments[0].scrollIntoView()", grid)
        b.shot(OUT / "report_grid.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", help="an existing store with a smollm2 + minilm sweep "
                                      "(default: run one into a temporary store)")
    parser.add_argument("--report-only", action="store_true",
                        help="only the report page's screenshots (step 5)")
    args = parser.parse_args()
    try:
        import selenium  # noqa: F401
    except ImportError:
        sys.exit("no selenium: .venv/bin/pip install -e '.[docs]'")
    tmp = Path(tempfile.mkdtemp(prefix="lw-ui-"))
    ui = None
    try:
        store = args.uri or sweep(tmp)
        report_page(store, tmp)
        if args.report_only:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(store)
        experiment = client.get_experiment_by_name("lw").experiment_id
        runs = client.search_runs([experiment], order_by=["attributes.start_time DESC"])
        jobs = [r for r in runs if r.data.tags.get("lw.model") in MODELS]
        parent = jobs[0].data.tags["mlflow.parentRunId"]
        children = {r.info.run_id: (r.info.run_name, r.data.tags["mlflow.runColor"])
                    for r in jobs if r.data.tags.get("mlflow.parentRunId") == parent}
        parent = (parent, client.get_run(parent).info.run_name)
        print(f"runs: {parent[1]!r} -> " + ", ".join(
            f"{name!r} {color}" for name, color in children.values()))
        port = free_port()
        # what `make ui` runs (Makefile), on a free port
        ui = subprocess.Popen([str(PYTHON), "-m", "lw.server_app", "server", "--app-name",
                               "lw-ui", "--backend-store-uri", store, "--default-artifact-root",
                               str(tmp / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src"),
                                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        screenshots(base, experiment, parent, children)
    finally:
        if ui is not None:
            os.killpg(ui.pid, 15)
            ui.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
