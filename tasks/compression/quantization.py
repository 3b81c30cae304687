"""ONNX export and quantization with ONNX Runtime, the mature CPU path.

Modes: `fp32` (the exported model unchanged: ONNX Runtime's speed at full precision),
`int8_dynamic` (weights int8, activations quantized on the fly), `int8_static`
(weights and activations int8, activation ranges calibrated on the calibration split;
QDQ format, per-channel weights) and `fp16` (weights and arithmetic in half precision,
float32 inputs and outputs). The artifact on disk is the quantized ONNX model, with the
shrinkflow config in its metadata so the file alone says what it is and where it came from.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from torch import nn

from tasks.io import atomic_path
from tasks.models import CONFIG_KEY, parse_config
from tasks.params import ParamsError

QUANTIZATION_MODES = ("fp32", "fp16", "int8_dynamic", "int8_static")
# The exporter logs every torchvision operator it cannot register; shrinkflow exports no torchvision ops.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
INPUT, OUTPUT = "input", "logits"


def save_onnx(model: onnx.ModelProto, path: str | Path, config: dict[str, Any]) -> None:
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {CONFIG_KEY: json.dumps(config, sort_keys=True)})
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


def read_onnx_config(path: str | Path) -> dict[str, Any]:
    """An ONNX model file's shrinkflow config, checked like a safetensors file's (the file is untrusted)."""
    props = {p.key: p.value for p in onnx.load_model(str(path), load_external_data=False).metadata_props}
    return parse_config(path, props)


def export_onnx(model: nn.Module, path: str | Path, config: dict[str, Any]) -> None:
    """Export with a dynamic batch dimension; the graph is checked by ONNX before it is written."""
    example = torch.zeros(1, *config["input_shape"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal
        program = torch.onnx.export(model.eval(), (example,), input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                                    external_data=False, verbose=False)
    exported = program.model_proto
    onnx.checker.check_model(exported)
    save_onnx(exported, path, config)


class CalibrationReader(CalibrationDataReader):
    def __init__(self, X: np.ndarray, batch_size: int = 64):
        self._batches = iter([{INPUT: X[i : i + batch_size]} for i in range(0, len(X), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_onnx(source: str | Path, path: str | Path, mode: str, config: dict[str, Any],
                  calibration: np.ndarray | None = None) -> None:
    """Quantize the float32 ONNX model at `source` and write it to `path`."""
    if mode not in QUANTIZATION_MODES:
        raise ParamsError(f"quantize.mode: unknown mode {mode!r}; use one of {list(QUANTIZATION_MODES)}")
    if mode == "int8_static" and (calibration is None or len(calibration) == 0):
        raise ParamsError("quantize.mode: int8_static needs calibration data")
    if mode == "fp32":
        save_onnx(onnx.load_model(str(source)), path, config)
        return
    with tempfile.TemporaryDirectory() as scratch:
        prepared, quantized = Path(scratch) / "prepared.onnx", Path(scratch) / "quantized.onnx"
        quant_pre_process(str(source), str(prepared))
        if mode == "int8_dynamic":
            quantize_dynamic(prepared, quantized, weight_type=QuantType.QInt8)
        elif mode == "int8_static":
            quantize_static(prepared, quantized, CalibrationReader(calibration.astype(np.float32)),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        else:
            onnx.save_model(convert_float_to_float16(onnx.load_model(str(prepared)), keep_io_types=True),
                            str(quantized))
        save_onnx(onnx.load_model(str(quantized)), path, config)


class OnnxClassifier:
    """An ONNX Runtime session that is called like the torch model: tensor in, logits out.

    `native_input` and `run_native` split a call into the conversion to the session's own
    input type and the inference itself, so latency can be measured without the conversion.
    """

    def __init__(self, path: str | Path, threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def eval(self) -> OnnxClassifier:
        return self

    @staticmethod
    def native_input(x: torch.Tensor) -> np.ndarray:
        """The session's input type: a C-contiguous float32 array (no copy when `x` already is one)."""
        return np.ascontiguousarray(x.numpy(), dtype=np.float32)

    def run_native(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_native(self.native_input(x)))
