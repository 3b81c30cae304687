"""Stage `evaluate`: accuracy, size and speed of every model, judged against the teacher.

Accuracy comes with a 95 % Wilson interval. Differences to the teacher are paired
(the same test examples), with a score interval and test (tasks/statistics.py), so a
small drop is reported together with whether it is distinguishable from noise.

Speed: every model on every runtime is timed in turn within each of `rounds` rounds
(batch-1 latency, then batch-N throughput), so a load change on the machine hits all
of them alike, and a ratio of two models within one round cancels it. Timing covers
the inference call only: inputs are converted to the runtime's native type beforehand,
garbage collection is off, threads are fixed, and each turn starts with untimed
warm-up calls. Speed-ups are against the teacher on its fastest runtime, per runtime
against the teacher on the same one, and against a recipe's source on the same
runtime; each interval is the [min, max] of the ratio over the rounds.

Devices: PyTorch models run on `evaluate.device` (auto: CUDA when present, else the CPU),
ONNX Runtime on the CPU; every runtime's figures name the device they were measured on.

Sizes are of the artifact each runtime loads. A compact PyTorch file (bitmask or
codebook encoding, tasks/encodings.py) is expanded to dense tensors to run; its
`expanded_bytes` says how large.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import tempfile
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from sklearn.metrics import f1_score
from torch import nn

from tasks.compress import CompressParams
from tasks.encodings import CODEBOOK, MASK
from tasks.io import atomic_path, file_sha256, read_json, run_main, write_json
from tasks.models import count_parameters, load_model
from tasks.params import PARAMS_FILE, EvaluateParams, load_section
from tasks.compression.quantization import OnnxClassifier, export_onnx, read_onnx_config
from tasks.statistics import macro_f1_interval, paired_comparison, wilson_interval
from tasks.text import lengths, trim_padding
from tasks.training import (Split, load_split, make_deterministic, model_split, predict_logits, resolve_device,
                            split_sha256)

PYTORCH, ONNXRUNTIME = "pytorch", "onnxruntime"
# text only: batch-1 p50 of the short half of the texts and of the longest tenth, with their median token counts
TEXT_LATENCIES = ("latency_ms_p50_short", "tokens_short", "latency_ms_p50_long", "tokens_long")


@dataclass(frozen=True)
class Runner:
    """One model on one runtime: `prepare` converts samples to the runtime's input (untimed), `call` is timed."""

    prepare: Callable[[torch.Tensor], Any]
    call: Callable[[Any], Any]


def runner(model: nn.Module | OnnxClassifier, device: torch.device | None = None) -> Runner:
    """`device`: where a PyTorch model is (the CPU when None); ONNX Runtime runs on the CPU."""
    if isinstance(model, OnnxClassifier):
        return Runner(model.native_input, model.run_native)
    if device is None or device.type == "cpu":
        return Runner(torch.Tensor.contiguous, model.eval())
    model.eval()

    def call_and_wait(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        torch.cuda.synchronize(device)  # CUDA calls return before the GPU is done: time the work, not the launch
        return out

    return Runner(lambda x: x.contiguous().to(device), call_and_wait)


def full_batch(X: torch.Tensor, size: int) -> torch.Tensor:
    """`size` samples; a small test set is repeated to fill the batch."""
    return X.repeat(math.ceil(size / len(X)), *[1] * (X.dim() - 1))[:size]


def timed_turn(run: Runner, samples: list[Any], batch: Any, params: EvaluateParams) -> tuple[list[float], float]:
    """One model's turn in a round: batch-1 latencies (ms) and the seconds of `throughput_repeats` batches.

    Untimed warm-up calls first: the previous turn left another model in the caches, and a
    server running this model alone would not pay for that.
    """
    for i in range(params.warmup):
        run.call(samples[i % len(samples)])
    latencies = []
    for i in range(params.latency_repeats):
        sample = samples[i % len(samples)]
        start = time.perf_counter_ns()
        run.call(sample)
        latencies.append((time.perf_counter_ns() - start) / 1e6)
    run.call(batch)
    start = time.perf_counter_ns()
    for _ in range(params.throughput_repeats):
        run.call(batch)
    return latencies, (time.perf_counter_ns() - start) / 1e9


def measure_speeds(runners: dict[Hashable, Runner], X: torch.Tensor | dict[Hashable, Split], params: EvaluateParams,
                   pad_id: int | None = None) -> dict[Hashable, dict]:
    """Latency percentiles, throughput and per-round medians of every runner, measured interleaved.

    Round r times every runner once, starting from the r-th (so none is always first).
    Garbage collection is off while timing: a collection would be charged to whichever
    call triggered it. `X`: the samples, or each runner's own split (text models with tokenizers of their
    own). Text (`pad_id`, or the splits'): each sample is as long as its own text, as a server sees it,
    and the batch as long as its longest text.
    """
    torch.set_num_threads(params.threads)
    splits = X if isinstance(X, dict) else {key: Split(X, torch.empty(0), pad_id) for key in runners}
    inputs, sample_lengths = {}, {}
    for key, run in runners.items():
        split = splits[key]
        samples = [s.unsqueeze(0) for s in split.X[: params.latency_repeats]]
        if split.pad_id is not None:
            sample_lengths[key] = lengths(split.X[: params.latency_repeats].numpy(), split.pad_id)
        batch = full_batch(split.X, params.throughput_batch)
        if split.pad_id is not None:
            samples, batch = [trim_padding(s, split.pad_id) for s in samples], trim_padding(batch, split.pad_id)
        inputs[key] = ([run.prepare(s) for s in samples], run.prepare(batch))
    keys = list(runners)
    latencies: dict[Hashable, list[list[float]]] = {key: [] for key in keys}
    batch_seconds: dict[Hashable, float] = dict.fromkeys(keys, 0.0)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for round_index in range(params.rounds):
                first = round_index % len(keys)
                for key in keys[first:] + keys[:first]:
                    round_latencies, seconds = timed_turn(runners[key], *inputs[key], params)
                    latencies[key].append(round_latencies)
                    batch_seconds[key] += seconds
    finally:
        if gc_was_enabled:
            gc.enable()
    speeds = {}
    for key in keys:
        pooled = np.concatenate(latencies[key])
        round_p50 = [float(np.median(r)) for r in latencies[key]]
        speeds[key] = {
            "latency_ms_p50": float(np.percentile(pooled, 50)),
            "latency_ms_p95": float(np.percentile(pooled, 95)),
            "throughput_per_s": (params.throughput_batch * params.throughput_repeats * params.rounds
                                 / batch_seconds[key]),
            "latency_ms_p50_rounds": round_p50,
            "latency_p50_spread_pct": 100 * (max(round_p50) - min(round_p50)) / float(np.median(round_p50)),
        }
        if key in sample_lengths:  # text: the p50 of the short half of the texts and of the longest tenth
            tokens = sample_lengths[key]
            per_call = np.tile(tokens, math.ceil(params.latency_repeats / len(tokens)))[: params.latency_repeats]
            calls = np.stack(latencies[key])
            for name, chosen in (("short", per_call <= np.median(tokens)),
                                 ("long", per_call >= np.percentile(tokens, 90))):
                speeds[key][f"latency_ms_p50_{name}"] = float(np.median(calls[:, chosen]))
                speeds[key][f"tokens_{name}"] = float(np.median(per_call[chosen]))
    return speeds


def measure_speed(model: nn.Module | OnnxClassifier, X: torch.Tensor, params: EvaluateParams,
                  pad_id: int | None = None) -> dict:
    """Batch-1 latency percentiles (ms) and throughput (samples/s) of one model on CPU."""
    return measure_speeds({"model": runner(model)}, X, params, pad_id)["model"]


def speedup(reference: dict, candidate: dict) -> tuple[float, list[float]]:
    """Reference p50 / candidate p50 within each round: the median of these ratios and their [min, max].

    Both were timed in the same rounds, so each round's ratio is a paired measurement in which a
    slow round slows both. The [min, max] of `rounds` ratios contains the ratios' median with
    probability 1 - 2**(1 - rounds) whatever their distribution (all of them fall on one side
    of it with probability 2 * 2**-rounds): 98.4 % at 7 rounds. The median of the same ratios
    is the point estimate, so it always lies inside its interval.
    """
    per_round = [r / c for r, c in zip(reference["latency_ms_p50_rounds"], candidate["latency_ms_p50_rounds"])]
    return float(np.median(per_round)), [min(per_round), max(per_round)]


def is_compact(path: Path) -> bool:
    """Whether a safetensors model file holds bitmask or codebook encodings (tasks/encodings.py)."""
    with safe_open(str(path), framework="pt") as f:
        return any(MASK in key or CODEBOOK in key for key in f.keys())


def artifact_sizes(path: Path, model: nn.Module | None) -> dict:
    """Bytes of the file a runtime loads, and of its weights in memory when a compact file is expanded to run."""
    size = path.stat().st_size
    if model is not None and is_compact(path):
        dense = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return {"artifact_bytes": size, "expanded_bytes": dense, "expanded_to_run": True}
    return {"artifact_bytes": size, "expanded_bytes": size, "expanded_to_run": False}


@dataclass
class Candidate:
    """A model file to evaluate, with what it runs on and where it came from."""

    path: Path  # the artifact of its deployed runtime: PyTorch for .safetensors, ONNX Runtime for .onnx
    onnx_path: Path  # the same model for ONNX Runtime
    source: str | None = None  # the base model a compression recipe started from
    torch_model: nn.Module | None = None
    config: dict[str, Any] = field(default_factory=dict)
    onnx_is_artifact: bool = True  # False: exported by evaluate only to measure ONNX Runtime, never deployed


def base_candidate(path: Path, scratch: Path) -> Candidate:
    model, config = load_model(path)
    onnx_path = scratch / f"{path.stem}.onnx"
    export_onnx(model, onnx_path, config)
    return Candidate(path, onnx_path, None, model, config, onnx_is_artifact=False)


def recipe_candidate(directory: Path) -> Candidate:
    """The final model of a compress@<recipe> stage, as its lineage.json names it."""
    lineage = read_json(directory / "lineage.json")
    final = directory / lineage["final"]
    onnx_path = directory / lineage["runtime_onnx"]
    if final.suffix == ".onnx":
        return Candidate(final, onnx_path, lineage["source"], None, read_onnx_config(final))
    model, config = load_model(final)
    return Candidate(final, onnx_path, lineage["source"], model, config)


def device_name(device: torch.device) -> str:
    """`cpu`, or `cuda` with the GPU's name: what a latency was measured on."""
    return "cpu" if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(device)})"


def pareto_front(models: dict[str, dict], cost: str) -> list[str]:
    """Models no other model beats on accuracy and `cost` at once (higher accuracy, lower cost)."""
    def dominated(a: dict) -> bool:
        return any(b["accuracy"] >= a["accuracy"] and b[cost] <= a[cost]
                   and (b["accuracy"] > a["accuracy"] or b[cost] < a[cost]) for b in models.values())

    return sorted((n for n, m in models.items() if not dominated(m)), key=lambda n: models[n][cost])


def provenance(prepared_dir: Path, schema: dict, teacher: Path) -> dict:
    """What this evaluation was computed from, so a report names the run that produced it."""
    return {
        "teacher": {"file": str(teacher), "sha256": file_sha256(teacher)},
        "data": {"sizes": schema["sizes"], "test_sha256": split_sha256(prepared_dir, "test")},
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def evaluate(prepared_dir: Path, candidates: dict[str, Candidate], params: EvaluateParams,
             reference: str = "teacher") -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics per model and runtime (plus paired comparison against `reference`) and test-set predictions."""
    prepared_dir = Path(prepared_dir)
    schema = read_json(prepared_dir / "schema.json")
    test = load_split(prepared_dir, "test", schema["classes"])
    truth = test.y.numpy()
    device = resolve_device(params.device)
    make_deterministic(device)
    devices = {PYTORCH: device_name(device), ONNXRUNTIME: "cpu"}  # ONNX Runtime: its CPU execution provider
    results, predictions, runners, artifacts, inputs = {}, {}, {}, {}, {}
    for name, candidate in candidates.items():
        config = candidate.config
        if config["classes"] != schema["classes"] or config["input_shape"] != schema["input_shape"]:
            raise ValueError(f"{candidate.path}: model was trained for classes {config['classes']} and input "
                             f"{config['input_shape']}, test data has {schema['classes']} and {schema['input_shape']}")
        data = model_split(prepared_dir, "test", schema["classes"], config)  # in the model's own tokens
        torch_model = candidate.torch_model
        onnx_model = OnnxClassifier(candidate.onnx_path, params.threads)
        if torch_model is not None:
            torch_model.to(device)
            runners[name, PYTORCH] = runner(torch_model, device)
            inputs[name, PYTORCH] = data
            artifacts[name, PYTORCH] = {"artifact": str(candidate.path), "device": devices[PYTORCH],
                                        **artifact_sizes(candidate.path, torch_model)}
        runners[name, ONNXRUNTIME] = runner(onnx_model)
        inputs[name, ONNXRUNTIME] = data
        artifacts[name, ONNXRUNTIME] = {"artifact": str(candidate.onnx_path) if candidate.onnx_is_artifact else None,
                                        "device": devices[ONNXRUNTIME], **artifact_sizes(candidate.onnx_path, None)}
        if torch_model is not None:
            predicted = predict_logits(torch_model, data.X, device=device, pad_id=data.pad_id).argmax(1).numpy()
        else:
            predicted = predict_logits(onnx_model, data.X, pad_id=data.pad_id).argmax(1).numpy()
        correct = int(np.sum(predicted == truth))
        low, high = wilson_interval(correct, len(truth))
        results[name] = {
            "accuracy": correct / len(truth),
            "accuracy_ci95": [low, high],
            "macro_f1": float(f1_score(truth, predicted, average="macro")),
            "macro_f1_ci95": list(macro_f1_interval(truth, predicted, len(schema["classes"]))),
            "parameters": count_parameters(torch_model) if torch_model else config["parameters"],
            "nonzero_parameters": (sum(int((p != 0).sum()) for p in torch_model.parameters()) if torch_model
                                   else config.get("nonzero_parameters", config["parameters"])),
            "file": str(candidate.path),
            "source": candidate.source,
            # The runtime the artifact is deployed on: PyTorch for a PyTorch file, ONNX Runtime for an ONNX one.
            "runtime": PYTORCH if torch_model is not None else ONNXRUNTIME,
        }
        predictions[name] = predicted
    speeds = measure_speeds(runners, inputs, params)
    for name, metrics in results.items():
        metrics["runtimes"] = {runtime: {**speeds[model, runtime], **artifacts[model, runtime]}
                               for model, runtime in runners if model == name}
        deployed = metrics["runtimes"][metrics["runtime"]]
        metrics.update({key: deployed[key] for key in ("latency_ms_p50", "latency_ms_p95", "throughput_per_s",
                                                       "device", "expanded_bytes", "expanded_to_run",
                                                       *TEXT_LATENCIES) if key in deployed})
        metrics["file_bytes"] = deployed["artifact_bytes"]
    base = results[reference]
    fastest = min(base["runtimes"], key=lambda runtime: base["runtimes"][runtime]["latency_ms_p50"])
    for name, metrics in results.items():
        deployed = metrics["runtimes"][metrics["runtime"]]
        metrics["size_reduction"] = base["file_bytes"] / metrics["file_bytes"]
        metrics["speedup"], metrics["speedup_interval"] = speedup(base["runtimes"][fastest], deployed)
        metrics["speedup_by_runtime"] = {runtime: speedup(base["runtimes"][runtime], speed)[0]
                                         for runtime, speed in metrics["runtimes"].items()
                                         if runtime in base["runtimes"]}
        source_runtimes = results[metrics["source"]]["runtimes"] if metrics["source"] in results else {}
        if metrics["runtime"] in source_runtimes:  # same runtime, so int8 slower than its fp32 source shows as such
            metrics["speedup_vs_source"], metrics["speedup_vs_source_interval"] = speedup(
                source_runtimes[metrics["runtime"]], deployed)
        if name != reference:
            metrics["vs_" + reference] = paired_comparison(predictions[reference] == truth,
                                                           predictions[name] == truth)
    summary = {"reference": reference, "reference_runtime": fastest, "test_samples": len(truth),
               "devices": devices, "threads": params.threads, "throughput_batch": params.throughput_batch,
               "rounds": params.rounds,
               "speedup_interval_coverage": 1 - 2.0 ** (1 - params.rounds),
               "produced_from": provenance(prepared_dir, schema, candidates[reference].path),
               "models": results,
               "pareto": {cost: pareto_front(results, cost) for cost in ("file_bytes", "latency_ms_p50")}}
    return summary, {"actual": truth, **predictions}


def plot_pareto(path: Path, evaluation: dict) -> None:
    """Accuracy against bytes and against latency, every model, the Pareto fronts joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = evaluation["models"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, cost, label in ((axes[0], "file_bytes", "bytes on disk"), (axes[1], "latency_ms_p50", "batch-1 p50 latency (ms)")):
        for name, m in models.items():
            axis.scatter(m[cost], 100 * m["accuracy"], color="tab:blue")
            axis.annotate(name, (m[cost], 100 * m["accuracy"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        front = evaluation["pareto"][cost]
        axis.plot([models[n][cost] for n in front], [100 * models[n]["accuracy"] for n in front], color="tab:orange",
                  label="Pareto front")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("test accuracy (%)")
        axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def write_candidates_csv(path: Path, evaluation: dict) -> None:
    """One row per model for DVC's scatter plots."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "accuracy", "file_bytes", "latency_ms_p50"])
        for name, m in evaluation["models"].items():
            writer.writerow([name, m["accuracy"], m["file_bytes"], m["latency_ms_p50"]])


def write_predictions(path: Path, predictions: dict[str, np.ndarray], classes: list[int]) -> None:
    """Test-set predictions as class labels, one column per model (DVC confusion plots)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(predictions)
        writer.writerows(zip(*(np.asarray(classes)[p] for p in predictions.values())))


def run(argv: list[str] | None = None) -> None:
    """The stage as dvc.yaml runs it: paths from the command line, params from params.yaml."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("reports_dir", type=Path, help="writes evaluation.json, predictions.csv, "
                                                          "candidates.csv and pareto.png here")
    parser.add_argument("models", nargs="+", metavar="NAME=PATH", help="base models; the first is the reference")
    parser.add_argument("--candidates", type=Path, help="directory of compress@<recipe> outputs")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    model_paths = dict(item.split("=", 1) for item in args.models)
    # Every recipe's output and the search's winner (no recipe may be called `search`).
    recipes = [*load_section("compress", CompressParams, args.params).recipes, "search"] if args.candidates else []
    with tempfile.TemporaryDirectory() as scratch:
        candidates = {name: base_candidate(Path(path), Path(scratch)) for name, path in model_paths.items()}
        candidates.update({name: recipe_candidate(args.candidates / name) for name in recipes})
        summary, predictions = evaluate(args.prepared_dir, candidates,
                                        load_section("evaluate", EvaluateParams, args.params),
                                        reference=next(iter(model_paths)))
    classes = read_json(args.prepared_dir / "schema.json")["classes"]
    reports = args.reports_dir
    write_predictions(reports / "predictions.csv", predictions, classes)
    write_candidates_csv(reports / "candidates.csv", summary)
    plot_pareto(reports / "pareto.png", summary)
    write_json(reports / "evaluation.json", summary)
    print(f"evaluated {list(candidates)} on {summary['test_samples']} test samples -> {reports / 'evaluation.json'}")


if __name__ == "__main__":
    run_main(run)
