"""The MLflow UI in a real browser: a finished sweep's child runs and its parent's ``pareto.html`` render.

A real ``mlflow server`` (tests/mlflow_server.py) serves the session's finished test sweep on 127.0.0.1, and
headless Chromium (Debian's ``chromium`` driven through Debian's ``chromium-driver`` by Selenium; nothing is
downloaded) walks the path of dashboards/README.md: the experiment's run table with the child runs under the
parent, the ``tags.pareto = 'true'`` filter, and the parent's Artifacts tab showing ``pareto.html`` — whose plot
must show one front point per front run, the base model, and a trial's config on hover. Screenshots land in
``test-artifacts/mlflow-ui/`` (or ``$VLADSWEEP_TEST_ARTIFACTS/mlflow-ui/``).

Linux only (skipped elsewhere). A missing Chromium, chromedriver or Selenium FAILS the test, naming the command that
installs it (.ci/system-deps.sh, which the README's test command runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, FinishedSweep, fail_missing_system_tools
from mlflow_server import MlflowServer, mlflow_server

from sweep.tracking import (
    EXPERIMENT_KIND_MODEL_TRAINING,
    EXPERIMENT_KIND_TAG,
    ROLE_TAG,
    ui_links,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the browser test runs on Linux only"),
]

#: The UI loads a large single-page app; on a busy 2-core machine a page can take tens of seconds.
UI_WAIT_S = 120


@pytest.fixture(scope="module")
def shots_dir() -> Path:
    base = Path(os.environ.get("VLADSWEEP_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path = base / "mlflow-ui"
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.png"):
        old.unlink()
    return path


@pytest.fixture(scope="module")
def mlflow_ui(finished_sweep: FinishedSweep, shots_dir: Path) -> Iterator[MlflowServer]:
    """``mlflow server`` over the sweep's store, started from the sweep's folder as a user would."""
    with mlflow_server(
        finished_sweep.mlflow_uri,
        log_path=shots_dir / "mlflow-server.log",
        artifact_root=finished_sweep.root / "mlruns",
        cwd=finished_sweep.root,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def chromium(shots_dir: Path):
    """Headless Chromium under Selenium, with Debian's browser and driver given by path (no Selenium Manager)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.fail(f"selenium is not installed ({exc}): `pip install -e '.[test]'` installs it.")
    found = {}
    for name, env in (("chromium", "VLADSWEEP_CHROMIUM"), ("chromedriver", "VLADSWEEP_CHROMEDRIVER")):
        path = os.environ.get(env) or shutil.which(name)
        if not path or not os.access(path, os.X_OK):
            if os.environ.get(env):
                pytest.fail(f"{name} not found (${env}={path} is not an executable)")
            fail_missing_system_tools(
                [f"{name} (Debian's {'chromium' if name == 'chromium' else 'chromium-driver'})"]
            )
        found[name] = path
    browser, driver_path = found["chromium"], found["chromedriver"]
    # Selenium Manager would try to download a driver or browser when it thinks one is missing; never here.
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--window-size=1600,1100",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(driver_path, log_output=str(shots_dir / "chromedriver.log")), options=options
    )
    driver.set_page_load_timeout(UI_WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition: Callable, what: str | Callable[[], str], timeout: float = UI_WAIT_S):
    """``condition(driver)`` once truthy; else an AssertionError saying what did not show (``what()`` is read
    then, so it can describe the page as it was at the end)."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # The run table re-renders while it loads: an element read in one poll can be gone in the next; poll again.
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.25, ignored_exceptions=(StaleElementReferenceException,)
    )
    try:
        return wait.until(condition)
    except TimeoutException as exc:
        text = what() if callable(what) else what
        raise AssertionError(f"the MLflow UI did not show {text} within {timeout:.0f} s") from exc


def _run_links(driver) -> dict[str, str]:
    """Run id → run name of every run link in the run table (read again if the table re-rendered meanwhile)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            links = {}
            for a in driver.find_elements(By.CSS_SELECTOR, 'div[role="gridcell"] a[href*="/runs/"]'):
                href = a.get_attribute("href") or ""
                links[href.rstrip("/").rsplit("/", 1)[-1]] = (a.get_attribute("textContent") or "").strip()
            return links
        except StaleElementReferenceException:
            time.sleep(0.25)
    return {}


def _close_assistant(driver) -> None:
    """The UI opens an assistant side panel; closing it gives the runs and the artifact view the width."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(
        By.CSS_SELECTOR, 'button[data-component-id="mlflow.assistant.chat_panel.close"]'
    ):
        if button.is_displayed():
            button.click()


def test_mlflow_ui_shows_child_runs_and_the_parents_pareto_plot(
    chromium, finished_sweep: FinishedSweep, mlflow_ui: MlflowServer, shots_dir: Path
):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # What the store holds, read through the server's REST API: the expectations for the pages.
    client = mlflow.MlflowClient(mlflow_ui.url)
    experiment = client.get_experiment_by_name(finished_sweep.experiment)
    assert experiment is not None, f"{mlflow_ui.url} has no experiment {finished_sweep.experiment!r}"
    exp_id = experiment.experiment_id
    parents = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'sweep' and attributes.run_name = '{finished_sweep.name}'",
    )
    assert len(parents) == 1, f"expected one parent run named {finished_sweep.name!r}, found {len(parents)}"
    parent = parents[0]
    children = client.search_runs(
        [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    front = {r.info.run_id: r for r in children if r.data.tags.get("pareto") == "true"}
    assert children and front, "the test sweep should have child runs and a non-empty front"
    by_trial = {r.data.tags["trial_id"]: r for r in children}
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND_MODEL_TRAINING
    for run in children:  # names a human can read: "t0003 12.1x mAP 0.812" (a failed trial: "t0003")
        assert re.fullmatch(r"t\d{4}( \S+x mAP \d\.\d{3})?", run.info.run_name), run.info.run_name
    links_to = ui_links(mlflow_ui.url, exp_id, parent.info.run_id)
    assert links_to["runs"].replace(mlflow_ui.url, "http://127.0.0.1:5000") in finished_sweep.stdout, (
        "the sweep prints the link to its runs table"
    )

    driver = chromium
    shots: list[Path] = []

    def shot(name: str) -> None:
        path = shots_dir / f"{name}.png"
        driver.save_screenshot(str(path))
        shots.append(path)

    try:
        # 1. The link the sweep prints lands on the experiment's runs table (not the GenAI overview): the parent
        # by the sweep's name, its child runs folded under it.
        parent_xpath = f'//div[@role="gridcell"]//a[contains(@href, "/runs/{parent.info.run_id}")]'
        driver.get(links_to["runs"])
        _wait(driver, lambda d: d.find_elements(By.XPATH, parent_xpath), "the run table")
        assert "/overview" not in driver.current_url, driver.current_url
        assert not driver.find_elements(By.XPATH, '//*[normalize-space(text())="Token usage"]'), (
            "the GenAI overview is shown"
        )
        _close_assistant(driver)
        shot("0-landing-runs-table")
        parent_link = _wait(
            driver,
            lambda d: d.find_elements(By.XPATH, parent_xpath),
            f"the parent run {parent.info.run_id} in the run table",
        )[0]
        assert parent_link.get_attribute("textContent").strip() == finished_sweep.name
        child_ids = {r.info.run_id for r in children}
        if not child_ids <= _run_links(driver).keys():
            # The expand (+) button sits in the parent's run-name cell.
            parent_link.find_element(By.XPATH, './ancestor::div[@role="gridcell"]//button').click()
        links = _wait(
            driver,
            lambda d: links if child_ids <= (links := _run_links(d)).keys() else False,
            f"the {len(children)} child runs after expanding the parent",
        )
        for run in children:
            assert links[run.info.run_id] == run.info.run_name, (
                f"child run {run.info.run_id} shows the wrong name"
            )
        shot("1-runs")

        # 2. README's filter: `tags.pareto = 'true'` leaves exactly the front runs.
        search = driver.find_element(By.CSS_SELECTOR, 'input[data-testid="search-box"]')
        search.send_keys("tags.pareto = 'true'", Keys.ESCAPE, Keys.ENTER)
        _wait(
            driver,
            lambda d: set(_run_links(d)) - {parent.info.run_id} == set(front),
            lambda: (
                f"only the {len(front)} front runs after filtering by tags.pareto = 'true' "
                f"(shown: {sorted(_run_links(driver).values())})"
            ),
        )
        shot("2-runs-filtered-to-front")

        # 3. The parent run's page, its Artifacts tab: pareto.html renders in the (sandboxed) iframe of the
        # artifact pane.
        driver.find_element(By.XPATH, parent_xpath).click()
        _wait(
            driver,
            lambda d: d.find_elements(By.XPATH, '//*[@role="tab"][normalize-space(.)="Artifacts"]'),
            "the Artifacts tab of the parent run's page",
        )[0].click()
        entry = _wait(
            driver,
            lambda d: [e for e in d.find_elements(By.XPATH, '//*[text()="pareto.html"]') if e.is_displayed()],
            "pareto.html in the parent run's artifact list",
        )[0]
        _close_assistant(driver)
        entry.click()
        frame = _wait(
            driver,
            lambda d: d.find_elements(By.CSS_SELECTOR, "iframe.mlflow-html-iframe"),
            "the HTML artifact view of pareto.html",
        )[0]
        driver.switch_to.frame(frame)
        plot = _wait(
            driver, lambda d: d.find_elements(By.CSS_SELECTOR, "svg#pareto-plot"), "svg#pareto-plot"
        )[0]
        front_points = plot.find_elements(By.CSS_SELECTOR, "circle.point.front")
        point_runs = {p.get_attribute("data-trial-id"): p for p in front_points}
        n_front_points, n_front_runs = len(front_points), len(front)
        assert n_front_points == n_front_runs, (
            f"pareto.html draws {n_front_points} front points; MLflow has {n_front_runs} runs tagged pareto=true"
        )
        assert {by_trial[t].info.run_id for t in point_runs if t in by_trial} == set(front), (
            "the front points are not the runs tagged pareto=true"
        )
        assert len(plot.find_elements(By.CSS_SELECTOR, "circle.point")) == len(children)
        assert plot.find_elements(By.CSS_SELECTOR, "#base-point"), "pareto.html has no base point"

        # 4. Hovering a front point shows its trial and config — the params MLflow logged for that run.
        trial_id, point = next(iter(point_runs.items()))
        ActionChains(driver).move_to_element(point).perform()
        tooltip = driver.find_element(By.ID, "tooltip")
        _wait(
            driver,
            lambda d: tooltip.is_displayed() and tooltip.text.strip(),
            "the tooltip of a hovered point",
        )
        text = tooltip.text
        assert f"trial {trial_id}" in text, text
        params = by_trial[trial_id].data.params
        config = json.loads(point.get_attribute("data-config"))
        assert config, "the front point carries no config"
        for key, value in config.items():
            assert f"{key}: " in text, f"the tooltip lacks {key}:\n{text}"
            if isinstance(value, int) and not isinstance(value, bool):
                assert f"{key}: {params[key]}" in text, f"the tooltip's {key} differs from the run's param"
        driver.switch_to.default_content()
        shot("3-parent-pareto-html-hover")

        # 5. The chart view of the same runs (dashboards/README.md: add a scatter of memory_mib vs val_mAP).
        driver.get(links_to["runs"] + "&compareRunsMode=CHART")
        _wait(
            driver,
            lambda d: (
                "compareRunsMode=CHART" in d.current_url
                and re.search(r"\b[1-9]\d* matching runs", d.find_element(By.TAG_NAME, "body").text)
            ),
            "the chart view with its runs loaded",
        )
        _close_assistant(driver)
        shot("4-chart-view")

        # 6. The parent's pareto.html straight from the link the sweep prints (and the parent's description).
        driver.get(links_to["pareto"])
        _wait(
            driver,
            lambda d: d.find_elements(By.CSS_SELECTOR, "iframe.mlflow-html-iframe"),
            "pareto.html opened by its link",
        )
        _close_assistant(driver)
        shot("5-pareto-html-by-link")
    except BaseException:
        driver.switch_to.default_content()
        shot("failed")
        (shots_dir / "failed.html").write_text(driver.page_source)
        raise
    finally:
        print(f"screenshots of the MLflow UI: {', '.join(str(p) for p in shots)}")
