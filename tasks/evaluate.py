"""Stage `evaluate`: accuracy, size and speed of every model, judged against the teacher.

Accuracy comes with a 95 % Wilson interval. Differences to the teacher are paired
(the same test examples): the change in points with its 95 % interval and an exact
McNemar test, so a small drop is reported together with whether it is
distinguishable from noise. Latency is measured at batch 1 (warm-up, many repeats,
fixed thread count); throughput at a fixed batch size.
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest
from sklearn.metrics import f1_score
from torch import nn

from tasks.compress import CompressParams
from tasks.io import atomic_path, read_json, run_main, write_json
from tasks.models import count_parameters, load_model
from tasks.params import PARAMS_FILE, EvaluateParams, load_section
from tasks.quantization import OnnxClassifier, export_onnx, read_onnx_config
from tasks.training import load_split, predict_logits

Z95 = 1.959964


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    p = correct / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return centre - half, centre + half


def paired_comparison(reference_correct: np.ndarray, candidate_correct: np.ndarray) -> dict:
    """Candidate minus reference on the same examples: points, 95 % CI, exact McNemar p-value."""
    n = len(reference_correct)
    lost = int(np.sum(reference_correct & ~candidate_correct))  # reference right, candidate wrong
    gained = int(np.sum(~reference_correct & candidate_correct))
    diff = (gained - lost) / n
    half = Z95 * math.sqrt(max((lost + gained) / n - diff**2, 0.0) / n)
    p_value = binomtest(lost, lost + gained, 0.5).pvalue if lost + gained else 1.0
    return {
        "accuracy_change_points": 100 * diff,
        "ci95_points": [100 * (diff - half), 100 * (diff + half)],
        "lost": lost,
        "gained": gained,
        "mcnemar_p": float(p_value),
        "distinguishable": bool(p_value < 0.05),
    }


@torch.inference_mode()
def measure_speed(model: nn.Module, X: torch.Tensor, params: EvaluateParams) -> dict:
    """Batch-1 latency percentiles (ms) and throughput (samples/s) on CPU."""
    torch.set_num_threads(params.threads)
    model.eval()
    sample = X[:1]
    for _ in range(params.warmup):
        model(sample)
    timings = []
    for i in range(params.latency_repeats):
        sample = X[i % len(X)].unsqueeze(0)
        start = time.perf_counter_ns()
        model(sample)
        timings.append((time.perf_counter_ns() - start) / 1e6)
    batch = X[: params.throughput_batch]
    if len(batch) < params.throughput_batch:  # tiny test sets: repeat samples to fill the batch
        batch = batch.repeat(math.ceil(params.throughput_batch / len(batch)), *[1] * (X.dim() - 1))
        batch = batch[: params.throughput_batch]
    model(batch)
    start = time.perf_counter()
    for _ in range(params.throughput_repeats):
        model(batch)
    elapsed = time.perf_counter() - start
    return {
        "latency_ms_p50": float(np.percentile(timings, 50)),
        "latency_ms_p95": float(np.percentile(timings, 95)),
        "throughput_per_s": params.throughput_batch * params.throughput_repeats / elapsed,
    }


@dataclass
class Candidate:
    """A model file to evaluate, with what it runs on and where it came from."""

    path: Path  # the artifact whose bytes count
    onnx_path: Path | None  # the same model for ONNX Runtime
    source: str | None = None  # the base model a compression recipe started from
    torch_model: nn.Module | None = None
    config: dict[str, Any] = field(default_factory=dict)


def base_candidate(path: Path, scratch: Path) -> Candidate:
    model, config = load_model(path)
    onnx_path = scratch / f"{path.stem}.onnx"
    export_onnx(model, onnx_path, config)
    return Candidate(path, onnx_path, None, model, config)


def recipe_candidate(directory: Path) -> Candidate:
    """The final model of a compress@<recipe> stage, as its lineage.json names it."""
    lineage = read_json(directory / "lineage.json")
    final = directory / lineage["final"]
    onnx_path = directory / lineage["runtime_onnx"]
    if final.suffix == ".onnx":
        return Candidate(final, onnx_path, lineage["source"], None, read_onnx_config(final))
    model, config = load_model(final)
    return Candidate(final, onnx_path, lineage["source"], model, config)


def pareto_front(models: dict[str, dict], cost: str) -> list[str]:
    """Models no other model beats on accuracy and `cost` at once (higher accuracy, lower cost)."""
    def dominated(a: dict) -> bool:
        return any(b["accuracy"] >= a["accuracy"] and b[cost] <= a[cost]
                   and (b["accuracy"] > a["accuracy"] or b[cost] < a[cost]) for b in models.values())

    return sorted((n for n, m in models.items() if not dominated(m)), key=lambda n: models[n][cost])


def evaluate(prepared_dir: Path, candidates: dict[str, Candidate], params: EvaluateParams,
             reference: str = "teacher") -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics per model and runtime (plus paired comparison against `reference`) and test-set predictions."""
    schema = read_json(Path(prepared_dir) / "schema.json")
    test = load_split(prepared_dir, "test", schema["classes"])
    truth = test.y.numpy()
    results, predictions = {}, {}
    for name, candidate in candidates.items():
        config = candidate.config
        if config["classes"] != schema["classes"] or config["input_shape"] != schema["input_shape"]:
            raise ValueError(f"{candidate.path}: model was trained for classes {config['classes']} and input "
                             f"{config['input_shape']}, test data has {schema['classes']} and {schema['input_shape']}")
        runtimes = {}
        if candidate.torch_model is not None:
            runtimes["pytorch"] = measure_speed(candidate.torch_model, test.X, params)
        onnx_model = OnnxClassifier(candidate.onnx_path, params.threads)
        runtimes["onnxruntime"] = measure_speed(onnx_model, test.X, params)
        # The runtime the artifact is deployed on: PyTorch for a PyTorch file, ONNX Runtime for an ONNX one.
        deployed = "pytorch" if candidate.torch_model is not None else "onnxruntime"
        predicted = predict_logits(candidate.torch_model or onnx_model, test.X).argmax(1).numpy()
        correct = int(np.sum(predicted == truth))
        low, high = wilson_interval(correct, len(truth))
        torch_model = candidate.torch_model
        results[name] = {
            "accuracy": correct / len(truth),
            "accuracy_ci95": [low, high],
            "macro_f1": float(f1_score(truth, predicted, average="macro")),
            "parameters": count_parameters(torch_model) if torch_model else config["parameters"],
            "nonzero_parameters": (sum(int((p != 0).sum()) for p in torch_model.parameters()) if torch_model
                                   else config.get("nonzero_parameters", config["parameters"])),
            "file_bytes": candidate.path.stat().st_size,
            "file": str(candidate.path),
            "source": candidate.source,
            "runtime": deployed,
            **runtimes[deployed],
            "runtimes": runtimes,
        }
        predictions[name] = predicted
    base = results[reference]
    for name, metrics in results.items():
        metrics["size_reduction"] = base["file_bytes"] / metrics["file_bytes"]
        metrics["speedup"] = base["latency_ms_p50"] / metrics["latency_ms_p50"]
        if metrics["source"] in results:  # same runtime, so int8 slower than its fp32 source shows as such
            source_latency = results[metrics["source"]]["runtimes"][metrics["runtime"]]["latency_ms_p50"]
            metrics["speedup_vs_source"] = source_latency / metrics["latency_ms_p50"]
        if name != reference:
            metrics["vs_" + reference] = paired_comparison(predictions[reference] == truth,
                                                           predictions[name] == truth)
    summary = {"reference": reference, "test_samples": len(truth), "threads": params.threads,
               "throughput_batch": params.throughput_batch, "models": results,
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
