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
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest
from sklearn.metrics import f1_score
from torch import nn

from tasks.io import atomic_path, read_json, run_main, write_json
from tasks.models import count_parameters, load_model
from tasks.params import EvaluateParams, load_section
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


def evaluate(prepared_dir: Path, model_paths: dict[str, Path], params: EvaluateParams,
             reference: str = "teacher") -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics per model (plus paired comparison against `reference`) and test-set predictions."""
    schema = read_json(Path(prepared_dir) / "schema.json")
    test = load_split(prepared_dir, "test", schema["classes"])
    truth = test.y.numpy()
    results, predictions = {}, {}
    for name, path in model_paths.items():
        model, config = load_model(path)
        if config["classes"] != schema["classes"] or config["input_shape"] != schema["input_shape"]:
            raise ValueError(f"{path}: model was trained for classes {config['classes']} and input "
                             f"{config['input_shape']}, test data has {schema['classes']} and {schema['input_shape']}")
        predicted = predict_logits(model, test.X).argmax(1).numpy()
        correct = int(np.sum(predicted == truth))
        low, high = wilson_interval(correct, len(truth))
        results[name] = {
            "accuracy": correct / len(truth),
            "accuracy_ci95": [low, high],
            "macro_f1": float(f1_score(truth, predicted, average="macro")),
            "parameters": count_parameters(model),
            "file_bytes": Path(path).stat().st_size,
            **measure_speed(model, test.X, params),
        }
        predictions[name] = predicted
    base = results[reference]
    for name, metrics in results.items():
        metrics["size_reduction"] = base["file_bytes"] / metrics["file_bytes"]
        metrics["speedup"] = base["latency_ms_p50"] / metrics["latency_ms_p50"]
        if name != reference:
            metrics["vs_" + reference] = paired_comparison(predictions[reference] == truth,
                                                           predictions[name] == truth)
    summary = {"reference": reference, "test_samples": len(truth), "threads": params.threads,
               "throughput_batch": params.throughput_batch, "models": results}
    return summary, {"actual": truth, **predictions}


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
    parser.add_argument("metrics_out", type=Path)
    parser.add_argument("predictions_out", type=Path)
    parser.add_argument("models", nargs="+", metavar="NAME=PATH", help="first one is the reference")
    args = parser.parse_args(argv)
    model_paths = dict(item.split("=", 1) for item in args.models)
    summary, predictions = evaluate(args.prepared_dir, {k: Path(v) for k, v in model_paths.items()},
                                    load_section("evaluate", EvaluateParams), reference=next(iter(model_paths)))
    classes = read_json(args.prepared_dir / "schema.json")["classes"]
    write_predictions(args.predictions_out, predictions, classes)
    write_json(args.metrics_out, summary)
    print(f"evaluated {list(model_paths)} on {summary['test_samples']} test samples -> {args.metrics_out}")


if __name__ == "__main__":
    run_main(run)
