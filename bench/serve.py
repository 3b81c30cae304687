"""Benchmark: `shrinkflow serve` at batch 1 on 127.0.0.1 against the same model called in process.

The model is the production model of a workspace (`--root`), or, by default, a scratch registry under
bench/out/serve holding the student architecture of params.yaml (one epoch on digits: latency does not
depend on accuracy) twice: version 1 on PyTorch, version 2 its ONNX export on ONNX Runtime.

For each version: the runtime's batch-1 latency in process (the inference call on a prepared input, as
`evaluate` times it) and the whole in-process path a request takes (checks, scaling, inference, softmax);
then the server, in its own process, answers POST /predict from one keep-alive client (latency) and from
two (throughput). HTTP overhead = server p50 - in-process runtime p50. Every run is bounded by a request
count and a deadline; nothing is asserted.

    python bench/serve.py [--root WORKSPACE] [--requests 2000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.models import save_model  # noqa: E402
from tasks.params import DataParams, ModelParams, from_dict  # noqa: E402
from tasks.prepare import prepare, write_prepared  # noqa: E402
from tasks.compression.quantization import export_onnx  # noqa: E402
from tasks.registry import open_registry  # noqa: E402
from tasks.serving import ModelService, load_test, model_input, softmax  # noqa: E402
from tasks.training import train_model  # noqa: E402

STARTUP_SECONDS = 120  # for the server to load the model and bind
SWITCH_SECONDS = 60  # for the server to follow an alias move


def scratch_workspace(out: Path) -> Path:
    """A workspace with params.yaml and a local registry: v1 PyTorch (production), v2 its ONNX export."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["storage"] = {"backend": "local", "local_dir": "storage"}
    shutil.rmtree(out, ignore_errors=True)
    prepared = out / "data" / "prepared"
    write_prepared(prepared, *prepare(from_dict(DataParams, params["data"], "data")))
    student = from_dict(ModelParams, {"model": params["student"]["model"],
                                      "train": dict(params["student"]["train"], epochs=1)}, "student")
    trained = train_model(prepared, student, role="student")
    save_model(trained.model, out / "student.safetensors", trained.config)
    export_onnx(trained.model, out / "student.onnx", trained.config)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    registry = open_registry(out)
    approval = {"decision": "approve", "reviewer": "bench", "comment": "serve benchmark"}
    for name, runtime in (("model.safetensors", "pytorch"), ("model.onnx", "onnxruntime")):
        lineage = {"candidate": f"student-{runtime}", "code": {"git_revision": "0" * 40},
                   "metrics": {"runtime": runtime},
                   "data": {"prepared": {"path": "data/prepared", "stage": "prepare"}},
                   "stages": {"prepare": {"params": {"data": params["data"]}}}}
        source = out / ("student.safetensors" if runtime == "pytorch" else "student.onnx")
        registry.register({name: source.read_bytes()}, lineage, approval)
    registry.promote(1, "bench", "serve benchmark")
    return out


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def in_process(root: Path, instance: np.ndarray, requests: int, deadline: float) -> dict:
    """Batch-1 latency of the runtime call alone, and of the whole path a request takes, in this process."""
    deployed = ModelService(root).deployed
    x = model_input(instance[None], deployed, "bench")
    runtime, path = [], []
    for _ in range(50):  # warm-up
        deployed.logits(x)
    for _ in range(requests):
        if time.perf_counter() > deadline:
            break
        start = time.perf_counter()
        deployed.logits(x)
        middle = time.perf_counter()
        softmax(deployed.logits(model_input(instance[None], deployed, "bench")).astype(np.float64))
        path += [time.perf_counter() - middle]
        runtime += [middle - start]
    return {"version": deployed.version, "runtime": deployed.runtime,
            "runtime_p50_ms": percentiles(runtime)[0], "path_p50_ms": percentiles(path)[0]}


def health(port: int) -> dict | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/healthz")
        return json.loads(connection.getresponse().read())
    except OSError:
        return None
    finally:
        connection.close()


def start_server(root: Path, log_file: Path) -> tuple[subprocess.Popen, int]:
    """`serve` in its own process on 127.0.0.1, any free port (read back from its log)."""
    code = ("import sys; from pathlib import Path; from tasks.serving import serve; "
            "serve(Path(sys.argv[1]), '127.0.0.1', 0)")
    with open(log_file, "w") as log:
        server = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=ROOT, stdout=log, stderr=log)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline and server.poll() is None:
        found = re.search(r"on http://127\.0\.0\.1:(\d+)", log_file.read_text())
        if found:
            return server, int(found.group(1))
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"the server did not start:\n{log_file.read_text()[-3000:]}")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)  # serve() closes the socket and stops its alias poller
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="workspace whose production model to serve (default: a scratch one)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--seconds", type=float, default=30, help="deadline per measurement")
    args = parser.parse_args()
    out = ROOT / "bench" / "out" / "serve"
    root = args.root.resolve() if args.root else scratch_workspace(out / "workspace")
    out.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((root / "params.yaml").read_text())["data"]
    low, high = data["value_range"]
    instance = np.random.default_rng(0).uniform(low, high, int(np.prod(data["input_shape"])))  # latency: any values
    body = json.dumps({"instances": [instance.tolist()]}).encode()
    registry = open_registry(root)
    versions = [registry.alias()["version"]] + ([] if args.root else [2])
    server, port = start_server(root, out / "server.log")
    rows = []
    try:
        for version in versions:
            if registry.alias()["version"] != version:
                registry.promote(version, "bench", "serve benchmark")
                deadline = time.monotonic() + SWITCH_SECONDS
                while (health(port) or {}).get("version") != version and time.monotonic() < deadline:
                    time.sleep(0.2)
            local = in_process(root, instance, args.requests, time.perf_counter() + args.seconds)
            load_test("127.0.0.1", port, body, clients=1, requests=50, seconds=args.seconds)  # warm-up
            single = load_test("127.0.0.1", port, body, clients=1, requests=args.requests, seconds=args.seconds)
            pair = load_test("127.0.0.1", port, body, clients=2, requests=args.requests, seconds=args.seconds)
            rows.append((local, single, pair))
    finally:
        stop_server(server)
    print(f"batch 1 on 127.0.0.1, {args.requests} requests per measurement; server in its own process, "
          "inference on serve.threads threads")
    print("| version | runtime | in-process runtime p50 ms | in-process request path p50 ms | serve p50 ms | "
          "serve p99 ms | requests/s (1 client) | requests/s (2 clients) | HTTP overhead p50 ms | failures |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for local, single, pair in rows:
        failures = {**single["failures"], **pair["failures"]}
        print(f"| {local['version']} | {local['runtime']} | {local['runtime_p50_ms']:.3f} | {local['path_p50_ms']:.3f} "
              f"| {single['p50_ms']:.3f} | {single['p99_ms']:.3f} | {single['requests_per_s']:,.0f} "
              f"| {pair['requests_per_s']:,.0f} | {single['p50_ms'] - local['runtime_p50_ms']:.3f} | "
              f"{failures or 'none'} |")


if __name__ == "__main__":
    main()
