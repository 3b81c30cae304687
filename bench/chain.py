"""Benchmark: one unattended nightly chain on digits, from the scheduler's run to the alias move.

A scratch workspace with this checkout's params.yaml (digits, local DVC remote and registry) is
committed once, as a user's repository would be. A real `prefect server` (UI on, scheduler every
second) gets `prefect deploy --all`; its own scheduler creates the 02:00 UTC runs, and the earliest
is moved to now (it stays the scheduler's run). One long-running process worker takes it: the
pipeline runs, records itself on a run ref, pushes, and starts `shrinkflow-promote/review`, which
suspends. Headless Chromium then answers the Resume form in the V2 UI as a reviewer would (the
preselected candidate, approve, a name) and the worker picks the run up again and promotes.

Printed: each step's wall time, the whole chain (rescheduled run -> alias moved), and the seconds
from Submit to the alias moving, which include the worker's poll interval (`--worker-poll-seconds`,
Prefect's default 10). The browser and server helpers are the tests' (tests/test_browser.py,
tests/test_deployment.py), so install the test extras and Debian's chromium + chromium-driver.

    python bench/chain.py [--worker-poll-seconds 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

from tasks.registry import open_registry  # noqa: E402
from tasks.workspace import copy_pipeline  # noqa: E402
from tests.conftest import run  # noqa: E402
from tests.test_browser import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, ReviewPageV2  # noqa: E402
from tests.test_deployment import SERVER_SETTINGS, PrefectServer, start_prefect_server, stop  # noqa: E402

OUT = ROOT / "bench" / "out" / "chain"
CHAIN_SECONDS = 3600  # the whole chain's deadline: the pipeline on digits takes minutes
ENDED = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def wait_for(what: str, check, deadline: float, poll: float = 0.5):
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(poll)
    return value


def run_state(server: PrefectServer, run_id: str) -> str:
    return server.get(f"flow_runs/{run_id}")["state"]["type"]


def flow_runs(server: PrefectServer, deployment: str, *state_types: str) -> list[dict]:
    deployment_id = server.get(f"deployments/name/{deployment}")["id"]
    return server.flow_runs(deployment_id, *state_types)


def chain(workspace: Path, server: PrefectServer, driver: webdriver.Chrome, poll_seconds: int) -> dict[str, float]:
    env = dict(server.env, SHRINKFLOW_HOME=str(workspace), PREFECT_WORKER_QUERY_SECONDS=str(poll_seconds))

    def prefect(*args: str) -> None:
        done = subprocess.run(["prefect", "--no-prompt", *args], cwd=workspace, env=env, capture_output=True,
                              text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"prefect {args}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    deadline = time.monotonic() + CHAIN_SECONDS
    prefect("work-pool", "create", "shrinkflow", "--type", "process")
    prefect("deploy", "--all")
    scheduled = wait_for("the scheduler's nightly runs",
                         lambda: flow_runs(server, "shrinkflow-pipeline/nightly", "SCHEDULED"), deadline)
    nightly = scheduled[0]
    with open(OUT / "worker.log", "w") as log:
        worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "shrinkflow"], cwd=workspace, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.monotonic()
        server.post(f"flow_runs/{nightly['id']}/set_state", {"state": {
            "type": "SCHEDULED", "name": "Scheduled", "message": "moved to now by bench/chain.py",
            "state_details": {"scheduled_time": datetime.now(timezone.utc).isoformat()}}})
        ended = wait_for("the nightly run to end", lambda: run_state(server, nightly["id"]) in ENDED
                         and run_state(server, nightly["id"]), deadline, poll=2)
        pipeline_done = time.monotonic()
        if ended != "COMPLETED":
            raise RuntimeError(f"the nightly run ended {ended}; see {OUT / 'worker.log'}")
        [review] = wait_for("the review to be started", lambda: flow_runs(server, "shrinkflow-promote/review"),
                            deadline)
        wait_for("the review to suspend", lambda: run_state(server, review["id"]) == "PAUSED", deadline)
        suspended = time.monotonic()

        page = ReviewPageV2(driver, server.url.removesuffix("/api"), review["id"])
        page.open_form()
        page.choose("Decision", "approve")
        page.type("Reviewer", "bench reviewer")
        page.type("Comment", "bench/chain.py")
        submitted = time.monotonic()
        page.submit()
        page.wait_closed()
        registry = open_registry(workspace)
        wait_for("the production alias", registry.alias, deadline, poll=0.2)
        moved = time.monotonic()
        wait_for("the review run to complete", lambda: run_state(server, review["id"]) == "COMPLETED", deadline)
    finally:
        stop(worker)
    alias = registry.alias()
    manifest = registry.verify(alias["version"])
    return {"candidate": manifest["candidate"], "approved_by": manifest["approved_by"],
            "pipeline_seconds": pipeline_done - start, "review_start_to_suspended_seconds": suspended - pipeline_done,
            "submit_to_alias_seconds": moved - submitted, "chain_seconds": moved - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker-poll-seconds", type=int, default=10,
                        help="PREFECT_WORKER_QUERY_SECONDS of the worker (Prefect's default: 10)")
    args = parser.parse_args()
    if not (CHROMIUM and CHROMEDRIVER):
        sys.exit("needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    workspace = copy_pipeline(OUT / "workspace", yaml.safe_load((ROOT / "params.yaml").read_text()))
    run(["git", "add", "-A"], workspace)
    run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "the user's repo"],
        workspace)
    server_settings = {key: value for key, value in SERVER_SETTINGS.items() if key != "PREFECT_SERVER_UI_ENABLED"}
    server_settings["PREFECT_SERVER_UI_STATIC_DIRECTORY"] = str(OUT / "ui")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={OUT / 'chromium-profile'}"]:
        options.add_argument(flag)
    with start_prefect_server(OUT, server_settings) as server:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            figures = chain(workspace, server, driver, args.worker_poll_seconds)
        finally:
            driver.quit()
    figures["worker_poll_seconds"] = args.worker_poll_seconds
    (OUT / "chain.json").write_text(json.dumps(figures, indent=2))
    print(f"promoted {figures['candidate']} (approved by {figures['approved_by']} in Chromium)")
    for key in ("pipeline_seconds", "review_start_to_suspended_seconds", "submit_to_alias_seconds", "chain_seconds"):
        print(f"  {key.removesuffix('_seconds').replace('_', ' '):<28} {figures[key]:8.1f} s")
    print(f"  worker poll interval         {args.worker_poll_seconds:8d} s")


if __name__ == "__main__":
    main()
