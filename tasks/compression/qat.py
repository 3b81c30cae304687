"""Quantization-aware training: quantize, then retrain, repeat until the int8 model meets the threshold.

Each round fine-tunes the model with fake quantization (torch.ao's FakeQuantize) simulating ONNX Runtime's
static int8 scheme: weights int8, symmetric, one scale per output channel; a layer's input and output uint8,
one affine scale per tensor. The fake quantization is then removed, and the fp32 weights it trained are
exported to ONNX and quantized by ONNX Runtime with that same scheme, so the int8 artifact rounds the
QAT-trained weights. Its accuracy on the validation split decides: round 0 is plain post-training int8, and
the rounds stop once the drop from the fp32 input is within `max_drop` points; the best round is kept.

torchao's QAT is not used: it covers Linear and Embedding only (no Conv) and fakes per-token dynamic
activations, which ONNX Runtime's static int8 does not compute.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)
from torch.nn.utils import parametrize

from tasks.compression.quantization import export_onnx, onnx_accuracy, quantize_onnx

QUANTIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # weights on axis 0 by output channel
INPUT_QUANTIZER, OUTPUT_QUANTIZER = "qat_input_quantizer", "qat_output_quantizer"


class WeightFakeQuant(nn.Module):
    """A weight as ONNX Runtime's int8 per-channel symmetric quantization rounds it ([-127, 127], zero point 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.quantize = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127,
                                     dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantize(weight)


def activation_fake_quant() -> FakeQuantize:
    """An activation as ONNX Runtime's static uint8 quantization rounds it (one affine scale per tensor)."""
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                        qscheme=torch.per_tensor_affine)


def quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, INPUT_QUANTIZER)(args[0]), *args[1:])


def quantize_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, OUTPUT_QUANTIZER)(output)


def fake_quantized_layers(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to quantize")
    return layers


def insert_fake_quant(model: nn.Module) -> Callable[[], None]:
    """Fake-quantize every Linear/Conv layer of `model` in place; returns the function that removes it all,
    keeping the fp32 weights as trained (a layer that reads its weight without calling the layer, such as
    an attention's out_proj, still gets the weight fake-quantized)."""
    layers = fake_quantized_layers(model)
    device = layers[0].weight.device
    handles = []
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant().to(device))
        setattr(layer, INPUT_QUANTIZER, activation_fake_quant().to(device))
        setattr(layer, OUTPUT_QUANTIZER, activation_fake_quant().to(device))
        handles += [layer.register_forward_pre_hook(quantize_input), layer.register_forward_hook(quantize_output)]

    def remove() -> None:
        for handle in handles:
            handle.remove()
        for layer in layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            delattr(layer, INPUT_QUANTIZER)
            delattr(layer, OUTPUT_QUANTIZER)

    return remove


def check_fake_quant(model: nn.Module, input_shape: list[int]) -> None:
    """Fake quantization applies to `model` and comes off again (a dry run: nothing trains)."""
    remove = insert_fake_quant(model)
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=next(model.parameters()).device))
    finally:
        remove()


@dataclass
class Int8Check:
    """Writes a model as ONNX Runtime static int8 and measures its validation accuracy."""

    config: dict[str, Any]
    calibration: np.ndarray
    X: np.ndarray
    y: np.ndarray

    def accuracy(self, model: nn.Module) -> float:
        with tempfile.TemporaryDirectory() as scratch:
            fp32, int8 = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
            export_onnx(model, fp32, self.config)
            quantize_onnx(fp32, int8, "int8_static", self.config, self.calibration)
            return onnx_accuracy(int8, self.X, self.y)


def quantization_aware_training(model: nn.Module, finetune: Callable[[nn.Module], None], check: Int8Check,
                                source_accuracy: float, rounds: int, max_drop: float) -> tuple[nn.Module, dict]:
    """The model (fp32, QAT-trained weights) whose static int8 is best on validation, and the record of every
    round: round 0 is post-training int8; each further round fine-tunes with fake quantization. Stops at the
    first round whose drop from `source_accuracy` is at most `max_drop` points."""
    model = copy.deepcopy(model)
    best, best_accuracy = copy.deepcopy(model), check.accuracy(model)
    history = [{"round": 0, "int8_validation_accuracy": best_accuracy}]
    for round_ in range(1, rounds + 1):
        if source_accuracy - history[-1]["int8_validation_accuracy"] <= max_drop:
            break
        remove = insert_fake_quant(model)
        try:
            finetune(model)
        finally:
            remove()
        accuracy = check.accuracy(model.eval())
        history.append({"round": round_, "int8_validation_accuracy": accuracy})
        if accuracy > best_accuracy:  # ties keep the earlier round
            best, best_accuracy = copy.deepcopy(model), accuracy
    chosen = max(history, key=lambda r: (r["int8_validation_accuracy"], -r["round"]))
    record = {"source_validation_accuracy": source_accuracy, "max_drop": max_drop, "rounds": history,
              "chosen_round": chosen["round"], "met": source_accuracy - best_accuracy <= max_drop}
    return best.eval(), record
