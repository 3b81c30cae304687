"""Structured pruning of Hugging Face BERT-family classifiers: whole attention heads and MLP width.

In every encoder layer the least important heads go (their rows of query, key and value, and their
columns of the attention output) and the least important MLP units (rows of the intermediate layer,
columns of the output layer); importance is the L2 magnitude of the weights a head or unit owns
(Michel et al. 2019 prune heads by importance; magnitude is Torch-Pruning's default). Each layer keeps
at least one head and one unit. The layer's attention reshapes to (-1, head size), so the smaller
layers run unchanged, and the model file records them as `pruned_shapes` (tasks/compression/shapes.py).
"""

from __future__ import annotations

import torch
from torch import nn


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(getattr(model, "bert", None), "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("not a Hugging Face BERT-family classifier (it has no bert.encoder.layer)")
    return layers


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone())
    linear.out_features = len(rows)


def keep_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, columns].clone())
    linear.in_features = len(columns)


def most_important(scores: torch.Tensor, fraction_removed: float) -> torch.Tensor:
    """Indices of the units kept, in their original order: all but the `fraction_removed` (rounded down)
    with the smallest scores, and at least one."""
    keep = max(1, len(scores) - int(len(scores) * fraction_removed))
    return scores.topk(keep).indices.sort().values


@torch.no_grad()
def prune_heads_and_mlp(model: nn.Module, heads: float, mlp: float) -> nn.Module:
    """Remove the fraction `heads` of every layer's attention heads and `mlp` of its MLP units, in place."""
    for layer in encoder_layers(model):
        attention, output = layer.attention.self, layer.attention.output.dense
        size = attention.attention_head_size
        count = attention.query.out_features // size
        projections = (attention.query, attention.key, attention.value)
        scores = sum(p.weight.view(count, size, -1).pow(2).sum((1, 2)) + p.bias.view(count, size).pow(2).sum(1)
                     for p in projections) + output.weight.view(-1, count, size).pow(2).sum((0, 2))
        kept = most_important(scores, heads)
        rows = (kept[:, None] * size + torch.arange(size)).flatten()
        for projection in projections:
            keep_rows(projection, rows)
        keep_columns(output, rows)
        attention.num_attention_heads, attention.all_head_size = len(kept), len(rows)

        intermediate, down = layer.intermediate.dense, layer.output.dense
        scores = intermediate.weight.pow(2).sum(1) + intermediate.bias.pow(2) + down.weight.pow(2).sum(0)
        units = most_important(scores, mlp)
        keep_rows(intermediate, units)
        keep_columns(down, units)
    return model
