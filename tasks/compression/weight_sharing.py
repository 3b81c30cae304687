"""Weight sharing (Deep Compression, Han et al. 2016): per-layer k-means to 2^b shared values.

Each Linear/Conv weight is clustered into 2^b centroids (linear initialisation over
the weight range, which Han et al. found best because it keeps the rare large
weights). Fine-tuning then trains the centroids themselves: every weight of a
cluster contributes its gradient to the one shared value. Pruned zeros stay zero
and are not clustered, so prune → share composes. The saved file holds a codebook
plus packed b-bit indices (tasks/encodings.py).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from tasks.params import ParamsError
from tasks.compression.pruning import Finetune, prunable_weights


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic Lloyd's k-means on scalars; returns (centroids, index of each value)."""
    centroids = torch.linspace(float(values.min()), float(values.max()), k)
    for _ in range(iterations):
        assignment = (values[:, None] - centroids[None, :]).abs().argmin(dim=1)
        sums = torch.zeros(k).index_add_(0, assignment, values)
        counts = torch.bincount(assignment, minlength=k)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids, (values[:, None] - centroids[None, :]).abs().argmin(dim=1)


class SharedWeight(nn.Module):
    """Parametrization: weight = codebook[indices] where not pruned; only the codebook trains."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        survivors = weight != 0
        codebook, indices = kmeans_1d(weight[survivors], 2**bits)
        full_indices = torch.zeros(weight.shape, dtype=torch.long)
        full_indices[survivors] = indices
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("indices", full_indices)
        self.register_buffer("survivors", survivors)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.indices] * self.survivors


def share_weights(model: nn.Module, bits: int, finetune: Finetune | None = None) -> nn.Module:
    """A copy of `model` whose Linear/Conv weights each take at most 2^bits distinct non-zero values."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ParamsError(f"share.bits: must be an integer from 1 to 8, got {bits!r}")
    model = copy.deepcopy(model)
    layers = [module for module, _ in prunable_weights(model)]
    for module in layers:
        parametrize.register_parametrization(module, "weight", SharedWeight(module.weight.detach(), bits),
                                             unsafe=True)
        module.parametrizations.weight.original.requires_grad_(False)
    if finetune is not None:
        finetune(model)
    for module in layers:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model.eval()
