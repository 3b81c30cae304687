"""The scheduled deployment against a real local Prefect server and a real process worker."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from tasks.workspace import copy_pipeline
from tests.conftest import free_port, run, tiny_params, tool_env


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on loopback with its own SQLite home; stopped after the test."""
    url = f"http://127.0.0.1:{free_port()}/api"
    env = dict(tool_env(), PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=url)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", url.split(":")[2][:-4]],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            raise AssertionError(f"Prefect server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def api(env: dict, resource: str, body: dict) -> list[dict]:
    response = httpx.post(f"{env['PREFECT_API_URL']}/{resource}/filter", json={"limit": 50, "offset": 0, **body})
    response.raise_for_status()
    return response.json()


def test_scheduled_deployment_runs_on_a_process_worker(prefect_server, tmp_path):
    repo = copy_pipeline(tmp_path / "repo", tiny_params())
    env = dict(prefect_server, SHRINKFLOW_HOME=str(repo))

    def prefect(*args: str, timeout: float = 120) -> str:
        result = subprocess.run(["prefect", "--no-prompt", *args], cwd=repo, env=env, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, f"prefect {args}: {result.stdout}\n{result.stderr}"
        return result.stdout

    prefect("work-pool", "create", "shrinkflow", "--type", "process")
    prefect("deploy", "--all")
    (deployment,) = api(env, "deployments", {"deployments": {"name": {"any_": ["nightly"]}}})
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert deployment["work_pool_name"] == "shrinkflow"

    prefect("deployment", "run", "shrinkflow-pipeline/nightly")
    prefect("worker", "start", "--pool", "shrinkflow", "--run-once", timeout=600)
    runs = api(env, "flow_runs", {"deployments": {"id": {"any_": [deployment["id"]]}},
                                  "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}},
                                  "sort": "EXPECTED_START_TIME_DESC"})
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"]
    assert (repo / "models" / "distilled.safetensors").is_file()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout
