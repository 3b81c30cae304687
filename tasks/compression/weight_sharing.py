"""Weight sharing (Deep Compression, Han et al. 2016): per-tensor k-means to 2^b shared values.

Every weight `tasks.compression.pruning.weight_owners` finds (Linear, Conv, Embedding,
Bilinear, the attention projections including `in_proj_weight`) is clustered into 2^b
centroids (linear initialisation over the weight range, which Han et al. found best because
it keeps the rare large weights). Fine-tuning then trains the centroids themselves: every
weight of a cluster contributes its gradient to the one shared value. Pruned zeros stay zero
and are not clustered, so prune → share composes; a fully pruned tensor has nothing to share
and is left as it is. A tied tensor is clustered once and all its holders read the same
codebook. The saved file holds a codebook plus packed b-bit indices (tasks/encodings.py).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tasks.compression.pruning import (
    Finetune,
    parametrize_owners,
    remove_parametrizations,
    weight_owners,
)
from tasks.params import ParamsError


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic Lloyd's k-means on scalars; returns (centroids, index of each value).

    Memory is O(len(values)) whatever k: the values are sorted once, each cluster is then the run of
    sorted values between the midpoints of neighbouring centroids, and its sum a difference of prefix
    sums. Centroids start sorted and a 1-D Lloyd step keeps them sorted, so the midpoints are too.
    """
    ordered = values.double().sort().values
    prefix = torch.cat([ordered.new_zeros(1), ordered.cumsum(0)])
    centroids = torch.linspace(float(ordered[0]), float(ordered[-1]), k, dtype=torch.float64, device=values.device)
    ends = torch.tensor([0, len(ordered)], device=values.device)
    for _ in range(iterations):
        # A value on a midpoint joins the lower cluster, as the final assignment below does.
        bounds = torch.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2, right=True)
        edges = torch.cat([ends[:1], bounds, ends[1:]])
        counts = edges[1:] - edges[:-1]
        updated = torch.where(counts > 0, (prefix[edges[1:]] - prefix[edges[:-1]]) / counts.clamp(min=1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    assignment = torch.searchsorted((centroids[1:] + centroids[:-1]) / 2, values.double())
    return centroids.to(values.dtype), assignment


class SharedWeight(nn.Module):
    """Parametrization: weight = codebook[indices] where not pruned; only the codebook trains."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        survivors = weight != 0
        codebook, indices = kmeans_1d(weight[survivors], 2**bits)
        full_indices = torch.zeros(weight.shape, dtype=torch.long, device=weight.device)
        full_indices[survivors] = indices
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("indices", full_indices)
        self.register_buffer("survivors", survivors)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.indices] * self.survivors


def share_weights(model: nn.Module, bits: int, finetune: Finetune | None = None) -> nn.Module:
    """A copy of `model` whose prunable weights each take at most 2^bits distinct non-zero values."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ParamsError(f"share.bits: must be an integer from 1 to 8, got {bits!r}")
    model = copy.deepcopy(model)
    groups = weight_owners(model)
    originals = [getattr(*holders[0]) for holders in groups]  # the Parameters: parametrizing keeps them
    shared = [(holders, weight) for holders, weight in zip(groups, originals) if weight.detach().any()]
    if not shared:
        raise ParamsError(f"share: {type(model).__name__} has no non-zero weights in Linear, Conv, Embedding, "
                          f"Bilinear or MultiheadAttention layers to share")
    for holders, weight in shared:
        parametrize_owners(holders, SharedWeight(weight.detach(), bits))
    trainable = [weight.requires_grad for weight in originals]
    for weight in originals:
        # Shared weights train through their codebook; a fully pruned tensor has nothing to cluster and
        # stays all zero (already its most compact form).
        weight.requires_grad_(False)
    if finetune is not None:
        finetune(model)
    for holders, _ in shared:
        remove_parametrizations(holders)
    for weight, requires_grad in zip(originals, trainable):
        weight.requires_grad_(requires_grad)
    return model.eval()
