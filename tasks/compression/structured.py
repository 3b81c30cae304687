"""Structured pruning for any graph, with Torch-Pruning's dependency graph (DepGraph, Fang et al. 2023).

DepGraph traces the model once and groups every parameter that must lose the same channels together:
convolutions and their batch norms, both sides of residual adds and concatenations, attention
projections, MLP widths, layer norms, embeddings and free-standing parameters such as positional
embeddings. A fraction of each group's channels, ranked by group L2 magnitude, is removed, giving a
smaller dense model; nn.MultiheadAttention keeps its heads there, each losing the same width.

Whole heads go first, when asked: nn.MultiheadAttention's inner width is its model width, so removing
a head removes its channels from the residual stream, and from every attention layer coupled to that
stream (the same heads in each; their group L2 magnitudes are summed to rank them).

The user's builder cannot express the pruned widths, so the model file records the shape of every
tensor that differs from the architecture as built, and the head counts (tasks/compression/shapes.py);
the result is checked to rebuild from them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from tasks.compression.pruning import Finetune
from tasks.compression.shapes import (
    PRUNED_SHAPES,
    PrunedShapeError,
    apply_structure,
    set_tensor,
    structure,
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


def remove_heads(model: nn.Module, fraction: float, graph: tp.DependencyGraph) -> None:
    """Remove `fraction` (rounded down, one always stays) of the heads of every nn.MultiheadAttention, the
    least important by summed group L2 magnitude over the attention layers sharing their channels."""
    done: set[nn.Module] = set()
    for attention in [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]:
        heads, width = attention.num_heads, attention.head_dim
        removed = min(int(fraction * heads), heads - 1)
        if attention in done or removed == 0:
            continue
        if not attention._qkv_same_embed_dim:
            raise StructuredPruneError("whole heads can be removed only from attention with one in_proj_weight")
        group = graph.get_pruning_group(attention, tp.prune_multihead_attention_out_channels,
                                        list(range(attention.embed_dim)))
        coupled = list(dict.fromkeys(dep.target.module for dep, _ in group
                                     if isinstance(dep.target.module, nn.MultiheadAttention)))
        if any((m.num_heads, m.head_dim) != (heads, width) for m in coupled):
            raise StructuredPruneError("attention layers sharing their channels have different head counts")
        importance = torch.zeros(heads)
        for m in coupled:
            importance += m.in_proj_weight.detach().view(3, heads, width, -1).pow(2).sum((0, 2, 3))
            importance += m.out_proj.weight.detach().view(-1, heads, width).pow(2).sum((0, 2))
        dropped = sorted(importance.argsort()[:removed].tolist())
        for m in coupled:  # Torch-Pruning keeps num_heads and divides the new width by it: give it the new count
            m.num_heads = heads - removed
        graph.get_pruning_group(attention, tp.prune_multihead_attention_out_channels,
                                [h * width + i for h in dropped for i in range(width)]).prune()
        done.update(coupled)


def structured_prune(model: nn.Module, ratio: float, build: Callable[[], nn.Module], example: torch.Tensor,
                     finetune: Finetune | None = None, heads: float = 0.0) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `model` with a fraction `heads` of the attention heads removed, then a fraction `ratio` of the
    channels of every dependency group (never the output's), fine-tuned; and the config entries recording
    its structure against the architecture `build()` makes (pruned_shapes, attention_heads).

    Checks that the result rebuilds from `build()` and that structure to the same outputs on `example`, so a
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
            remove_heads(model, heads, graph)
            if ratio > 0:
                attention = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
                pruner = tp.pruner.MetaPruner(model, example, tp.importance.GroupMagnitudeImportance(p=2),
                                              pruning_ratio=ratio, ignored_layers=_output_layers(graph),
                                              out_channel_groups=attention)
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
        recorded = structure(model, build())
    _check_rebuilds(model, recorded, build, example)
    if finetune is not None:
        finetune(model)
    return model.eval(), recorded


def _check_rebuilds(model: nn.Module, recorded: Mapping[str, Any], build: Callable[[], nn.Module],
                    example: torch.Tensor) -> None:
    """The architecture built and given the `recorded` structure holds `model`'s weights and computes the same."""
    try:
        rebuilt = apply_structure(build(), dict(recorded))
        rebuilt.load_state_dict(model.state_dict())
        with torch.no_grad():
            same = torch.allclose(rebuilt.eval()(example), model(example), atol=1e-5)
    except (RuntimeError, PrunedShapeError) as e:
        raise StructuredPruneError(f"the pruned model cannot be rebuilt from its recorded shapes ({e})") from None
    if not same:
        changed = sorted({name.rpartition(".")[0] for name in recorded[PRUNED_SHAPES]})
        raise StructuredPruneError(f"the pruned model rebuilt from its recorded shapes computes differently: a "
                                   f"layer among {changed} keeps a size outside its tensors")
