"""Pruning: unstructured magnitude pruning (structured pruning is tasks/compression/structured.py).

Unstructured pruning zeroes the smallest weights (globally or per layer) of every
weight-bearing layer -- Linear, Conv1d/2d/3d, Embedding, Bilinear and the attention
projections of nn.MultiheadAttention (`in_proj_weight` or `q/k/v_proj_weight`, and
`out_proj`) -- over an iterative prune/fine-tune schedule. The zeros are then stored as
a bitmask plus survivors (tasks/encodings.py), so the file really shrinks.

The mask is a parametrization (torch.nn.utils.parametrize): the weight is recomputed as
original × mask on every access, so modules that read another module's weight without
calling it (MultiheadAttention reads `out_proj.weight`) see the pruned weight and
fine-tuning builds a fresh graph each step. A tensor held by several modules (an output
layer tied to the embedding) is ranked and masked once, and every holder reads it masked.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn
from torch.nn.utils import parametrize

from tasks.params import ParamsError

Finetune = Callable[[nn.Module], None]
Owner = tuple[nn.Module, str]  # a module and the name of a weight it holds
WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.Bilinear)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")  # out_proj is a Linear


def _layer_weight_names(module: nn.Module) -> tuple[str, ...]:
    if isinstance(module, nn.MultiheadAttention):
        return ATTENTION_WEIGHTS
    return ("weight",) if isinstance(module, WEIGHT_LAYERS) else ()


def weight_owners(model: nn.Module) -> list[list[Owner]]:
    """Every weight of a weight-bearing layer once, each with all the (module, name) that hold it:
    a tied weight (an output layer sharing the embedding's) is one tensor with several owners."""
    layer_weights = {id(weight) for module in model.modules() for name in _layer_weight_names(module)
                     if isinstance(weight := getattr(module, name, None), nn.Parameter)}
    owners: dict[int, list[Owner]] = {}
    for module in model.modules():  # any module may hold a tied weight, not only a layer that computes with it
        for name, parameter in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(parameter) in layer_weights:
                owners.setdefault(id(parameter), []).append((module, name))
    return list(owners.values())


def prunable_weights(model: nn.Module) -> list[Owner]:
    """One (module, name) per prunable weight tensor; tied weights appear once."""
    return [holders[0] for holders in weight_owners(model)]


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among the prunable weights (each tied tensor counted once)."""
    weights = [getattr(m, name) for m, name in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def parametrize_owners(owners: list[Owner], parametrization: nn.Module) -> None:
    """Give every holder of one tensor the same parametrization (hence the same trainable state)."""
    for module, name in owners:
        parametrize.register_parametrization(module, name, parametrization, unsafe=True)


def remove_parametrizations(owners: list[Owner]) -> None:
    """Bake the parametrized value into the original Parameter (same object: ties and requires_grad survive)."""
    for module, name in owners:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)


class PruningMask(nn.Module):
    """Parametrization: weight = original × keep, recomputed on every access."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", torch.ones_like(weight, dtype=torch.bool))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.keep


def sparsity_schedule(target: float, rounds: int) -> list[float]:
    """Cumulative sparsity after each round: the cubic schedule of Zhu & Gupta (2017), big cuts first."""
    return [target * (1 - (1 - r / rounds) ** 3) for r in range(1, rounds + 1)]


def _smallest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat indices of the round(fraction × n) smallest scores."""
    return scores.topk(round(fraction * scores.numel()), largest=False, sorted=False).indices


def _update_masks(masks: list[PruningMask], originals: list[torch.Tensor], fraction: float, scope: str) -> None:
    """Mask the smallest `fraction` of the weights, globally or per tensor. Already pruned weights score
    below every survivor, so they stay pruned as the fraction grows."""
    with torch.no_grad():
        scores = [torch.where(m.keep, w.abs(), -1.0).flatten() for m, w in zip(masks, originals)]
        if scope == "layer":
            pruned_per_tensor = [_smallest(s, fraction) for s in scores]
        else:
            pruned = _smallest(torch.cat(scores), fraction)
            offsets = torch.tensor([0] + [s.numel() for s in scores], device=pruned.device).cumsum(0)
            pruned_per_tensor = [pruned[(pruned >= lo) & (pruned < hi)] - lo for lo, hi in pairwise(offsets)]
        for mask, indices in zip(masks, pruned_per_tensor):
            mask.keep.view(-1)[indices] = False


def magnitude_prune(model: nn.Module, target: float, *, scope: str = "global", rounds: int = 1,
                    finetune: Finetune | None = None) -> nn.Module:
    """A copy of `model` with a fraction `target` of its prunable weights zeroed, fine-tuned after each round."""
    if not 0 <= target < 1:
        raise ParamsError(f"prune.sparsity: must be in [0, 1), got {target}")
    if scope not in ("global", "layer"):
        raise ParamsError(f"prune.scope: must be 'global' or 'layer', got {scope!r}")
    model = copy.deepcopy(model)
    groups = weight_owners(model)
    if not groups:
        raise ParamsError(f"prune: {type(model).__name__} has no prunable weights "
                          f"(Linear, Conv, Embedding, Bilinear or MultiheadAttention layers)")
    originals = [getattr(*holders[0]) for holders in groups]
    masks = [PruningMask(weight) for weight in originals]
    for holders, mask in zip(groups, masks):
        parametrize_owners(holders, mask)
    for cumulative in sparsity_schedule(target, rounds):
        _update_masks(masks, originals, cumulative, scope)
        if finetune is not None:
            finetune(model)  # pruned weights stay zero: every access to a weight multiplies it by its mask
    for holders in groups:
        remove_parametrizations(holders)
    return model.eval()
