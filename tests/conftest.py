"""Shared fixtures: tiny params, prepared digits data, a copy of the repo for real `dvc repro` runs."""

from __future__ import annotations

import copy
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.params import DataParams, DistillParams, ModelParams, from_dict
from tasks.prepare import prepare, write_prepared
from tasks.workspace import copy_pipeline

RECIPE = {"optimizer": "adam", "lr": 0.01, "batch_size": 64, "epochs": 3, "seed": 0, "augment_shift": 1, "threads": 1}
TINY_PARAMS = {
    "data": {"source": "digits", "classes": list(range(10)), "input_shape": [1, 8, 8], "value_range": [0, 16],
             "split": {"train": 0.6, "validation": 0.15, "test": 0.25}, "seed": 0},
    "teacher": {"model": {"arch": "cnn", "channels": [8, 16], "hidden": 32}, "train": RECIPE},
    "student": {"model": {"arch": "mlp", "hidden": [16]}, "train": dict(RECIPE, augment_shift=0)},
    "distill": {"temperature": 4.0, "alpha": 0.7},
    "evaluate": {"threads": 1, "warmup": 2, "latency_repeats": 20, "throughput_batch": 32, "throughput_repeats": 2},
    "compress": {"finetune": {"epochs": 1}, "calibration_samples": 64, "recipes": {
        "pruned": {"source": "distilled", "steps": [{"method": "prune", "sparsity": 0.5, "rounds": 1}]},
        "int8": {"source": "distilled", "steps": [{"method": "quantize", "mode": "int8_dynamic"}]},
    }},
    "search": {"source": "distilled", "teacher": "", "max_accuracy_drop": 50.0, "budget": 2,
               "space": [[{"method": "prune", "sparsity": [0.3, 0.6], "rounds": 1}]]},
    "gate": {"min_accuracy": 0.5, "max_accuracy_drop": 50.0, "min_size_reduction": 2.0, "min_speedup": 0.0},
    "orchestration": {"task_runner": "thread", "workers": 2, "retries": 1, "retry_delay_seconds": 0.1},
    "sweep": {"method": "grid", "space": {"lr": [0.003, 0.01], "seed": [0, 1]}},
    "storage": {"backend": "local", "local_dir": "storage"},
    "registry": {"model_name": "tiny-digits", "review_timeout_seconds": 60, "review_poll_seconds": 0.5},
}


def tiny_params() -> dict:
    return copy.deepcopy(TINY_PARAMS)


def model_params(section: str, **train_overrides) -> ModelParams:
    values = tiny_params()[section]
    values["train"].update(train_overrides)
    return from_dict(ModelParams, values, section)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Digits, prepared once per session with the tiny params."""
    out = tmp_path_factory.mktemp("digits") / "prepared"
    write_prepared(out, *prepare(from_dict(DataParams, TINY_PARAMS["data"], "data")))
    return out


@pytest.fixture(scope="session")
def teacher_path(digits_dir, tmp_path_factory) -> Path:
    from tasks.models import save_model
    from tasks.train_teacher import train_teacher

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    trained = train_teacher(digits_dir, model_params("teacher", epochs=4))
    save_model(trained.model, path, trained.config)
    return path


def distill_params() -> DistillParams:
    return from_dict(DistillParams, TINY_PARAMS["distill"], "distill")


def tool_env() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first, so `python` and `dvc` are the venv's."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = ""
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def api_filter(resource: str, body: dict) -> list[dict]:
    """POST /<resource>/filter on the test server, as the UI does."""
    # prefect 3.8's typed client sends null for omitted filters, which this fastapi rejects (422),
    # and an empty flow-run/task-run filter drops artifacts that belong to no task run.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client.request("POST", f"/{resource}/filter", json={"limit": 100, "offset": 0, **body})
    return response.json()


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A fresh git + DVC repo holding this project's pipeline, with tiny params."""
    return copy_pipeline(tmp_path / "repo", tiny_params())


# Credentials exist only in the environment, as in production; the tests check they leak nowhere.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIASHRINKFLOWTESTKEY", "AWS_SECRET_ACCESS_KEY": "shrinkflow-test-secret-3f9a1c",
                  "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """moto's S3 API on 127.0.0.1 (a real HTTP server boto3 and dvc-s3 talk to); stop() and start() keep the data."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server_class = ThreadedMotoServer
        self.server = None

    def start(self) -> None:
        self.server = self._server_class(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def storage(self, bucket: str) -> dict:
        """params.yaml:storage for `bucket` on this server (no credentials: they come from the environment)."""
        return {"backend": "s3", "bucket": bucket, "prefix": "shrinkflow", "region": "us-east-1",
                "endpoint_url": self.endpoint, "attempts": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    saved = {key: os.environ.get(key) for key in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
