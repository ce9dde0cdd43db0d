"""The MLflow UI as a teammate meets it, in Debian's headless chromium (selenium, the `docs`
and `dev` extras): a sweep of two models logged to `python -m lw.server`, then a fresh browser,
logged in by the basic-auth header (never credentials in the URL), opens the plain experiment
link and a run page: both must show the runs, not MLflow's GenAI overview; the chart view must
draw the two models' curves in two colours (lw's mlflow.runColor)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON, ROOT, cli_env, free_port, lw_cli, wiki_records

ADMIN_PW = "admin-Secret-4711-ui"
MISSING = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
try:
    import selenium  # noqa: F401
except ImportError:
    MISSING.append("selenium (pip install -e '.[docs]')")
pytestmark = [pytest.mark.slow,  # services or whole sweeps: not in make test-fast
              pytest.mark.skipif(bool(MISSING), reason="no " + ", ".join(MISSING)
                                 + " (apt-get install -y chromium chromium-driver)")]
sys.path.insert(0, str(ROOT / "docs" / "ui"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """lw.server on a SQLite store, and a 2-model sweep logged to it by the admin."""
    tmp = tmp_path_factory.mktemp("ui")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = cli_env(LW_SERVER_DB=f"sqlite:///{tmp}/server/mlflow.db",
                  LW_SERVER_ARTIFACTS=str(tmp / "server" / "artifacts"),
                  LW_SERVER_ADMIN_PASSWORD=ADMIN_PW)
    with open(tmp / "server.log", "w") as log:
        server = subprocess.Popen([str(PYTHON), "-m", "lw.server", "--port", str(port),
                                   "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a guard: MLflow's start takes minutes when busy
        while True:
            assert server.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "lw.server did not answer in 600 s"
                time.sleep(0.5)
        data = tmp / "prompts.txt"
        data.write_text("".join(r["extract"] + "\n" for r in wiki_records()[:4]))
        done = lw_cli(tmp, "-m", "model=tiny-pythia,tiny-mamba", "data=local",
                      f"data.path={data}", "data.n_prompts=4", "data.max_tokens=24",
                      "metrics=[prompt_entropy]", "tracking=server",
                      f"hydra.sweep.dir={tmp}/multirun",
                      env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "admin",
                           "MLFLOW_TRACKING_PASSWORD": ADMIN_PW})
        assert done.returncode == 0, done.stderr[-3000:]
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PW)
        try:
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("lw").experiment_id
            runs = client.search_runs([experiment])
        finally:
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(name)
        yield {"uri": uri, "experiment": experiment, "runs": runs, "sweep": done,
               "log": tmp / "server.log"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


class LoggedIn:
    """A fresh chromium profile sending the admin's basic-auth header on every request (what
    the browser's login prompt does once a user has typed it)."""

    def __init__(self):
        from screenshots import Browser

        self.browser = Browser(1600, 1200)
        token = base64.b64encode(f"admin:{ADMIN_PW}".encode()).decode()
        self.browser.d.execute_cdp_cmd("Network.enable", {})
        self.browser.d.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                       {"headers": {"Authorization": f"Basic {token}"}})

    def __enter__(self):
        return self.browser

    def __exit__(self, *exc):
        self.browser.__exit__(*exc)


def view_of(b) -> str:
    """Which view the UI shows: its GenAI / Model training switch's pick, once the page has
    loaded its tabs."""
    def picked(d):
        return d.execute_script(
            "return window.localStorage.getItem('mlflow.workflowType_v1')") and (
            "/runs" in d.current_url or "/overview" in d.current_url
            or "/traces" in d.current_url)
    b.wait(picked, 120, "the experiment page did not open")
    return b.d.execute_script("return window.localStorage.getItem('mlflow.workflowType_v1')")


def test_the_sweep_prints_its_runs_link_and_the_runs_carry_user_colour_and_short_names(served):
    link = f"{served['uri']}/#/experiments/{served['experiment']}?workflowType=machine_learning"
    printed = served["sweep"].stdout
    assert re.search(rf"sweep \w+ started; its runs: {re.escape(link)}", printed), printed
    assert re.search(rf"sweep done: 2 of 2 .*its runs: {re.escape(link)}", printed), printed
    jobs = [r for r in served["runs"] if "mlflow.parentRunId" in r.data.tags]
    parent = next(r for r in served["runs"] if "mlflow.parentRunId" not in r.data.tags)
    assert sorted(r.info.run_name for r in jobs) == ["tiny-mamba", "tiny-pythia"]
    assert parent.info.run_name == "sweep tiny-pythia,tiny-mamba"
    assert {r.data.tags["mlflow.user"] for r in served["runs"]} == {"admin"}
    colors = {r.data.tags["lw.model"]: r.data.tags["mlflow.runColor"] for r in jobs}
    assert len(set(colors.values())) == 2
    assert "<id>" not in served["log"].read_text()


def test_a_fresh_browser_lands_on_the_runs_not_genai(served):
    from selenium.webdriver.common.by import By

    base, experiment = served["uri"], served["experiment"]
    with LoggedIn() as b:  # the plain link, as in the experiment list
        b.d.get(f"{base}/#/experiments/{experiment}")
        assert view_of(b) == '"machine_learning"'
        b.wait(lambda d: "/runs" in d.current_url, 60, f"not on the runs: {b.d.current_url}")
        parent = next(r for r in served["runs"] if "mlflow.parentRunId" not in r.data.tags)
        b.find(f"//div[@row-id='{parent.info.run_id}']")  # the sweep's row in the runs table
    job = next(r for r in served["runs"] if "mlflow.parentRunId" in r.data.tags)
    with LoggedIn() as b:  # a run page
        b.d.get(f"{base}/#/experiments/{experiment}/runs/{job.info.run_id}")
        b.find(f"//*[normalize-space(text())='{job.info.run_name}']")
        assert view_of(b) == '"machine_learning"'
        b.find("//*[normalize-space(text())='Model metrics']")  # the training run's tabs
        assert not b.d.find_elements(By.XPATH, "//*[normalize-space(text())='Evaluations']")


def test_two_models_are_drawn_in_two_colours(served):
    from screenshots import check

    base, experiment = served["uri"], served["experiment"]
    parent = next(r for r in served["runs"] if "mlflow.parentRunId" not in r.data.tags)
    with LoggedIn() as b:
        b.d.get(f"{base}/#/experiments/{experiment}")
        b.wait(lambda d: "/runs" in d.current_url, 120, "not on the runs view")
        b.close_assistant()
        b.click(f"//div[@row-id='{parent.info.run_id}']//button[contains(@data-component-id,"
                "'runnamecellrenderer')]")  # expand the sweep's parent run
        b.click("//input[@type='radio'][@value='CHART']")
        b.find("//input[@placeholder='Search metric charts']").send_keys(
            "^depth/prompt_entropy/max$")
        check(b, "depth/prompt_entropy/max", 2, 1000)


def test_the_report_page_reads_on_a_laptop_screen(served, tmp_path, monkeypatch):
    """lw.report's page at 1366 x 768: nothing runs off the right edge (the summary table
    scrolls in its own box), the curve figures sit side by side, each titled once."""
    from screenshots import Browser
    from selenium.webdriver.common.by import By

    from lw.report import main as report

    for name, value in (("MLFLOW_TRACKING_URI", served["uri"]),
                        ("MLFLOW_TRACKING_USERNAME", "admin"),
                        ("MLFLOW_TRACKING_PASSWORD", ADMIN_PW)):
        monkeypatch.setenv(name, value)
    report(["--all", "--no-log", "--out", str(tmp_path)])
    with Browser(1366, 768) as b:
        b.d.get((tmp_path / "index.html").as_uri())
        b.wait(lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"), 60,
            "the figures did not load")
        page, window = b.d.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert page <= window
        box = b.d.find_element(By.CSS_SELECTOR, "div.table")
        assert b.d.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth"
                                  " || arguments[0].clientWidth <= window.innerWidth", box)
        tops = [img.rect["y"] for img in b.d.find_elements(By.CSS_SELECTOR, ".grid img")]
        assert len(tops) >= 2 and len(set(tops)) < len(tops)  # at least two in one row
        captions = [c.text for c in b.d.find_elements(By.CSS_SELECTOR, ".grid figcaption")]
        assert len(captions) == len(set(captions)) == len(tops)
