"""Structured pruning for any graph, with Torch-Pruning's dependency graph (DepGraph, Fang et al. 2023).

DepGraph traces the model once and groups every parameter that must lose the same channels together:
convolutions and their batch norms, both sides of residual adds and concatenations, attention
projections (nn.MultiheadAttention keeps its heads, each losing the same width), MLP widths, layer
norms, embeddings and free-standing parameters such as positional embeddings. A fraction of each
group's channels, ranked by group L2 magnitude, is removed, giving a smaller dense model.

The user's builder cannot express the pruned widths, so the model file records the shape of every
tensor that differs from the architecture as built (tasks/compression/shapes.py), and the result is
checked to rebuild from them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping

import torch
import torch_pruning as tp
from torch import nn

from tasks.compression.pruning import Finetune
from tasks.compression.shapes import (
    PrunedShapeError,
    apply_pruned_shapes,
    pruned_shapes,
    set_tensor,
)

# Layers whose output width is their own choice; the output layers among them keep it (it is the classes).
WIDTH_LAYERS = {tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.EMBED, tp.ops.OPTYPE.MHA, tp.ops.OPTYPE.LSTM}


class StructuredPruneError(ValueError):
    """The architecture cannot be structurally pruned (or rebuilt from its pruned shapes): says why."""


def _output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """The width layers that produce the model's output, found by walking back from the graph's ends through
    shape-keeping operations (activations, norms, adds, reshapes)."""
    stack = [node for node in graph.module2node.values() if not node.outputs]
    seen, found = set(), []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.type in WIDTH_LAYERS and isinstance(node.module, nn.Module):
            found.append(node.module)
        else:
            stack.extend(node.inputs)
    return found


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (e.g. an output layer sharing the embedding)."""
    by_tensor: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(parameter), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def _retie(model: nn.Module, ties: list[list[str]]) -> None:
    """Torch-Pruning prunes each module's reference to a tied parameter separately (with the same indices,
    as they are in one group): make them one tensor again."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for names in ties:
        first = tensors[names[0]]
        for name in names[1:]:
            if tensors[name].shape != first.shape or not torch.equal(tensors[name], first):
                raise StructuredPruneError(f"tied parameters {names} were pruned differently")
            set_tensor(model, name, first)


def structured_prune(model: nn.Module, ratio: float, build: Callable[[], nn.Module], example: torch.Tensor,
                     finetune: Finetune | None = None) -> tuple[nn.Module, dict[str, list[int]]]:
    """A copy of `model` with a fraction `ratio` of the channels of every dependency group removed (never the
    output's), fine-tuned; and its pruned_shapes against the architecture `build()` makes.

    Checks that the result rebuilds from `build()` and the shapes to the same outputs on `example`, so a
    model that could not be saved and loaded fails here, with the reason.
    """
    model = copy.deepcopy(model).eval()
    ties = _tied_names(model)
    with torch.no_grad():
        expected_shape = model(example).shape
    with warnings.catch_warnings():  # positional embeddings and other free parameters: pruned on their last dim
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        try:
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
            heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
            pruner = tp.pruner.MetaPruner(model, example, tp.importance.GroupMagnitudeImportance(p=2),
                                          pruning_ratio=ratio, ignored_layers=_output_layers(graph),
                                          out_channel_groups=heads)
            pruner.step()
        except (RuntimeError, AssertionError, TypeError, ValueError, KeyError, IndexError) as e:
            raise StructuredPruneError(f"Torch-Pruning cannot prune this graph ({type(e).__name__}: {e})") from None
    _retie(model, ties)
    with torch.no_grad():
        try:
            output_shape = model(example).shape
        except RuntimeError as e:
            raise StructuredPruneError(f"the pruned model no longer runs ({e})") from None
    if output_shape != expected_shape:
        raise StructuredPruneError(f"pruning changed the output shape from {list(expected_shape)} to "
                                   f"{list(output_shape)}")
    with torch.device("meta"):
        shapes = pruned_shapes(model, build())
    _check_rebuilds(model, shapes, build, example)
    if finetune is not None:
        finetune(model)
    return model.eval(), shapes


def _check_rebuilds(model: nn.Module, shapes: Mapping[str, list[int]], build: Callable[[], nn.Module],
                    example: torch.Tensor) -> None:
    """The architecture built and shrunk to `shapes` holds `model`'s weights and computes the same."""
    try:
        rebuilt = apply_pruned_shapes(build(), dict(shapes))
        rebuilt.load_state_dict(model.state_dict())
        with torch.no_grad():
            same = torch.allclose(rebuilt.eval()(example), model(example), atol=1e-5)
    except (RuntimeError, PrunedShapeError) as e:
        raise StructuredPruneError(f"the pruned model cannot be rebuilt from its recorded shapes ({e})") from None
    if not same:
        changed = sorted({name.rpartition(".")[0] for name in shapes})
        raise StructuredPruneError(f"the pruned model rebuilt from its recorded shapes computes differently: a "
                                   f"layer among {changed} keeps a size outside its tensors")
