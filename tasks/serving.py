"""Use the model in production: `predict` a file, or `serve` it over HTTP.

Both load the version the registry's `production` alias points at (local directory or S3, as
params.yaml:storage says), read its files through the registry, which checks each one's sha256
against the version's manifest, and run it on the runtime the gate measured (the version's
lineage.json `metrics.runtime`): PyTorch for the safetensors file (through the safe loader), ONNX
Runtime for the ONNX artifact. Raw features are scaled with the value range the model was trained
with (the prepare stage's `data` params recorded in its lineage), and the input's shape and values
are checked against what the model was trained on; anything else is refused with the reason.

The server polls the alias every `serve.poll_seconds` and swaps to a new version only once it is
downloaded, verified and loaded; until then, and whenever that fails, it keeps serving the version
it has. Registry contents are untrusted: the sha256 check against the manifest catches corruption
and half-written uploads (the manifest sits in the same store, so it is no signature), and the model
file itself goes through the safe loader, which never runs code the file names.

    shrinkflow predict INPUT [--output predictions.csv]
    shrinkflow serve [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import datetime
import http.client
import json
import logging
import socket
import socketserver
import tempfile
import threading
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tasks.io import atomic_path, is_transient
from tasks.models import ModelFileError, load_model, parse_config, trusted_architectures
from tasks.params import PARAMS_FILE, DataParams, _require, from_dict, load_section
from tasks.prepare import DataError, csv_features, normalise, npz_signature_problem, read_csv_frame, read_idx
from tasks.registry import Registry, open_registry
from tasks.text import TokenizerError, encode, is_text_config, load_tokenizer, pad_id, trim_padding

RUNTIMES = ("pytorch", "onnxruntime")
PREDICT_BATCH = 1024  # rows per inference call in `predict`: bounds memory on large files
IDLE_SECONDS = 30  # a keep-alive connection idle this long is closed, so idle clients cannot pin threads
log = logging.getLogger("shrinkflow.serve")


@dataclass(frozen=True)
class ServeParams:
    poll_seconds: float = 2.0  # how often the server reads the production alias
    max_instances: int = 1024  # per POST /predict; more is refused (413)
    max_request_bytes: int = 16 << 20  # larger bodies are refused (413) before they are read
    threads: int = 1  # intra-op threads of the runtime; batch-1 latency is best on one, as the gate measures it

    def __post_init__(self) -> None:
        _require(self.poll_seconds > 0, f"poll_seconds: must be positive, got {self.poll_seconds}")
        _require(self.max_instances >= 1, f"max_instances: must be at least 1, got {self.max_instances}")
        _require(self.max_request_bytes >= 1024, f"max_request_bytes: at least 1024, got {self.max_request_bytes}")
        _require(self.threads >= 1, f"threads: must be at least 1, got {self.threads}")


def serve_params(root: Path) -> ServeParams:
    """params.yaml:serve; the section is optional (defaults above)."""
    params = yaml.safe_load((root / PARAMS_FILE).read_text()) or {}
    return from_dict(ServeParams, params.get("serve"), f"{root / PARAMS_FILE}:serve")


class ServingError(ValueError):
    """The production model cannot be used: nothing in production, or its registry version is inconsistent."""


@dataclass(frozen=True)
class Deployed:
    """One loaded registry version: what it is, and the runtime call from scaled inputs to logits."""

    model: str
    version: int
    candidate: str
    model_sha256: str
    runtime: str
    input_shape: list[int]
    classes: list
    data: DataParams  # the value range and input shape the model was trained with; label column of params.yaml
    logits: Callable[[np.ndarray], np.ndarray]
    loaded_at: str
    tokenizer: Any = None  # text: the model's own tokenizer (from its file), raw text -> token ids
    pad_id: int | None = None

    def text_input(self, texts: list, origin: str) -> np.ndarray:
        """Raw texts -> the model's token ids, as prepare made them in training."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not is_unicode(t)]
        if bad:
            raise DataError(f"{origin}: item(s) {bad[:10]} are not text (0-based; a JSON string may not hold a lone "
                            f"surrogate escape)")
        return encode(self.tokenizer, texts, self.input_shape[0], self.pad_id)

    def batch_logits(self, X: np.ndarray) -> np.ndarray:
        """Logits of many samples, in batches; text batches cut to their longest text."""
        batches = (X[i:i + PREDICT_BATCH] for i in range(0, len(X), PREDICT_BATCH))
        if self.pad_id is not None:
            batches = (trim_padding(torch.from_numpy(x), self.pad_id).numpy() for x in batches)
        return np.concatenate([self.logits(x) for x in batches])

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "candidate": self.candidate,
                "model_sha256": self.model_sha256, "runtime": self.runtime, "loaded_at": self.loaded_at}


def is_unicode(text: str) -> bool:
    """Whether `text` is valid Unicode: JSON's \\ud800 escapes give Python strings that are not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def training_data(lineage: dict, where: str, label_column: str) -> DataParams:
    """The prepare stage's recorded `data` params (value range, input shape, classes) from a lineage record."""
    try:
        recorded = lineage["stages"][lineage["data"]["prepared"]["stage"]]["params"]["data"]
        # dvc.lock records what params.yaml spelled out; DataParams supplies the defaults of the rest
        fields = {key: recorded[key] for key in ("value_range", "input_shape", "classes", "text_column", "max_length")
                  if key in recorded}
    except (KeyError, TypeError) as e:
        raise ServingError(f"{where}: lineage.json records no data params of the prepare stage (missing {e})") from None
    if fields.get("text_column"):  # DataParams' checks need a source to read text from
        fields.update(source="csv", path="-")
    return from_dict(DataParams, dict(fields, label_column=label_column), f"{where} lineage.json data")


def torch_runtime(path: Path, architectures: dict, threads: int) -> tuple[Callable, dict]:
    torch.set_num_threads(threads)
    model, config = load_model(path, architectures)

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return logits, config


def onnx_runtime(path: Path, threads: int) -> tuple[Callable, dict]:
    from tasks.compression.quantization import OnnxClassifier  # imports the ONNX quantization tooling: only when needed

    # ONNX Runtime reads external data only from inside the model's directory: a private one holding
    # nothing but the verified file, so a crafted graph cannot make it read anything else.
    classifier = OnnxClassifier(path, threads)
    config = parse_config(path.name, classifier.session.get_modelmeta().custom_metadata_map)
    declared = classifier.session.get_inputs()[0].shape[1:]
    if len(declared) != len(config["input_shape"]) or any(
            isinstance(d, int) and d != c for d, c in zip(declared, config["input_shape"])):
        raise ModelFileError(f"{path.name}: graph input {declared} does not match its config's input_shape "
                             f"{config['input_shape']}")
    return lambda x: classifier.run_native(classifier.native_input(x)), config


def check_tokenizer_fits(logits: Callable, tokenizer: Any, pad: int, config: dict, name: str) -> None:
    """A text model file's tokenizer must fit its model (the file is untrusted: a mismatch would fail every
    request, or mask the wrong token): the model masks the tokenizer's padding id and embeds its every id."""
    masked = config["model"].get("pad_token_id", pad)
    if masked != pad:
        raise ModelFileError(f"{name}: its tokenizer pads with id {pad}, but its model masks id {masked}")
    top = tokenizer.get_vocab_size() - 1
    try:
        logits(np.array([[top, pad]], dtype=np.int64))
    except Exception as e:  # noqa: BLE001 -- PyTorch and ONNX Runtime each fail in their own way
        raise ModelFileError(f"{name}: its tokenizer's ids (up to {top}) do not fit its model "
                             f"({type(e).__name__})") from None


def load_version(registry: Registry, alias: dict, architectures: dict, label_column: str, threads: int) -> Deployed:
    """Download the version `alias` points at, verify every file used against its manifest, load it."""
    number = alias["version"]
    where = f"{registry.location} version {number}"
    manifest = registry.manifest(number)
    if manifest.get("model_sha256") != alias.get("model_sha256"):
        raise ServingError(f"{where}: manifest model sha256 {manifest.get('model_sha256')} differs from the "
                           f"alias's {alias.get('model_sha256')}")
    lineage = json.loads(registry.read(number, "lineage.json"))
    try:
        runtime = lineage["metrics"]["runtime"]
    except (KeyError, TypeError):
        runtime = None
    files = manifest["files"]
    if runtime == "pytorch":
        name = "model.safetensors"
    elif runtime == "onnxruntime":
        name = "model.onnx" if "model.onnx" in files else "runtime.onnx"
    else:
        raise ServingError(f"{where}: lineage.json metrics.runtime is {runtime!r}; expected one of {list(RUNTIMES)}")
    if name not in files:
        raise ServingError(f"{where}: runs on {runtime} but has no {name} (files: {sorted(files)})")
    data = training_data(lineage, where, label_column)
    content = registry.read(number, name)  # raises unless its sha256 matches the manifest
    with tempfile.TemporaryDirectory(prefix="shrinkflow-serve-") as scratch:
        path = Path(scratch) / name
        path.write_bytes(content)
        logits, config = (torch_runtime(path, architectures, threads) if runtime == "pytorch"
                          else onnx_runtime(path, threads))
    if config["input_shape"] != data.sample_shape or config["classes"] != data.classes:
        raise ServingError(f"{where}: {name} takes input_shape {config['input_shape']} and classes "
                           f"{config['classes']}, but its lineage's data has {data.sample_shape} and {data.classes}")
    tokenizer = None
    if is_text_config(config):
        try:
            tokenizer = load_tokenizer(config.get("tokenizer", ""), data.max_length, f"{name} tokenizer")
        except TokenizerError as e:
            raise ModelFileError(str(e)) from None
        check_tokenizer_fits(logits, tokenizer, pad_id(config["tokenizer"]), config, name)
    return Deployed(model=registry.model, version=number, candidate=manifest["candidate"],
                    model_sha256=manifest["model_sha256"], runtime=runtime, input_shape=config["input_shape"],
                    classes=config["classes"], data=data, logits=logits, tokenizer=tokenizer,
                    pad_id=pad_id(config["tokenizer"]) if tokenizer else None,
                    loaded_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))


def production_alias(registry: Registry) -> dict:
    alias = registry.alias()
    if alias is None:
        raise ServingError(f"{registry.location}: nothing is in production yet; promote a candidate first")
    return alias


def model_input(X: np.ndarray, deployed: Deployed, origin: str) -> np.ndarray:
    """Raw samples -> the model's input: scaled as in training, shaped as the model takes them, values checked."""
    X, _ = normalise(X, np.zeros(len(X), dtype=np.int64), deployed.data, origin)  # labels play no part here
    if list(X.shape[1:]) != deployed.input_shape:
        raise DataError(f"{origin}: {int(np.prod(X.shape[1:]))} values per sample; {deployed.model} version "
                        f"{deployed.version} takes input_shape {deployed.input_shape} = "
                        f"{int(np.prod(deployed.input_shape))} values")
    flat = X.reshape(len(X), -1)
    for problem, bad in (("NaN or infinite values", ~np.isfinite(flat)), (
            f"values outside the range the model was trained on {deployed.data.value_range}",
            (flat < 0) | (flat > 1))):
        rows = np.flatnonzero(bad.any(axis=1))
        if len(rows):
            raise DataError(f"{origin}: {problem} in sample(s) {rows[:10].tolist()}"
                            + (f" and {len(rows) - 10} more" if len(rows) > 10 else "") + " (0-based)")
    return X


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# --- predict -------------------------------------------------------------------------------------------

def read_features(path: Path, label_column: str) -> np.ndarray:
    """The raw samples of an input file: NPZ (array X; y ignored), CSV (feature columns; the label column
    ignored if present), anything else an IDX images file (optionally gzip-compressed)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".npz":
        problem = npz_signature_problem(path)
        if problem:
            raise DataError(f"{path}: not a readable NPZ file: {problem}")
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = archive.files
                X = archive["X"] if "X" in names else None
        except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: not a readable NPZ archive of numeric arrays ({e})") from None
        if X is None:
            raise DataError(f"{path}: no array 'X' (the samples); found {sorted(names)}")
        return X
    if path.suffix == ".csv":
        return csv_features(path, read_csv_frame(path), label_column)
    return read_idx(path)


def read_texts(path: Path, text_column: str) -> list[str]:
    """The texts of a CSV file's `text_column` (the model's data.text_column), as strings."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e or 'empty'})") from None
    if text_column not in frame.columns:
        raise DataError(f"{path}: no column {text_column!r} (the text the model was trained on); "
                        f"columns are {list(frame.columns)[:10]}")
    return frame[text_column].tolist()


def write_predictions(path: Path, classes: list, predicted: np.ndarray, probabilities: np.ndarray) -> None:
    """CSV: row (0-based, as in the input), predicted class, then the probability of each class."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(",".join(["row", "class", *(f"probability_{c}" for c in classes)]) + "\n")
        for row, (label, p) in enumerate(zip(predicted, probabilities)):
            f.write(f"{row},{label}," + ",".join(f"{v:.6g}" for v in p) + "\n")


def predict(root: Path, input_path: Path, output_path: Path) -> dict:
    """Classify every sample of `input_path` with the production model; write the predictions CSV."""
    deployed = ModelService(root).deployed
    if deployed.tokenizer is not None:
        X = deployed.text_input(read_texts(Path(input_path), deployed.data.text_column), str(input_path))
    else:
        X = model_input(read_features(Path(input_path), deployed.data.label_column), deployed, str(input_path))
    logits = deployed.batch_logits(X)
    classes = np.asarray(deployed.classes)
    write_predictions(Path(output_path), deployed.classes, classes[logits.argmax(axis=1)], softmax(logits))
    summary = dict(deployed.describe(), samples=len(X), output=str(output_path))
    print(f"{len(X)} predictions by {deployed.model} version {deployed.version} ({deployed.candidate}, "
          f"{deployed.runtime}) -> {output_path}")
    return summary


# --- serve ---------------------------------------------------------------------------------------------

class RequestRejected(ValueError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def first_non_number(values: list, where: str, depth: int) -> str | None:
    """Where the first value that is not a JSON number is, in lists nested at most `depth` deep."""
    for i, value in enumerate(values):
        if type(value) is list and depth > 0:
            found = first_non_number(value, f"{where}[{i}]", depth - 1)
            if found:
                return found
        elif type(value) not in (int, float):  # type(), not isinstance: true/false are not numbers here
            return f"{where}[{i}] is {json.dumps(value)[:40]}, not a number"
    return None


class ModelService:
    """The production model of root's registry; `refresh` swaps in the alias's version once it is verified
    and loaded."""

    def __init__(self, root: Path):
        self.registry = open_registry(root)
        self.params = serve_params(root)
        self.architectures = trusted_architectures(root / PARAMS_FILE)  # what a registry model may name
        self.label_column = load_section("data", DataParams, root / PARAMS_FILE).label_column
        self.deployed = self._load(production_alias(self.registry))
        self.refused: dict | None = None  # the alias's version that could not be loaded, and why
        self.checked_at = time.time()
        self._poll_error = ""

    def _load(self, alias: dict) -> Deployed:
        return load_version(self.registry, alias, self.architectures, self.label_column, self.params.threads)

    def refresh(self) -> None:
        """Follow the alias: load its version if it is not the one served (or refused) already."""
        alias = self.registry.alias()
        self.checked_at = time.time()
        if alias is None:
            return  # the alias object is gone: keep serving what was promoted last
        target = alias["version"], alias["model_sha256"]
        if target == (self.deployed.version, self.deployed.model_sha256):
            self.refused = None  # e.g. rolled back to the version served after a refused promotion
            return
        if self.refused and target == (self.refused["version"], self.refused["model_sha256"]):
            return  # refused already; tried again only when the alias moves
        try:
            deployed = self._load(alias)
        except Exception as e:
            if is_transient(e):
                raise  # storage outage: tried again at the next poll
            self.refused = {"version": target[0], "model_sha256": target[1], "reason": str(e)}
            log.error("production moved to version %s, which is refused; still serving version %d: %s",
                      target[0], self.deployed.version, e)
            return
        self.deployed, self.refused = deployed, None  # one assignment: a request sees one version or the other
        log.info("now serving %s version %d (%s, %s)", deployed.model, deployed.version, deployed.candidate,
                 deployed.runtime)

    def watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.params.poll_seconds):
            try:
                self.refresh()
                self._poll_error = ""
            except Exception as e:  # the registry is unreachable or failing: keep serving, say so once
                if str(e) != self._poll_error:
                    log.warning("cannot read the production alias; still serving version %d: %s",
                                self.deployed.version, e)
                self._poll_error = str(e)

    def health(self) -> dict:
        return {"status": "ok", **self.deployed.describe(), "refused": self.refused,
                "alias_checked_at": datetime.datetime.fromtimestamp(self.checked_at, datetime.UTC)
                .isoformat(timespec="seconds")}

    def instances(self, body: bytes) -> list:
        try:
            request = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise RequestRejected(400, f"body is not JSON: {e}") from None
        if not isinstance(request, dict) or "instances" not in request:
            raise RequestRejected(400, 'body must be a JSON object with "instances": a list of instances')
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise RequestRejected(400, '"instances" must be a non-empty list of instances')
        if len(instances) > self.params.max_instances:
            raise RequestRejected(413, f"too many instances: {len(instances)} > limit {self.params.max_instances} "
                                       "per request")
        return instances

    def classify(self, instances: list) -> dict:
        deployed = self.deployed  # one version for the whole request, whatever the poller does meanwhile
        if deployed.tokenizer is not None:  # a text model: each instance is a text
            try:
                logits = deployed.batch_logits(deployed.text_input(instances, "instances"))
            except DataError as e:
                raise RequestRejected(400, str(e)) from None
            return self.answer(deployed, logits)
        problem = first_non_number(instances, "instances", len(deployed.input_shape))
        if problem:
            raise RequestRejected(400, problem)
        try:
            X = np.asarray(instances, dtype=np.float64)
        except ValueError:
            raise RequestRejected(400, "instances must all have the same shape") from None
        if X.ndim < 2:
            raise RequestRejected(400, f"each instance must be a list of {int(np.prod(deployed.input_shape))} "
                                       f"feature values (flat, or shaped {deployed.input_shape})")
        try:
            logits = deployed.logits(model_input(X, deployed, "instances"))
        except DataError as e:
            raise RequestRejected(400, str(e)) from None
        return self.answer(deployed, logits)

    @staticmethod
    def answer(deployed: Deployed, logits: np.ndarray) -> dict:
        classes = np.asarray(deployed.classes)
        return {"model": deployed.model, "version": deployed.version, "candidate": deployed.candidate,
                "classes": classes[logits.argmax(axis=1)].tolist(),
                "probabilities": softmax(logits.astype(np.float64)).round(6).tolist(),
                "class_order": deployed.classes}


class PredictionHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: no connection setup per request
    disable_nagle_algorithm = True  # headers and body go out at once, not after a delayed ACK
    timeout = IDLE_SECONDS
    server: ModelHTTPServer

    def reply(self, status: int, payload: dict, close: bool = False, **headers: str) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        if close:  # the request body was not read: the connection cannot carry another request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self.reply(200, self.server.service.health())
        elif path == "/predict":
            self.reply(405, {"error": "use POST for /predict"}, Allow="POST")
        else:
            self.reply(404, {"error": f"no such path {path!r}; use POST /predict or GET /healthz"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        service = self.server.service
        try:
            if path != "/predict":
                raise RequestRejected(404, f"no such path {path!r}; use POST /predict or GET /healthz")
            if self.headers.get_content_type() != "application/json":
                raise RequestRejected(415, f"Content-Type must be application/json, got "
                                           f"{self.headers.get('Content-Type')!r}")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdecimal() or not length.isascii():
                raise RequestRejected(411, "a Content-Length header with the body's size in bytes is required")
            if int(length) > service.params.max_request_bytes:
                raise RequestRejected(413, f"body of {int(length):,} bytes is larger than the limit of "
                                           f"{service.params.max_request_bytes:,}")
        except RequestRejected as e:
            self.reply(e.status, {"error": str(e)}, close=True)
            return
        try:
            self.reply(200, service.classify(service.instances(self.rfile.read(int(length)))))
        except RequestRejected as e:
            self.reply(e.status, {"error": str(e)})
        except Exception as e:  # a runtime failure: answer it rather than drop the connection
            log.exception("POST /predict failed")
            self.reply(500, {"error": f"the model failed on this request: {type(e).__name__}"})

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class ModelHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer bound to exactly the given host, with the model service and its alias poller."""

    def __init__(self, host: str, port: int, service: ModelService):
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.service = service
        self._stop_polling = threading.Event()
        super().__init__((host, port), PredictionHandler)
        self._poller = threading.Thread(target=service.watch, args=(self._stop_polling,), daemon=True,
                                        name="alias-poller")
        self._poller.start()

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's also does a reverse DNS lookup of the host
        self.server_name, self.server_port = self.server_address[:2]

    def server_close(self) -> None:
        self._stop_polling.set()
        self._poller.join()
        super().server_close()


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8000) -> ModelHTTPServer:
    """The server, bound (port 0: any free port) with the production model loaded; not yet answering."""
    return ModelHTTPServer(host, port, ModelService(root))


def serve(root: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Answer POST /predict and GET /healthz on host:port until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = make_server(root, host, port)
    deployed = server.service.deployed
    log.info("serving %s version %d (%s, %s) on http://%s:%d", deployed.model, deployed.version,
             deployed.candidate, deployed.runtime, server.server_name, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# --- load measurement (tests and bench/serve.py) -------------------------------------------------------

def load_test(host: str, port: int, body: bytes, clients: int, requests: int, seconds: float) -> dict:
    """POST `body` to /predict from `clients` threads, `requests` each on one keep-alive connection,
    all stopping at `seconds`. Latency percentiles of the answered requests, throughput, failures."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[Counter] = [Counter() for _ in range(clients)]
    versions: list[Counter] = [Counter() for _ in range(clients)]
    headers = {"Content-Type": "application/json"}
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=seconds)
        try:
            for _ in range(requests):
                if time.perf_counter() > deadline:
                    break
                start = time.perf_counter()
                try:
                    connection.request("POST", "/predict", body, headers)
                    response = connection.getresponse()
                    answer = response.read()
                except (OSError, http.client.HTTPException) as e:
                    failures[i][type(e).__name__] += 1
                    connection.close()
                    continue
                latencies[i].append(time.perf_counter() - start)
                if response.status == 200:
                    versions[i][json.loads(answer)["version"]] += 1
                else:
                    failures[i][f"HTTP {response.status}"] += 1
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    times = np.array([t for per_client in latencies for t in per_client]) * 1000
    return {"answered": len(times), "failures": dict(sum(failures, Counter())),
            "versions": dict(sum(versions, Counter())),
            "p50_ms": float(np.percentile(times, 50)) if len(times) else None,
            "p99_ms": float(np.percentile(times, 99)) if len(times) else None,
            "requests_per_s": len(times) / elapsed, "seconds": elapsed}
