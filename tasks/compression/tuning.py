"""Accuracy-driven tuning of static int8 quantization (as Intel Neural Compressor does it).

Schemes are tried in a fixed order, cheapest first -- every layer quantized before layers left in float
(float layers cost speed), then calibration MinMax, Percentile, Entropy (by calibration cost), per-tensor
before per-channel weight scales -- and the first whose accuracy drop from the fp32 model is within the
tolerance is kept. Accuracy is measured on the validation split, never the test split, which stays for the
final report. When none is within the tolerance, the most accurate is kept and the record says so.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tasks.compression.quantization import (
    StaticScheme,
    onnx_accuracy,
    quantize_onnx,
    save_onnx,
    weighted_nodes,
)

CALIBRATION_ORDER = ("minmax", "percentile", "entropy")


def candidate_schemes(fp32: Path) -> list[StaticScheme]:
    """Every scheme to try, in order: no float layers, then the first and last weighted layers in float
    (the layers most sensitive to rounding: the raw input and the logits)."""
    layers = weighted_nodes(fp32)
    fallbacks = [()] + ([(layers[0], layers[-1]) if len(layers) > 1 else (layers[0],)] if layers else [])
    return [StaticScheme(calibration, per_channel, float_nodes) for float_nodes in fallbacks
            for calibration in CALIBRATION_ORDER for per_channel in (False, True)]


def tune_static(fp32: Path, path: Path, config: dict[str, Any], calibration: np.ndarray, X: np.ndarray,
                y: np.ndarray, max_drop: float) -> dict[str, Any]:
    """Quantize the fp32 ONNX model at `fp32` to `path` with the first scheme whose validation accuracy
    (`X`, `y`) drops at most `max_drop` points from the fp32 model's; returns the record of what was tried.
    The record is also written into the artifact's config (key `quantization_tuning`)."""
    source_accuracy = onnx_accuracy(fp32, X, y)
    tried: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        chosen = 0
        for index, scheme in enumerate(candidate_schemes(fp32)):
            candidate = Path(scratch) / f"scheme{index}.onnx"
            quantize_onnx(fp32, candidate, "int8_static", config, calibration, scheme)
            accuracy = onnx_accuracy(candidate, X, y)
            tried.append({**scheme.describe(), "validation_accuracy": accuracy})
            print(f"quantize_tuned: {scheme.describe()} -> validation accuracy {accuracy:.2f} % "
                  f"(fp32 {source_accuracy:.2f} %)")
            if accuracy > tried[chosen]["validation_accuracy"]:  # ties keep the cheaper scheme
                chosen = index
            if source_accuracy - accuracy <= max_drop:
                break
        best = tried[chosen]["validation_accuracy"]
        record = {"selected_on": "validation", "source_validation_accuracy": source_accuracy, "max_drop": max_drop,
                  "tried": tried, "chosen": chosen, "met": source_accuracy - best <= max_drop}
        # The chosen file is saved again with the record in its config: the artifact says how it was chosen.
        save_onnx(onnx.load_model(str(Path(scratch) / f"scheme{chosen}.onnx")), path,
                  {**config, "quantization_tuning": record})
    return record
