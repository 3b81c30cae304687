"""Model architectures, chosen by name in params, and their safe on-disk format.

A model file is safetensors: weights (see tasks/encodings.py for the compact forms
of pruned and shared weights) plus one metadata entry holding the full config
(architecture spec, input shape, classes, training recipe, lineage), so a file
alone rebuilds its model and never needs unpickling.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from tasks.encodings import decode_state, encode_state
from tasks.io import atomic_path
from tasks.params import ParamsError

CONFIG_KEY = "shrinkflow_config"


def mlp(input_shape: list[int], n_classes: int, hidden: list[int] = (256,), dropout: float = 0.0) -> nn.Module:
    """Fully connected network over the flattened input."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(torch.tensor(input_shape).prod())
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def cnn(
    input_shape: list[int],
    n_classes: int,
    channels: list[int] = (32, 64),
    hidden: int = 128,
    dropout: float = 0.0,
    batchnorm: bool = True,
) -> nn.Module:
    """Conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool) then a classifier head."""
    if len(input_shape) != 3:
        raise ParamsError(f"model.arch 'cnn' needs image input [channels, height, width], got {input_shape}")
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        in_channels, height, width = out_channels, height // 2, width // 2
    if height == 0 or width == 0:
        raise ParamsError(f"model.channels: {len(channels)} pooling blocks shrink a {input_shape[1:]} image to nothing")
    layers += [nn.Flatten(), nn.Linear(in_channels * height * width, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, n_classes))
    return nn.Sequential(*layers)


ARCHITECTURES = {"mlp": mlp, "cnn": cnn}


def resolve_architecture(arch: str):
    """A built-in name, or `package.module:function` for a user's own builder."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if ":" not in arch:
        raise ParamsError(f"model.arch: unknown architecture {arch!r}; use {sorted(ARCHITECTURES)} or 'module:function'")
    module_name, _, function_name = arch.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise ParamsError(f"model.arch: cannot import {arch!r} ({e})") from None


def build_model(spec: dict[str, Any], input_shape: list[int], n_classes: int) -> nn.Module:
    """Instantiate the architecture named by `spec['arch']` with the rest of `spec` as options."""
    if "arch" not in spec:
        raise ParamsError(f"model.arch: missing in model spec {spec}")
    options = {k: v for k, v in spec.items() if k != "arch"}
    builder = resolve_architecture(spec["arch"])
    try:
        return builder(list(input_shape), n_classes, **options)
    except TypeError as e:
        raise ParamsError(f"model: bad options {options} for arch {spec['arch']!r} ({e})") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, path: str | Path, config: dict[str, Any]) -> None:
    """Write weights (compactly encoded where pruning or sharing allows) + config atomically.

    Equal weights and config give equal bytes.
    """
    state = encode_state(model.state_dict())
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={CONFIG_KEY: json.dumps(config, sort_keys=True)})


def read_config(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[CONFIG_KEY])


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model from its own config; returned in eval mode."""
    config = read_config(path)
    model = build_model(config["model"], config["input_shape"], len(config["classes"]))
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    model.load_state_dict(decode_state(load_file(str(path)), shapes))
    return model.eval(), config
