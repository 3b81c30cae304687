"""ONNX export and quantization with ONNX Runtime, the mature CPU path.

Modes: `fp32` (the exported model unchanged: ONNX Runtime's speed at full precision),
`int8_dynamic` (weights int8, activations quantized on the fly), `int8_static`
(weights and activations int8, activation ranges calibrated on the calibration split;
QDQ format, per-channel weights) and `fp16` (weights and arithmetic in half precision,
float32 inputs and outputs). The artifact on disk is the quantized ONNX model, with the
shrinkflow config in its metadata so the file alone says what it is and where it came from.

Export keeps the batch dimension dynamic and proves it: the graph is run at two batch sizes
against the torch model, and a model whose code fixes its batch size is refused by name.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from torch import nn

from tasks.io import atomic_path
from tasks.models import CONFIG_KEY, parse_config
from tasks.params import ParamsError
from tasks.text import example_ids, is_text_config, pad_id

QUANTIZATION_MODES = ("fp32", "fp16", "int8_dynamic", "int8_static")
# The exporter logs every torchvision operator it cannot register; shrinkflow exports no torchvision ops.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
INPUT, OUTPUT = "input", "logits"
NO_STATIC_INT8_FOR_TEXT = ("static int8 calibrates the ranges of float inputs and a text model takes token ids; use "
                           "quantize mode int8_dynamic, the standard CPU path for transformers")


def save_onnx(model: onnx.ModelProto, path: str | Path, config: dict[str, Any]) -> None:
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {CONFIG_KEY: json.dumps(config, sort_keys=True)})
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


def read_onnx_config(path: str | Path) -> dict[str, Any]:
    """An ONNX model file's shrinkflow config, checked like a safetensors file's (the file is untrusted)."""
    props = {p.key: p.value for p in onnx.load_model(str(path), load_external_data=False).metadata_props}
    return parse_config(path, props)


class OnnxExportError(ValueError):
    """A model cannot be exported to ONNX with a batch dimension that stays dynamic."""


EXAMPLE_BATCH = 2  # torch.export specialises a dimension of size 1, so the traced example needs a larger batch
CHECK_BATCHES = (1, 3)  # batch sizes the exported graph must run at, both unlike the traced example


def export_onnx(model: nn.Module, path: str | Path, config: dict[str, Any]) -> None:
    """Export with a dynamic batch dimension, then check it: the graph must declare its batch symbolic and
    match the torch model at two other batch sizes. Otherwise OnnxExportError names the architecture and
    why, and nothing is written. The graph is also checked by ONNX before it is written."""
    arch = config["model"]["arch"]
    model = model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    dynamic = {0: torch.export.Dim("batch")}
    if is_text_config(config):
        # token ids, and the length dynamic too: a text is as long as its tokens, up to max_length
        max_length = config["input_shape"][0]
        example = example_ids(config, EXAMPLE_BATCH, max(2, min(7, max_length - 1)), torch.Generator().manual_seed(0))
        dynamic[1] = torch.export.Dim("length", max=max_length)
    else:
        example = torch.zeros(EXAMPLE_BATCH, *config["input_shape"])
    try:
        # torch.export itself, not the ONNX exporter's fallbacks, which silently fix the batch size.
        program = torch.export.export(model, (example.to(device),), dynamic_shapes=(dynamic,), strict=False)
    except Exception as e:  # the model's own code runs while traced and may raise anything
        reason = " ".join(str(e).splitlines()[:2])
        raise OnnxExportError(f"architecture {arch!r}: cannot export to ONNX with a dynamic batch dimension "
                              f"(torch.export: {reason})") from e
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal
        exported = torch.onnx.export(program, input_names=[INPUT], output_names=[OUTPUT], dynamo=True,
                                     external_data=False, verbose=False).model_proto
    for node in exported.graph.node:
        # The exporter's debug notes (stack traces with local paths, fx nodes) would make the bytes depend
        # on where the code is checked out, and outweigh a small model's weights.
        del node.metadata_props[:]
    # Shapes the exporter inferred for intermediate values; ONNX Runtime infers its own, and stale ones
    # (a transformer's attention reshapes) make its quantizer fail.
    del exported.graph.value_info[:]
    onnx.checker.check_model(exported)
    check_dynamic_batch(exported, model, config)
    save_onnx(exported, path, config)


def check_dynamic_batch(exported: onnx.ModelProto, model: nn.Module, config: dict[str, Any]) -> None:
    """The ONNX graph takes any batch size and computes what `model` computes, or OnnxExportError."""
    arch = config["model"]["arch"]
    batch_dim = exported.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise OnnxExportError(f"architecture {arch!r}: the ONNX graph fixed its batch size to {batch_dim.dim_value}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a check, not a benchmark: leave the other cores to parallel stages
    session = ort.InferenceSession(exported.SerializeToString(), options, providers=["CPUExecutionProvider"])
    device = next(model.parameters(), torch.empty(0)).device
    generator = torch.Generator().manual_seed(0)
    for batch in CHECK_BATCHES:
        if is_text_config(config):  # a short batch and a full-length one with a padded row
            x = example_ids(config, batch, 5 if batch == 1 else config["input_shape"][0], generator)
            x[0, x.shape[1] // 2 :] = pad_id(config["tokenizer"])
        else:
            x = torch.rand(batch, *config["input_shape"], generator=generator)
        with torch.no_grad():
            expected = model(x.to(device)).cpu().numpy()
        try:
            got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
        except Exception as e:  # ONNX Runtime's errors share no base class below Exception
            raise OnnxExportError(f"architecture {arch!r}: the exported ONNX graph fails at batch {batch} "
                                  f"({e})") from e
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
            raise OnnxExportError(f"architecture {arch!r}: the exported ONNX graph at batch {batch} does not "
                                  f"match the torch model (shape {list(got.shape)} vs {list(expected.shape)})")


@dataclass(frozen=True)
class StaticScheme:
    """How static int8 quantizes: the activation-range calibration, weight scales per output channel or one
    per tensor, and nodes left in float (by name in the exported graph)."""

    calibration: str = "minmax"
    per_channel: bool = True
    float_nodes: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"calibration": self.calibration, "per_channel": self.per_channel, "float_nodes": list(self.float_nodes)}


CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weighted_nodes(path: str | Path) -> list[str]:
    """Names of the graph's layers with weights (Conv, Gemm, MatMul), first to last."""
    graph = onnx.load_model(str(path), load_external_data=False).graph
    return [node.name for node in graph.node if node.op_type in WEIGHTED_OPS]


class CalibrationReader(CalibrationDataReader):
    def __init__(self, X: np.ndarray, batch_size: int = 64):
        self._batches = iter([{INPUT: X[i : i + batch_size]} for i in range(0, len(X), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def unshare_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node its own copy of each non-scalar initializer that several nodes read.

    ONNX Runtime's quantizer rewrites a weight for one consumer (it transposes a Gemm's weight for
    MatMulInteger) and the other consumers of the same initializer -- the Gather of an embedding tied to
    the output layer -- would read the rewritten tensor and fail.
    """
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    read = set()
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name not in initializers or not initializers[name].dims:
                continue
            if name in read:
                duplicate = onnx.TensorProto()
                duplicate.CopyFrom(initializers[name])
                duplicate.name = f"{name}__copy{len(model.graph.initializer)}"  # unique: the count only grows
                model.graph.initializer.append(duplicate)
                node.input[position] = duplicate.name
            read.add(name)
    return model


def quantize_onnx(source: str | Path, path: str | Path, mode: str, config: dict[str, Any],
                  calibration: np.ndarray | None = None, scheme: StaticScheme = StaticScheme()) -> None:
    """Quantize the float32 ONNX model at `source` and write it to `path` (`scheme`: int8_static only)."""
    if mode not in QUANTIZATION_MODES:
        raise ParamsError(f"quantize.mode: unknown mode {mode!r}; use one of {list(QUANTIZATION_MODES)}")
    if mode == "int8_static" and is_text_config(config):
        raise ParamsError(f"quantize.mode: int8_static: {NO_STATIC_INT8_FOR_TEXT}")
    if mode == "int8_static" and (calibration is None or len(calibration) == 0):
        raise ParamsError("quantize.mode: int8_static needs calibration data")
    if mode == "fp32":
        save_onnx(onnx.load_model(str(source)), path, config)
        return
    with tempfile.TemporaryDirectory() as scratch:
        prepared, quantized = Path(scratch) / "prepared.onnx", Path(scratch) / "quantized.onnx"
        # ONNX Runtime's symbolic shape inference cannot follow a transformer's length-dependent slices
        # (position ids); its quantizer works without that pre-processing.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=is_text_config(config))
        if mode.startswith("int8"):
            onnx.save_model(unshare_initializers(onnx.load_model(str(prepared))), str(prepared))
        if mode == "int8_dynamic":
            quantize_dynamic(prepared, quantized, weight_type=QuantType.QInt8)
        elif mode == "int8_static":
            quantize_static(prepared, quantized, CalibrationReader(calibration.astype(np.float32)),
                            quant_format=QuantFormat.QDQ, per_channel=scheme.per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CALIBRATION_METHODS[scheme.calibration],
                            nodes_to_exclude=list(scheme.float_nodes))
        else:
            onnx.save_model(convert_float_to_float16(onnx.load_model(str(prepared)), keep_io_types=True),
                            str(quantized))
        save_onnx(onnx.load_model(str(quantized)), path, config)


def onnx_accuracy(path: str | Path, X: np.ndarray, y: np.ndarray) -> float:
    """Accuracy in percent of the ONNX model at `path` on inputs `X` with class indices `y`."""
    session = OnnxClassifier(path)
    predicted = np.concatenate([session.run_native(session.native_input(X[i : i + 1024]))
                                for i in range(0, len(X), 1024)]).argmax(axis=1)
    return float(100 * (predicted == y).mean())


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
        # float32 features, or a text model's int64 token ids
        self.dtype = np.int64 if self.session.get_inputs()[0].type == "tensor(int64)" else np.float32

    def eval(self) -> OnnxClassifier:
        return self

    def native_input(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """The session's input type, C-contiguous (no copy when `x` already is)."""
        return np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=self.dtype)

    def run_native(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_native(self.native_input(x)))
