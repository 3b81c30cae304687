"""The promotion review in a real browser: `shrinkflow promote` pauses on a real `prefect server`, headless
Chromium answers the pause form in the Prefect UI as a person would, and the registry (local backend) shows
what was chosen in the browser."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from tasks.registry import open_registry
from tests.test_deployment import PrefectServer, start_prefect_server, stop
from tests.test_promotion import built_repo  # noqa: F401  (a fixture: the pipeline run once by `dvc repro`)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and its driver on PATH (Debian: apt-get install chromium chromium-driver; .ci/run does)")

CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    # Nothing but the local server: without these Chromium waits on DNS for its own services when offline.
    "--disable-quic", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1800",  # the whole review form fits in a failure's screenshot
]
STEP_SECONDS = 60  # the longest any one step in the browser may take: a page load, the form appearing
PAUSE_SECONDS = 180  # from `shrinkflow promote` to its pause: start-up, every candidate's lineage
FLOW_SECONDS = 300  # from the submitted review to the end of the flow: dvc push, registry upload
REVIEW_TIMEOUT_SECONDS = 600  # the flow's pause; the test ends it long before


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory) -> Iterator[PrefectServer]:
    """`prefect server start` with its UI on loopback and a home of its own; stopped after this module."""
    home = tmp_path_factory.mktemp("prefect-ui")
    # the server writes its UI build here rather than into the installed prefect package
    with start_prefect_server(home, {"PREFECT_SERVER_UI_STATIC_DIRECTORY": str(home / "ui")}) as server:
        yield server


@pytest.fixture
def repo(built_repo, tmp_path) -> Path:  # noqa: F811
    """A copy of the built pipeline; its registry and DVC remote are local (tiny params: storage.backend local)."""
    repo = tmp_path / "repo"
    shutil.copytree(built_repo, repo, symlinks=True)
    return repo


@pytest.fixture
def browser(tmp_path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile, driven by Debian's chromedriver (selenium downloads nothing)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(STEP_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def paused_promotion(server: PrefectServer, flow: subprocess.Popen, log: Path) -> str:
    """The id of the promotion run once it waits for its review."""
    deadline = time.monotonic() + PAUSE_SECONDS
    while not (runs := server.post("flow_runs/filter", {
            "flows": {"name": {"any_": ["shrinkflow-promote"]}},
            "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "limit": 10, "offset": 0})):
        if flow.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the promotion flow did not pause for a review:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    assert len(runs) == 1, runs
    return runs[0]["id"]


class ReviewPageV1:
    """The paused run in Prefect's V1 UI, at the address the flow logs ("View at ..."), and its Resume form."""

    FORM = (By.CLASS_NAME, "p-modal__card")
    DESCRIPTION = (By.CSS_SELECTOR, ".p-modal__card .markdown-renderer")
    REFUSALS = (By.CSS_SELECTOR, ".p-modal__card .p-label__message--failed")  # under each refused field
    SUBMIT = (By.XPATH, "//div[contains(@class, 'p-modal__footer')]//button[normalize-space()='Submit']")

    def __init__(self, driver: webdriver.Chrome, ui_url: str, run_id: str):
        self.driver, self.url = driver, f"{ui_url}/runs/flow-run/{run_id}"
        self.wait = WebDriverWait(driver, STEP_SECONDS)

    def until(self, condition, what: str):
        return self.wait.until(condition, f"waited {STEP_SECONDS} s for {what}")

    def visible(self, locator: tuple[str, str]) -> WebElement:
        return self.until(expected_conditions.visibility_of_element_located(locator), f"{locator[1]} to show")

    def click(self, locator: tuple[str, str]) -> None:
        self.until(expected_conditions.element_to_be_clickable(locator), f"{locator[1]} to be clickable").click()

    def open_form(self) -> str:
        """Open the run's page and press Resume; the form's description as shown."""
        self.driver.get(self.url)
        self.click((By.XPATH, "//button[normalize-space()='Resume']"))
        return self.visible(self.DESCRIPTION).text

    def field(self, label: str) -> WebElement:
        """The control (drop-down or text box) of the form field whose label starts with `label`."""
        return self.visible((By.XPATH, (
            "//div[contains(@class, 'p-modal__card')]//div[contains(concat(' ', @class, ' '), ' p-label ')]"
            f"[./div[contains(@class, 'p-label__header')]//span[starts-with(normalize-space(), '{label}')]]"
            "/div[contains(@class, 'p-label__body')]//*[self::select or self::textarea or self::input][1]")))

    def choose(self, label: str, value: str) -> list[str]:
        """Choose `value` in the drop-down; the values it offered."""
        drop_down = Select(self.field(label))
        offered = [option.get_attribute("value") for option in drop_down.options]
        drop_down.select_by_value(value)
        return offered

    def type(self, label: str, text: str) -> None:
        self.field(label).send_keys(text)

    def submit(self) -> None:
        self.click(self.SUBMIT)

    def refusals(self) -> list[str]:
        """What the UI says it refused, once it says it."""
        shown = self.until(expected_conditions.visibility_of_all_elements_located(self.REFUSALS),
                           f"the form to refuse the answer ({self.REFUSALS[1]})")
        return sorted(element.text for element in shown)

    def wait_closed(self) -> None:
        """Wait until the form has gone: the UI closes it once the server accepted the answer."""
        self.until(expected_conditions.invisibility_of_element_located(self.FORM), "the form to close")


class ReviewPageV2(ReviewPageV1):
    """The paused run in Prefect's V2 UI (3.8's default: where the dashboard leads) and its Resume dialog."""

    FORM = (By.XPATH, "//*[@role='dialog']")
    DESCRIPTION = (By.XPATH, "//*[@role='dialog']//*[contains(@class, 'prose')]")
    REFUSALS = (By.CSS_SELECTOR, "[data-sonner-toast][data-type='error']")  # it sends, the server refuses
    SUBMIT = (By.XPATH, "//*[@role='dialog']//button[normalize-space()='Resume']")

    def __init__(self, driver: webdriver.Chrome, ui_url: str, run_id: str):
        super().__init__(driver, ui_url, run_id)
        self.url = f"{ui_url}/v2/runs/flow-run/{run_id}"

    def open_form(self) -> str:
        """Open the run's page, then Resume in its menu; the dialog's description as shown."""
        self.driver.get(self.url)
        self.click((By.XPATH, "(//button[.//span[normalize-space()='Open menu']])[1]"))  # the run's, top right
        self.click((By.XPATH, "//*[@role='menuitem'][normalize-space()='Resume']"))
        return self.visible(self.DESCRIPTION).text

    def choose(self, label: str, value: str) -> list[str]:
        self.click((By.XPATH, f"//*[@role='dialog']//button[@aria-label='Select {label}']"))
        options = (By.XPATH, "//*[@role='listbox']//*[@role='option']")
        offered = [option.text for option in self.until(
            expected_conditions.visibility_of_all_elements_located(options), f"the {label} options to show")]
        self.click((By.XPATH, f"{options[1]}[normalize-space()='{value}']"))
        return offered

    def type(self, label: str, text: str) -> None:
        field = self.visible((By.XPATH, f"//*[@role='dialog']//label[starts-with(normalize-space(), '{label}')]"))
        self.driver.find_element(By.ID, field.get_attribute("for")).send_keys(text)


@dataclass
class PausedReview:
    page: ReviewPageV1
    flow: subprocess.Popen
    log: Path
    run_id: str

    def result(self) -> dict:
        """Wait for the flow to end; what `shrinkflow promote` printed."""
        self.flow.wait(timeout=FLOW_SECONDS)
        assert self.flow.returncode == 0, f"shrinkflow promote exited with {self.flow.returncode}"
        printed = self.log.read_text().splitlines()
        return json.loads(next(line for line in reversed(printed) if line.startswith("{")))


@contextlib.contextmanager
def review_in_browser(server: PrefectServer, repo: Path, driver: webdriver.Chrome, page: type[ReviewPageV1],
                      directory: Path) -> Iterator[PausedReview]:
    """`shrinkflow promote` in `repo`, paused for its review, with its `page` in the browser.

    On any failure inside, saves what the browser showed and names the files (and the flow's output) in the
    message; the flow is stopped if it is still running.
    """
    log = directory / "promote.log"
    with open(log, "w") as out:
        flow = subprocess.Popen(["shrinkflow", "promote", "--timeout", str(REVIEW_TIMEOUT_SECONDS)], cwd=repo,
                                env=server.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run_id = paused_promotion(server, flow, log)
        yield PausedReview(page(driver, server.url.removesuffix("/api"), run_id), flow, log, run_id)
    except Exception as error:
        screenshot, source = directory / "browser.png", directory / "browser.html"
        try:
            driver.save_screenshot(str(screenshot))
            source.write_text(driver.page_source)
            shown = f"browser at {driver.current_url}\nscreenshot: {screenshot}\npage source: {source}"
        except WebDriverException as lost:  # the browser itself failed
            shown = f"no screenshot, the browser is gone: {lost.msg}"
        raise AssertionError(f"{type(error).__name__}: {error}\n{shown}\n"
                             f"flow output ({log}):\n{log.read_text()[-3000:]}") from error
    finally:
        if flow.poll() is None:
            stop(flow)


def run_state(server: PrefectServer, run_id: str) -> str:
    return server.get(f"flow_runs/{run_id}")["state"]["type"]


def test_approve_in_the_v1_ui_registers_the_version_with_the_reviewer(prefect_ui, repo, browser, tmp_path):
    with review_in_browser(prefect_ui, repo, browser, ReviewPageV1, tmp_path) as review:
        assert "Nothing is in production yet." in review.page.open_form()
        review.page.submit()  # nothing chosen: the form refuses, as no decision is preselected
        assert review.page.refusals() == ["'decision' is a required property", "'reviewer' is a required property"]
        assert run_state(prefect_ui, review.run_id) == "PAUSED"
        offered = review.page.choose("Candidate", "pruned")
        assert {"pruned", "search"} <= set(offered) and "student" not in offered  # student: lineage incomplete
        review.page.choose("Decision", "approve")
        review.page.type("Reviewer", "Zoë Browser")
        review.page.type("Comment", "approved in Chromium")
        review.page.submit()
        review.page.wait_closed()
        assert review.result() == {"outcome": "promoted", "candidate": "pruned", "version": 1}
        assert run_state(prefect_ui, review.run_id) == "COMPLETED"
        registry = open_registry(repo)
        manifest = registry.verify(1)
        assert (manifest["candidate"], manifest["approved_by"]) == ("pruned", "Zoë Browser")
        assert registry.alias()["version"] == 1
        approval = json.loads(registry.read(1, "approval.json"))
        assert (approval["comment"], approval["flow_run_id"]) == ("approved in Chromium", review.run_id)


def test_reject_in_the_v2_ui_only_records_the_review(prefect_ui, repo, browser, tmp_path):
    with review_in_browser(prefect_ui, repo, browser, ReviewPageV2, tmp_path) as review:
        assert "Nothing is in production yet." in review.page.open_form()
        review.page.type("Reviewer", "Ana Reviewer")
        review.page.submit()  # no decision chosen: refused, the run stays paused
        refusal = "Reason: Validation failed. Failure reason: 'decision' is a required property"
        assert review.page.refusals() == [refusal]
        assert run_state(prefect_ui, review.run_id) == "PAUSED"
        offered = review.page.choose("Candidate", "search")
        assert {"pruned", "search"} <= set(offered) and "student" not in offered
        review.page.choose("Decision", "reject")
        review.page.type("Comment", "wait for the bigger eval set")
        review.page.submit()
        review.page.wait_closed()
        assert review.result() == {"outcome": "rejected", "candidate": "search"}
        registry = open_registry(repo)
        assert registry.versions() == [] and registry.alias() is None and registry.claimed_numbers() == []
        assert [(r["decision"], r["candidate"], r["reviewer"], r["comment"], r["flow_run_id"])
                for r in registry.reviews()] == [
            ("reject", "search", "Ana Reviewer", "wait for the bigger eval set", review.run_id)]
