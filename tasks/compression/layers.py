"""Layer pruning: remove whole blocks, then recover by distillation (DistilBERT, Sanh et al. 2019).

In every nn.Sequential or nn.ModuleList, a run of consecutive interchangeable blocks (same class, same
tensor shapes, each with weights and mapping its input to an output of the same shape, so that any of
them can be left out) keeps one block of every `keep_every`, starting with the first: the kept blocks
keep their trained weights, DistilBERT's initialise-from-alternate-layers recipe, and fine-tuning (from
the teacher when the recipe has one) recovers the accuracy. Residual blocks and transformer encoder
layers are such runs; the projection block that changes a ResNet stage's width is not.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tasks.compression.pruning import Finetune
from tasks.compression.shapes import remove_layers


class LayerPruneError(ValueError):
    """The architecture has no run of interchangeable blocks to thin out."""


def _shape_keeping_blocks(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Names of the children of Sequential/ModuleList containers that have weights and map one tensor to a
    tensor of the same shape on `example`."""
    names = {module: name for name, module in model.named_modules()}
    candidates = [child for container in model.modules() if isinstance(container, (nn.Sequential, nn.ModuleList))
                  for child in container.children() if any(True for _ in child.parameters())]
    keeping: set[str] = set()

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        if (len(inputs) >= 1 and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor)
                and inputs[0].shape == output.shape):
            keeping.add(names[module])

    hooks = [child.register_forward_hook(record) for child in candidates]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return keeping


def _signature(block: nn.Module) -> tuple:
    return type(block), tuple((name, tuple(t.shape)) for name, t in block.state_dict().items())


def layers_to_remove(model: nn.Module, keep_every: int, example: torch.Tensor) -> list[str]:
    """The blocks to remove: in each run of interchangeable blocks, all but one of every `keep_every`."""
    keeping = _shape_keeping_blocks(model, example)
    removed = []
    for container_name, container in model.named_modules():
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        prefix = f"{container_name}." if container_name else ""
        run: list[str] = []
        previous = None
        for index, block in enumerate(container.children()):
            name = f"{prefix}{index}"
            if name in keeping and run and _signature(block) == previous:
                run.append(name)
            else:
                removed += [n for i, n in enumerate(run) if i % keep_every]
                run = [name] if name in keeping else []
            previous = _signature(block)
        removed += [n for i, n in enumerate(run) if i % keep_every]
    return removed


def layer_prune(model: nn.Module, keep_every: int, example: torch.Tensor,
                finetune: Finetune | None = None) -> tuple[nn.Module, list[str]]:
    """A copy of `model` keeping one of every `keep_every` interchangeable blocks, fine-tuned; and the names
    of the removed blocks (as numbered before removal)."""
    model = copy.deepcopy(model).eval()
    removed = layers_to_remove(model, keep_every, example)
    if not removed:
        raise LayerPruneError("no nn.Sequential or nn.ModuleList holds two or more interchangeable blocks "
                              "(same class and shapes, output shaped as input) to remove")
    with torch.no_grad():
        expected = model(example).shape
    remove_layers(model, [removed])
    with torch.no_grad():
        if model(example).shape != expected:
            raise LayerPruneError(f"removing {removed} changed the output shape")
    if finetune is not None:
        finetune(model)
    return model.eval(), removed
