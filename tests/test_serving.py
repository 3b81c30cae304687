"""predict and serve the production model of a real registry (a local directory; S3 on moto) of tiny models."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tasks.models import load_model, save_model
from tasks.prepare import DataError
from tasks.compression.quantization import OnnxClassifier, export_onnx
from tasks.registry import RegistryError, open_registry
from tasks.serving import ServingError, load_test, make_server, predict
from tasks.training import train_model
from tests.conftest import model_params, tiny_params

SERVE = {"poll_seconds": 0.1, "max_instances": 50, "max_request_bytes": 65536}
WAIT_SECONDS = 30  # bound on waiting for the server to follow an alias move


@pytest.fixture(scope="module")
def models(digits_dir, tmp_path_factory) -> dict[str, Path]:
    """A 1-epoch MLP as safetensors, and its ONNX export."""
    directory = tmp_path_factory.mktemp("serving-models")
    trained = train_model(digits_dir, model_params("student", epochs=1), role="student")
    save_model(trained.model, directory / "mlp.safetensors", trained.config)
    export_onnx(trained.model, directory / "mlp.onnx", trained.config)
    return {"safetensors": directory / "mlp.safetensors", "onnx": directory / "mlp.onnx"}


def lineage(candidate: str, runtime: str) -> dict:
    """What tasks/lineage.py records, as far as serving reads it: runtime, and the prepare stage's data params."""
    return {"candidate": candidate, "stage": f"compress@{candidate}", "steps": [], "teacher": None,
            "data": {"source": "digits", "prepared": {"path": "data/prepared", "stage": "prepare", "md5": "0" * 32}},
            "stages": {"prepare": {"cmd": "python -m tasks.prepare data/prepared", "deps": {}, "outs": {},
                                   "params": {"data": tiny_params()["data"]}}},
            "code": {"git_revision": "0" * 40, "dirty": False}, "metrics": {"runtime": runtime},
            "gate": {"passed": True, "failures": []}, "problems": []}


def workspace(root: Path, models: dict[str, Path], storage: dict | None = None) -> Path:
    """A workspace whose registry holds v1 (PyTorch), v2 (ONNX model) and v3 (safetensors + runtime.onnx,
    on ONNX Runtime); production -> v1."""
    root.mkdir()
    params = dict(tiny_params(), serve=SERVE)
    params["storage"] = storage or params["storage"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    registry = open_registry(root)
    approval = {"decision": "approve", "reviewer": "ana", "comment": "test", "decided_at": "now"}
    safetensors, onnx = models["safetensors"].read_bytes(), models["onnx"].read_bytes()
    registry.register({"model.safetensors": safetensors}, lineage("pruned", "pytorch"), approval)
    registry.register({"model.onnx": onnx}, lineage("int8", "onnxruntime"), approval)
    registry.register({"model.safetensors": safetensors, "runtime.onnx": onnx}, lineage("slim", "onnxruntime"),
                      approval)
    registry.promote(1, "ana", "first")
    return root


@pytest.fixture
def root(tmp_path, models) -> Path:
    return workspace(tmp_path / "workspace", models)


def raw_digits(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Raw 8x8 digit images (values 0-16, as params.yaml:data declares) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images[:n], digits.target[:n]


def in_process(model_file: Path, images: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Classes and probabilities the model file itself gives, inputs scaled as prepare scales training data."""
    x = (images.astype(np.float64) / 16).astype(np.float32).reshape(len(images), 1, 8, 8)
    if model_file.suffix == ".onnx":
        logits = torch.from_numpy(OnnxClassifier(model_file).run_native(x))
    else:
        with torch.no_grad():
            logits = load_model(model_file)[0](torch.from_numpy(x))
    return logits.argmax(1).tolist(), torch.softmax(logits.double(), 1).numpy()


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    lines = path.read_text().splitlines()
    values = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    return lines[0].split(","), values[:, 1].astype(int), values[:, 2:]


def write_idx(path: Path, images: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, images.ndim]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    path.write_bytes(gzip.compress(header + images.astype(np.uint8).tobytes()))


def test_predict_on_csv_npz_and_idx_matches_the_model_in_process_on_the_gated_runtime(root, models, tmp_path):
    images, labels = raw_digits()
    csv_file, npz_file, idx_file = tmp_path / "in.csv", tmp_path / "in.npz", tmp_path / "in-idx3-ubyte.gz"
    columns = [f"pixel{i}" for i in range(64)]
    csv_file.write_text(",".join(columns + ["label"]) + "\n" + "\n".join(
        ",".join(str(int(v)) for v in row) + f",{label}" for row, label in zip(images.reshape(-1, 64), labels)))
    unlabelled_csv = tmp_path / "unlabelled.csv"
    unlabelled_csv.write_text(",".join(columns) + "\n" + "\n".join(
        ",".join(str(int(v)) for v in row) for row in images.reshape(-1, 64)))
    np.savez(npz_file, X=images)  # no labels
    write_idx(idx_file, images)
    pytorch_classes, pytorch_probabilities = in_process(models["safetensors"], images)
    onnx_classes, onnx_probabilities = in_process(models["onnx"], images)

    summary = predict(root, csv_file, tmp_path / "csv.csv")
    header, classes, probabilities = read_predictions(tmp_path / "csv.csv")
    assert (summary["version"], summary["runtime"], summary["samples"]) == (1, "pytorch", 40)
    assert header == ["row", "class"] + [f"probability_{c}" for c in range(10)]
    assert classes.tolist() == pytorch_classes
    assert np.allclose(probabilities, pytorch_probabilities, rtol=1e-5, atol=1e-6)

    for other in (unlabelled_csv, npz_file):  # the NPZ holds X only
        predict(root, other, tmp_path / "out.csv")
        _, classes, probabilities = read_predictions(tmp_path / "out.csv")
        assert classes.tolist() == pytorch_classes
        assert np.allclose(probabilities, pytorch_probabilities, rtol=1e-5, atol=1e-6)

    registry = open_registry(root)
    for version in (2, 3):  # an ONNX model; a safetensors model deployed on its runtime.onnx
        registry.promote(version, "ana", "onnx")
        summary = predict(root, idx_file, tmp_path / f"idx{version}.csv")
        assert (summary["version"], summary["runtime"]) == (version, "onnxruntime")
        _, classes, probabilities = read_predictions(tmp_path / f"idx{version}.csv")
        assert classes.tolist() == onnx_classes
        assert np.allclose(probabilities, onnx_probabilities, rtol=1e-5, atol=1e-6)


def test_predict_refuses_input_the_model_was_not_trained_on_and_writes_nothing(root, tmp_path):
    images, _ = raw_digits()
    output = tmp_path / "out.csv"
    np.savez(tmp_path / "narrow.npz", X=images.reshape(-1, 64)[:, :10])
    with pytest.raises(DataError, match=r"narrow.npz: 10 values per sample; tiny-digits version 1 takes "
                                         r"input_shape \[1, 8, 8\] = 64 values"):
        predict(root, tmp_path / "narrow.npz", output)
    np.savez(tmp_path / "bytes.npz", X=images * 16)  # 0-255 pixels for a model trained on 0-16
    with pytest.raises(DataError, match=r"values outside the range the model was trained on \[0.0, 16.0\] "
                                         r"in sample\(s\) \[0, 1, 2"):
        predict(root, tmp_path / "bytes.npz", output)
    np.savez(tmp_path / "labels-only.npz", y=np.arange(3))
    with pytest.raises(DataError, match=r"no array 'X'"):
        predict(root, tmp_path / "labels-only.npz", output)
    np.save(tmp_path / "plain.npy", images)
    (tmp_path / "plain.npy").rename(tmp_path / "renamed.npz")
    with pytest.raises(DataError, match=r"renamed.npz: not a readable NPZ file: it is a single .npy array"):
        predict(root, tmp_path / "renamed.npz", output)
    (tmp_path / "short.csv").write_text("a,b,c\n1,2,3\n4,5\n")
    with pytest.raises(DataError, match=r"short.csv: line\(s\) 3: missing or extra fields"):
        predict(root, tmp_path / "short.csv", output)
    assert not output.exists()


def test_a_tampered_model_file_in_the_registry_is_refused(root, tmp_path):
    version = root / "storage" / "registry" / "tiny-digits" / "versions" / "000001"
    original = (version / "model.safetensors").read_bytes()
    tampered = original[:-1] + bytes([original[-1] ^ 1])  # one bit of a weight
    (version / "model.safetensors").write_bytes(tampered)
    np.savez(tmp_path / "in.npz", X=raw_digits()[0])
    with pytest.raises(RegistryError, match="version 1 file model.safetensors: sha256 .* != manifest"):
        predict(root, tmp_path / "in.npz", tmp_path / "out.csv")
    with pytest.raises(RegistryError, match="sha256"):
        make_server(root, "127.0.0.1", 0)  # nor does the server start on it

    # the manifest rewritten to match: the alias still names the promoted model's sha256
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["model_sha256"] = manifest["files"]["model.safetensors"]["sha256"] = hashlib.sha256(tampered).hexdigest()
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ServingError, match="manifest model sha256 .* differs from the alias's"):
        predict(root, tmp_path / "in.npz", tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


@contextlib.contextmanager
def running(root: Path):
    server = make_server(root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def call(server, method: str, path: str, body: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        connection.request(method, path, body, {"Content-Type": content_type} if body is not None else {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def post(server, instances) -> tuple[int, dict]:
    return call(server, "POST", "/predict", json.dumps({"instances": instances}).encode())


def health_until(server, done) -> dict:
    """/healthz once `done(health)` holds, or the last answer after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        health = call(server, "GET", "/healthz")[1]
        if done(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_server_answers_and_follows_the_alias_without_a_restart(root, models):
    images, _ = raw_digits(5)
    registry = open_registry(root)
    with running(root) as server:
        assert server.server_address[0] == "127.0.0.1"
        status, health = call(server, "GET", "/healthz")
        assert status == 200 and (health["status"], health["model"], health["version"], health["candidate"],
                                  health["runtime"]) == ("ok", "tiny-digits", 1, "pruned", "pytorch")
        assert health["model_sha256"] == registry.manifest(1)["model_sha256"]

        status, answer = post(server, images.tolist())  # shaped 8x8 instances
        assert status == 200 and answer["version"] == 1
        classes, probabilities = in_process(models["safetensors"], images)
        assert answer["classes"] == classes
        assert np.allclose(answer["probabilities"], probabilities, atol=1e-6)
        assert post(server, images.reshape(5, 64).tolist())[1]["classes"] == answer["classes"]  # flat

        registry.promote(2, "bo", "onnx")
        health = health_until(server, lambda h: h["version"] == 2)
        assert (health["version"], health["candidate"], health["runtime"]) == (2, "int8", "onnxruntime")
        status, answer = post(server, images.tolist())
        assert (status, answer["version"]) == (200, 2)
        classes, probabilities = in_process(models["onnx"], images)
        assert answer["classes"] == classes
        assert np.allclose(answer["probabilities"], probabilities, atol=1e-6)

        registry.rollback("cy", "back")
        assert health_until(server, lambda h: h["version"] == 1)["version"] == 1


def test_server_keeps_serving_when_the_new_version_fails_verification(root):
    registry = open_registry(root)
    with running(root) as server:
        stored = root / "storage" / "registry" / "tiny-digits" / "versions" / "000002" / "model.onnx"
        stored.write_bytes(stored.read_bytes()[:-100])  # truncated, as by a failed upload or a bad disk
        # production pointed at it, as if the file broke after its promotion was verified
        alias = registry.alias()
        moved = dict(alias, version=2, model_sha256=registry.manifest(2)["model_sha256"])
        registry.store.put(f"{registry.model}/aliases/production.json", json.dumps(moved).encode())

        health = health_until(server, lambda h: h["refused"] is not None)
        assert health["version"] == 1 and health["refused"]["version"] == 2
        assert "model.onnx: sha256" in health["refused"]["reason"]
        status, answer = post(server, raw_digits(2)[0].tolist())
        assert (status, answer["version"]) == (200, 1)

        registry.store.put(f"{registry.model}/aliases/production.json", json.dumps(alias).encode())
        health = health_until(server, lambda h: h["refused"] is None)
        assert (health["refused"], health["version"]) == (None, 1)


def test_bad_requests_get_a_4xx_naming_the_problem(root):
    image = raw_digits(1)[0][0].reshape(64).tolist()
    with running(root) as server:
        cases = [
            (call(server, "POST", "/predict", b"{not json"), 400, "body is not JSON"),
            (call(server, "POST", "/predict", b'{"inputs": []}'), 400, '"instances"'),
            (call(server, "POST", "/predict", b'{"instances": []}'), 400, "non-empty list"),
            (post(server, [image[:10]]), 400, "10 values per sample; tiny-digits version 1 takes input_shape"),
            (post(server, [image[:-1] + ["7"]]), 400, 'instances[0][63] is "7", not a number'),
            (post(server, [[True] + image[1:]]), 400, "instances[0][0] is true, not a number"),
            (call(server, "POST", "/predict", b'{"instances": [[NaN]]}'), 400, "NaN is not a number JSON allows"),
            (post(server, [image, image[:32]]), 400, "instances must all have the same shape"),
            (post(server, [[v * 16 for v in image]]), 400, "values outside the range the model was trained on"),
            (post(server, image[:5]), 400, "each instance must be a list of 64 feature values"),
            (post(server, [image] * 51), 413, "too many instances: 51 > limit 50"),
            (call(server, "POST", "/predict", b"x" * 70000), 413, "larger than the limit of 65,536"),
            (call(server, "POST", "/predict", b"{}", "text/plain"), 415, "Content-Type must be application/json"),
            (call(server, "GET", "/predict"), 405, "use POST"),
            (call(server, "POST", "/elsewhere", b"{}"), 404, "no such path '/elsewhere'"),
        ]
        for (status, answer), expected_status, message in cases:
            assert (status, message in answer["error"]) == (expected_status, True), answer
        assert post(server, [image])[0] == 200  # and it still answers good ones


def test_a_bounded_load_test_reports_latency_and_throughput(root):
    body = json.dumps({"instances": [raw_digits(1)[0][0].tolist()]}).encode()
    with running(root) as server:
        report = load_test(*server.server_address[:2], body, clients=2, requests=500, seconds=120)
    print(f"\nserve, batch 1, 2 clients: p50 {report['p50_ms']:.3f} ms, p99 {report['p99_ms']:.3f} ms, "
          f"{report['requests_per_s']:.0f} requests/s")
    assert (report["answered"], report["failures"], report["versions"]) == (1000, {}, {1: 1000})
    assert 0 < report["p50_ms"] <= report["p99_ms"] and report["requests_per_s"] > 0


def test_predict_and_serve_from_an_s3_registry(s3_server, models, tmp_path):
    root = workspace(tmp_path / "workspace", models, s3_server.storage(s3_server.new_bucket("serving")))
    images, _ = raw_digits(5)
    np.savez(tmp_path / "in.npz", X=images)
    assert predict(root, tmp_path / "in.npz", tmp_path / "out.csv")["version"] == 1
    assert read_predictions(tmp_path / "out.csv")[1].tolist() == in_process(models["safetensors"], images)[0]
    with running(root) as server:
        assert call(server, "GET", "/healthz")[1]["version"] == 1
        open_registry(root).promote(3, "ana", "onnx on S3")
        assert health_until(server, lambda h: h["version"] == 3)["runtime"] == "onnxruntime"
        assert post(server, images.tolist())[1]["classes"] == in_process(models["onnx"], images)[0]
