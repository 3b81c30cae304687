"""Pruning: unstructured magnitude pruning and structured (neuron/channel) pruning.

Unstructured pruning zeroes the smallest weights (globally or per layer) over an
iterative prune/fine-tune schedule using torch.nn.utils.prune; the zeros are then
stored as a bitmask plus survivors (tasks/encodings.py), so the file really shrinks.

Structured pruning removes whole hidden neurons and conv channels ranked by the L1
norm of their weights and returns a genuinely smaller dense network of the same
architecture (fewer parameters, FLOPs and latency). It knows the layouts of the
architectures shrinkflow ships (`mlp`, `cnn`); other architectures are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from tasks.models import build_model
from tasks.params import ParamsError

Finetune = Callable[[nn.Module], None]


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among the prunable weights."""
    weights = [getattr(m, name) for m, name in prunable_weights(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def sparsity_schedule(target: float, rounds: int) -> list[float]:
    """Cumulative sparsity after each round: the cubic schedule of Zhu & Gupta (2017), big cuts first."""
    return [target * (1 - (1 - r / rounds) ** 3) for r in range(1, rounds + 1)]


def magnitude_prune(model: nn.Module, target: float, *, scope: str = "global", rounds: int = 1,
                    finetune: Finetune | None = None) -> nn.Module:
    """A copy of `model` with a fraction `target` of its prunable weights zeroed, fine-tuned after each round."""
    if not 0 <= target < 1:
        raise ParamsError(f"prune.sparsity: must be in [0, 1), got {target}")
    if scope not in ("global", "layer"):
        raise ParamsError(f"prune.scope: must be 'global' or 'layer', got {scope!r}")
    model = copy.deepcopy(model)
    parameters = prunable_weights(model)
    done = 0.0
    for cumulative in sparsity_schedule(target, rounds):
        amount = 1 - (1 - cumulative) / (1 - done)  # torch prunes a fraction of what is still unpruned
        if scope == "global":
            prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=amount)
        else:
            for module, name in parameters:
                prune.l1_unstructured(module, name, amount=amount)
        done = cumulative
        if finetune is not None:
            finetune(model)  # pruned weights stay zero: the mask multiplies them in every forward pass
    for module, name in parameters:
        if prune.is_pruned(module):
            prune.remove(module, name)
    return model.eval()


def _keep(importance: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (in original order) of the most important units; at least one survives."""
    n_keep = max(1, round(len(importance) * (1 - ratio)))
    return importance.topk(n_keep).indices.sort().values


def structured_prune(model: nn.Module, spec: dict[str, Any], input_shape: list[int], n_classes: int,
                     ratio: float, finetune: Finetune | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Remove a fraction `ratio` of the hidden neurons/channels; returns the smaller model and its spec."""
    if not 0 <= ratio < 1:
        raise ParamsError(f"structured_prune.ratio: must be in [0, 1), got {ratio}")
    if spec.get("arch") not in ("mlp", "cnn"):
        raise ParamsError(f"structured_prune: supports the built-in 'mlp' and 'cnn' architectures, "
                          f"not {spec.get('arch')!r}")
    layers = list(model)
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    norms = [m for m in layers if isinstance(m, nn.BatchNorm2d)]
    # Units kept in each hidden layer: conv output channels, then hidden linear neurons (never the classes).
    kept_channels = [_keep(c.weight.abs().sum(dim=(1, 2, 3)), ratio) for c in convs]
    kept_neurons = [_keep(lin.weight.abs().sum(dim=1), ratio) for lin in linears[:-1]]

    new_spec = dict(spec)
    if spec["arch"] == "cnn":
        new_spec["channels"] = [len(k) for k in kept_channels]
        new_spec["hidden"] = len(kept_neurons[0])
    else:
        new_spec["hidden"] = [len(k) for k in kept_neurons]
    small = build_model(new_spec, input_shape, n_classes)
    small_convs = [m for m in small if isinstance(m, nn.Conv2d)]
    small_norms = [m for m in small if isinstance(m, nn.BatchNorm2d)]
    small_linears = [m for m in small if isinstance(m, nn.Linear)]

    with torch.no_grad():
        previous = torch.arange(convs[0].in_channels) if convs else None
        for conv, small_conv, keep in zip(convs, small_convs, kept_channels):
            small_conv.weight.copy_(conv.weight[keep][:, previous])
            if conv.bias is not None:
                small_conv.bias.copy_(conv.bias[keep])
            previous = keep
        for norm, small_norm, keep in zip(norms, small_norms, kept_channels):
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(small_norm, name).copy_(getattr(norm, name)[keep])
        if convs:
            # The first linear layer reads the flattened feature map: channel-major blocks of h*w inputs.
            spatial = linears[0].in_features // convs[-1].out_channels
            previous = (previous[:, None] * spatial + torch.arange(spatial)).flatten()
        else:
            previous = torch.arange(linears[0].in_features)
        for i, (lin, small_lin) in enumerate(zip(linears, small_linears)):
            keep = kept_neurons[i] if i < len(kept_neurons) else torch.arange(lin.out_features)
            small_lin.weight.copy_(lin.weight[keep][:, previous])
            small_lin.bias.copy_(lin.bias[keep])
            previous = keep
    if finetune is not None:
        finetune(small)
    return small.eval(), new_spec
