"""The structure of a pruned model, recorded in its file and applied when it is loaded.

A user's builder cannot express removed layers or pruned widths, so a model file's config records them:
the blocks layer pruning removed (`removed_layers`: rounds of names of children of an nn.Sequential or
nn.ModuleList), the head count of every nn.MultiheadAttention that lost whole heads (`attention_heads`)
and the shape of every tensor that differs from the architecture as built (`pruned_shapes`).
`apply_structure` makes a freshly built architecture so (on the meta device first, as
the loader sizes models) before its weights are loaded. The config comes from a model file, which is
untrusted: every name must be a block or tensor of the architecture, and sizes may only shrink.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PRUNED_SHAPES = "pruned_shapes"  # the config key of the recorded tensor shapes
REMOVED_LAYERS = "removed_layers"  # the config key of the recorded removed blocks
ATTENTION_HEADS = "attention_heads"  # the config key of the recorded head counts


class PrunedShapeError(ValueError):
    """A config's removed_layers or pruned_shapes do not fit the architecture."""


def apply_structure(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """A freshly built `model` with the config's removed layers removed, its attention layers at the recorded
    head counts and its tensors at the pruned shapes."""
    model = set_attention_heads(remove_layers(model, config.get(REMOVED_LAYERS)), config.get(ATTENTION_HEADS))
    return apply_pruned_shapes(model, config.get(PRUNED_SHAPES))


def structure(model: nn.Module, architecture: nn.Module) -> dict[str, Any]:
    """The config entries that make `architecture` (as built, less removed layers) into `model`'s shape."""
    recorded: dict[str, Any] = {PRUNED_SHAPES: pruned_shapes(model, architecture)}
    built = dict(architecture.named_modules())
    heads = {name: module.num_heads for name, module in model.named_modules()
             if isinstance(module, nn.MultiheadAttention) and module.num_heads != built[name].num_heads}
    if heads:
        recorded[ATTENTION_HEADS] = heads
    return recorded


def set_attention_heads(model: nn.Module, heads: Any) -> nn.Module:
    """Give each named nn.MultiheadAttention its recorded head count (untrusted: fewer than built, at least
    one); its head width follows from its pruned shapes."""
    if not heads:
        return model
    if not isinstance(heads, dict):
        raise PrunedShapeError(f"{ATTENTION_HEADS}: a mapping of attention layer name to head count, got "
                               f"{heads!r:.80}")
    modules = dict(model.named_modules())
    for name, count in heads.items():
        module = modules.get(name) if isinstance(name, str) else None
        if not isinstance(module, nn.MultiheadAttention):
            raise PrunedShapeError(f"{ATTENTION_HEADS}: {name!r:.80} is not a MultiheadAttention of the architecture")
        if not (type(count) is int and 1 <= count <= module.num_heads):
            raise PrunedShapeError(f"{ATTENTION_HEADS}.{name}: {count!r:.80} is not a head count from 1 up to the "
                                   f"architecture's {module.num_heads}")
        module.num_heads = count
    return model


def remove_layers(model: nn.Module, rounds: Any) -> nn.Module:
    """Remove, round after round, the named children of nn.Sequential / nn.ModuleList containers (names as
    numbered before that round's removal); returns `model`, changed in place."""
    if not rounds:
        return model
    if not (isinstance(rounds, list) and all(isinstance(names, list) and names for names in rounds)):
        raise PrunedShapeError(f"{REMOVED_LAYERS}: a list of rounds, each a list of block names, got {rounds!r:.80}")
    for names in rounds:
        by_container: dict[str, list[int]] = {}
        for name in names:
            container_name, _, index = name.rpartition(".") if isinstance(name, str) else ("", "", "")
            try:
                container = model.get_submodule(container_name)
            except AttributeError:
                container = None
            if not (isinstance(container, (nn.Sequential, nn.ModuleList)) and index.isdigit()
                    and int(index) < len(container)):
                raise PrunedShapeError(f"{REMOVED_LAYERS}: {name!r:.80} is not a block of a Sequential or ModuleList")
            by_container.setdefault(container_name, []).append(int(index))
        for container_name, indices in by_container.items():
            container = model.get_submodule(container_name)
            if len(set(indices)) >= len(container):
                raise PrunedShapeError(f"{REMOVED_LAYERS}: would remove every block of {container_name!r}")
            for index in sorted(set(indices), reverse=True):
                del container[index]  # both containers renumber the blocks after it
    return model


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(module_name), attribute, tensor)


def sync_layer_sizes(model: nn.Module) -> None:
    """Set each torch layer's size attributes (which some forwards read) from its resized tensors."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.conv._ConvNd):
            first, second = module.weight.shape[:2]
            if module.transposed:
                module.in_channels, module.out_channels = first, second * module.groups
            else:
                module.out_channels, module.in_channels = first, second * module.groups
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            tensor = module.weight if module.weight is not None else module.running_mean
            if tensor is not None:
                module.num_features = tensor.shape[0]
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
        elif isinstance(module, nn.GroupNorm) and module.weight is not None:
            module.num_channels = module.weight.shape[0]
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = module.weight.shape
        elif isinstance(module, nn.MultiheadAttention):
            module.embed_dim = module.out_proj.weight.shape[0]
            if module.embed_dim % module.num_heads:
                raise PrunedShapeError(f"{ATTENTION_HEADS}: width {module.embed_dim} of an attention layer is not "
                                       f"a multiple of its {module.num_heads} heads")
            module.head_dim = module.embed_dim // module.num_heads
            if module._qkv_same_embed_dim:
                module.kdim = module.vdim = module.embed_dim
        elif isinstance(module, nn.PReLU):
            module.num_parameters = module.weight.shape[0]


def apply_pruned_shapes(model: nn.Module, shapes: Any) -> nn.Module:
    """Shrink a freshly built `model` in place to the recorded `shapes` ({tensor name: shape}, from an
    untrusted file: every name must exist and every size may only shrink) and return it. The new tensors
    are empty, on the model's device: the caller loads the weights."""
    if not shapes:
        sync_layer_sizes(model)  # recorded head counts still set the head width
        return model
    if not isinstance(shapes, dict):
        raise PrunedShapeError(f"{PRUNED_SHAPES}: a mapping of tensor name to shape, got {shapes!r:.80}")
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    target: dict[int, list[int]] = {}
    for name, shape in shapes.items():
        if name not in tensors:
            raise PrunedShapeError(f"{PRUNED_SHAPES}: {name!r} is not a tensor of the architecture")
        original = list(tensors[name].shape)
        if not (isinstance(shape, list) and len(shape) == len(original)
                and all(type(size) is int and 1 <= size <= limit for size, limit in zip(shape, original))):
            raise PrunedShapeError(f"{PRUNED_SHAPES}.{name}: {shape!r:.80} is not a shape of {len(original)} sizes "
                                   f"from 1 up to the architecture's {original}")
        if target.setdefault(id(tensors[name]), shape) != shape:
            raise PrunedShapeError(f"{PRUNED_SHAPES}.{name}: tied to a tensor recorded as {target[id(tensors[name])]}")
    replaced: dict[int, torch.Tensor] = {}
    for name, old in tensors.items():  # every name of a tied tensor gets the one new tensor
        if id(old) in target:
            if id(old) not in replaced:
                new = torch.empty(target[id(old)], dtype=old.dtype, device=old.device)
                replaced[id(old)] = nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new
            set_tensor(model, name, replaced[id(old)])
    sync_layer_sizes(model)
    return model


def pruned_shapes(model: nn.Module, architecture: nn.Module) -> dict[str, list[int]]:
    """The shape of each of `model`'s tensors that differs from the unpruned `architecture` (meta is fine)."""
    reference = architecture.state_dict()
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()
            if tensor.shape != reference[name].shape}
