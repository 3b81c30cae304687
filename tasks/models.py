"""Model architectures, chosen by name in params, and their safe on-disk format.

A model file is safetensors: weights (see tasks/encodings.py for the compact forms
of pruned and shared weights; a tied tensor, such as an output layer sharing the
embedding's weight, once) plus one metadata entry holding the full config
(architecture spec, input shape, classes, training recipe, lineage), so a file
alone rebuilds its model and never needs unpickling.

params.yaml is trusted like code: its `arch: module:function` imports and calls a
user's builder. Model files are not (registry models come from shared storage): a
file may only name an architecture that is built in or configured in params.yaml,
nothing it names is ever imported, and its tensors must match that architecture
before any memory is allocated for them.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from tasks.compression.shapes import apply_structure
from tasks.encodings import (
    CODEBOOK,
    DEFLATED,
    INDICES,
    MASK,
    MAX_CODEBOOK_BITS,
    VALUES,
    decode_state,
    encode_state,
)
from tasks.io import atomic_path
from tasks.params import PARAMS_FILE, ParamsError

CONFIG_KEY = "shrinkflow_config"
Builder = Callable[..., nn.Module]
MAX_INPUT_ELEMENTS = 1 << 24  # one sample: far beyond any image or feature vector this pipeline trains on
# The compact forms (tasks/encodings.py) may decode a file to at most this many bytes beyond its own size:
# a crafted config with a huge width cannot make loading allocate gigabytes.
MAX_EXPANSION_BYTES = 64 << 20
COMPACT_FORMS = {MASK, MASK + DEFLATED, VALUES, CODEBOOK, INDICES, INDICES + DEFLATED}


class ModelFileError(ValueError):
    """A model file is unreadable, names an architecture that is not trusted, or does not match it."""


def mlp(input_shape: list[int], n_classes: int, hidden: list[int] = (256,), dropout: float = 0.0) -> nn.Module:
    """Fully connected network over the flattened input."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
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


# The BertConfig fields a text model's spec may set, with the values a genuine file can hold: a model file
# is untrusted, and nothing else of a Hugging Face config (auto_map, custom code) is ever read.
BERT_LIMITS: dict[str, tuple[type, Any, Any]] = {
    "vocab_size": (int, 8, 1 << 20),
    "hidden_size": (int, 1, 1 << 14),
    "num_hidden_layers": (int, 1, 128),
    "num_attention_heads": (int, 1, 1 << 10),
    "intermediate_size": (int, 1, 1 << 16),
    "max_position_embeddings": (int, 3, 1 << 16),
    "type_vocab_size": (int, 1, 16),
    "pad_token_id": (int, 0, 1 << 20),
    "layer_norm_eps": (float, 0.0, 1.0),
    "hidden_dropout_prob": (float, 0.0, 1.0),
    "attention_probs_dropout_prob": (float, 0.0, 1.0),
}
BERT_ACTIVATIONS = ("gelu", "relu", "gelu_new", "silu")


@functools.cache
def bert_classifier_class() -> type[nn.Module]:
    """BertForSequenceClassification taking token ids only (imported when first needed: transformers is slow
    to import, and image pipelines never need it)."""
    from transformers import BertForSequenceClassification

    class BertTextClassifier(BertForSequenceClassification):
        """Token ids [batch, length] in, logits out. The attention mask is the ids that are not padding, so
        the model, and its ONNX graph, take one input; a padded row gives what the same text alone gives."""

        def forward(self, input_ids: torch.Tensor, hidden: bool = False
                    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            """Logits; with `hidden`, also the hidden states (the embeddings' output, then every encoder
            layer's) for layer and attention distillation."""
            mask = (input_ids != self.config.pad_token_id).long()
            output = super().forward(input_ids=input_ids, attention_mask=mask, output_hidden_states=hidden)
            return (output.logits, output.hidden_states) if hidden else output.logits

    return BertTextClassifier


def hf_bert(input_shape: list[int], n_classes: int, hidden_act: str = "gelu", **options: Any) -> nn.Module:
    """A BERT-family text classifier (Hugging Face transformers), from its config values alone; the
    pretrained teacher's values come from its config.json (tasks/training.py). Input: [max_length] token ids."""
    from transformers import BertConfig

    unknown = sorted(set(options) - set(BERT_LIMITS))
    if unknown:
        raise ParamsError(f"model: hf_bert takes {sorted(BERT_LIMITS) + ['hidden_act']}, not {unknown}")
    for name, value in options.items():
        kind, low, high = BERT_LIMITS[name]
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and (kind is float or isinstance(value, int)) and low <= value <= high):
            raise ParamsError(f"model.{name}: a {kind.__name__} in [{low}, {high}], got {value!r}")
    if hidden_act not in BERT_ACTIVATIONS:
        raise ParamsError(f"model.hidden_act: one of {list(BERT_ACTIVATIONS)}, got {hidden_act!r}")
    config = BertConfig(num_labels=n_classes, hidden_act=hidden_act, **options)
    if len(input_shape) != 1 or input_shape[0] > config.max_position_embeddings:
        raise ParamsError(f"model: hf_bert takes token ids [max_length] with max_length up to "
                          f"max_position_embeddings {config.max_position_embeddings}, got input_shape {input_shape}")
    if config.hidden_size % config.num_attention_heads:
        raise ParamsError(f"model: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                          f"{config.num_attention_heads}")
    config._attn_implementation = "sdpa"  # fixed: the same arithmetic in training, export and every file
    return bert_classifier_class()(config)


BUILT_IN: dict[str, Builder] = {"mlp": mlp, "cnn": cnn, "hf_bert": hf_bert}


def resolve_architecture(arch: str) -> Builder:
    """A built-in name, or `package.module:function` for a user's own builder (imports it: params only)."""
    if arch in BUILT_IN:
        return BUILT_IN[arch]
    if ":" not in arch:
        raise ParamsError(f"model.arch: unknown architecture {arch!r}; use {sorted(BUILT_IN)} or 'module:function'")
    module_name, _, function_name = arch.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise ParamsError(f"model.arch: cannot import {arch!r} ({e})") from None


def configured_model_specs(params: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, spec) of every model spec (a mapping with an `arch`) in params.yaml: teacher, student,
    and the distill steps of compress.recipes and search.space."""
    if isinstance(params, dict):
        if isinstance(params.get("arch"), str):
            yield where, params
        for key, value in params.items():
            yield from configured_model_specs(value, f"{where}.{key}" if where else str(key))
    elif isinstance(params, list):
        for i, value in enumerate(params):
            yield from configured_model_specs(value, f"{where}[{i}]")


class TrustedArchitectures(Mapping[str, Builder]):
    """The architecture names a model file may use -> their builders, each resolved (imported) when first
    looked up, so a broken one fails only what uses it."""

    def __init__(self, names: set[str]):
        self.names = names

    def __getitem__(self, arch: str) -> Builder:
        if arch not in self.names:
            raise KeyError(arch)
        return resolve_architecture(arch)

    def __contains__(self, arch: object) -> bool:
        return arch in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)


def configured_architectures(params: Any) -> TrustedArchitectures:
    """The built-ins plus every architecture the (trusted) params configure: all a model file may name."""
    return TrustedArchitectures(set(BUILT_IN) | {spec["arch"] for _, spec in configured_model_specs(params)})


def trusted_architectures(params_file: Path = PARAMS_FILE) -> TrustedArchitectures:
    """configured_architectures of `params_file` (default ./params.yaml: every stage runs from the repository
    root), if there is one."""
    return configured_architectures(yaml.safe_load(params_file.read_text()) if params_file.is_file() else {})


def build_model(spec: dict[str, Any], input_shape: list[int], n_classes: int,
                architectures: Mapping[str, Builder] | None = None) -> nn.Module:
    """Instantiate the architecture named by `spec['arch']` with the rest of `spec` as options.

    From `architectures` when given; otherwise resolved as params.yaml names it.
    """
    if "arch" not in spec:
        raise ParamsError(f"model.arch: missing in model spec {spec}")
    arch = spec["arch"]
    options = {k: v for k, v in spec.items() if k != "arch"}
    builder = architectures[arch] if architectures is not None else resolve_architecture(arch)
    try:
        model = builder(list(input_shape), n_classes, **options)
    except TypeError as e:
        raise ParamsError(f"model: bad options {options} for arch {arch!r} ({e})") from None
    if not isinstance(model, nn.Module):
        raise ParamsError(f"model.arch {arch!r} returned {model!r:.60}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """State-dict keys naming a tensor that an earlier key already names -> that key: tied weights (an
    output layer sharing the embedding's). The architecture's builder makes the tie, so a file stores
    the tensor once and loading copies it into the one shared Parameter."""
    first: dict[int, str] = {}
    aliases = {}
    for key, tensor in model.state_dict(keep_vars=True).items():  # the Parameters and buffers themselves
        if (canonical := first.setdefault(id(tensor), key)) != key:
            aliases[key] = canonical
    return aliases


def save_model(model: nn.Module, path: str | Path, config: dict[str, Any]) -> None:
    """Write weights (compactly encoded where pruning or sharing allows; a tied tensor once) + config
    atomically. Equal weights and config give equal bytes.
    """
    aliases = tied_aliases(model)
    state = encode_state({key: tensor for key, tensor in model.state_dict().items() if key not in aliases})
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={CONFIG_KEY: json.dumps(config, sort_keys=True)})


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def check_config(path: str | Path, config: Any) -> None:
    """The fields loading relies on, with the types and sizes a genuine file has."""
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ModelFileError(f"{path}: {CONFIG_KEY}.{message}")

    require(isinstance(config, dict), f" is not a JSON object: {config!r:.60}")
    spec = config.get("model")
    require(isinstance(spec, dict) and isinstance(spec.get("arch"), str),
            f"model: needs a string 'arch', got {spec!r:.80}")
    for key, value in spec.items():
        require(_is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value)),
                f"model.{key}: a JSON scalar or a list of scalars, got {value!r:.80}")
    shape = config.get("input_shape")
    require(isinstance(shape, list) and bool(shape) and all(type(d) is int and d > 0 for d in shape),
            f"input_shape: a list of positive integers, got {shape!r:.80}")
    require(math.prod(shape) <= MAX_INPUT_ELEMENTS,
            f"input_shape: {shape} is {math.prod(shape):,} values per sample, more than {MAX_INPUT_ELEMENTS:,}")
    classes = config.get("classes")
    require(isinstance(classes, list) and bool(classes) and all(_is_scalar(c) for c in classes),
            f"classes: a non-empty list, got {classes!r:.80}")


def read_config(path: str | Path) -> dict[str, Any]:
    """A model file's config, checked: the file is untrusted."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as e:
        raise ModelFileError(f"{path}: not a safetensors model file ({e})") from None
    return parse_config(path, metadata)


def parse_config(origin: str | Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """The shrinkflow config in a model file's metadata (safetensors or ONNX), checked: the file is untrusted."""
    if CONFIG_KEY not in metadata:
        raise ModelFileError(f"{origin}: no {CONFIG_KEY} metadata; not a shrinkflow model file")
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except (ValueError, RecursionError) as e:
        raise ModelFileError(f"{origin}: {CONFIG_KEY} is not valid JSON ({e})") from None
    check_config(origin, config)
    return config


def _inflates_within(data: torch.Tensor, limit: int) -> bool:
    """Whether deflated `data` inflates to at most `limit` bytes; never inflates more than that."""
    inflater = zlib.decompressobj()
    try:
        inflater.decompress(data.numpy().tobytes(), limit)
    except zlib.error:
        return False
    return inflater.eof


def check_tensors(path: str | Path, arch: str, expected: dict[str, torch.Tensor]) -> None:
    """The file holds exactly the architecture's tensors (dense with their shapes, or in a compact form)
    and decodes within bounded memory. `expected` is the architecture's state on the meta device."""
    needed = sum(t.numel() * t.element_size() for t in expected.values())
    if needed > Path(path).stat().st_size + MAX_EXPANSION_BYTES:
        raise ModelFileError(f"{path}: architecture {arch!r} as configured in the file needs {needed:,} bytes of "
                             f"weights, more than {MAX_EXPANSION_BYTES:,} beyond the file's size; refusing to allocate")
    forms: dict[str, set[str]] = {name: set() for name in expected}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            name, separator, form = key.partition("::")
            if name not in expected or (separator and separator + form not in COMPACT_FORMS):
                raise ModelFileError(f"{path}: tensor {key!r} is not part of architecture {arch!r}")
            forms[name].add(separator + form)
        for name, tensor in expected.items():
            count = tensor.numel()
            if "" in forms[name]:
                ok = forms[name] == {""} and f.get_slice(name).get_shape() == list(tensor.shape)
            else:
                codebook_fits = (CODEBOOK not in forms[name]
                                 or f.get_slice(name + CODEBOOK).get_shape()[0] <= 2 ** MAX_CODEBOOK_BITS)
                ok = bool(forms[name] & {VALUES, CODEBOOK}) and codebook_fits
                for form, limit in ((MASK + DEFLATED, math.ceil(count / 8)), (INDICES + DEFLATED, count)):
                    ok = ok and (form not in forms[name] or _inflates_within(f.get_tensor(name + form), limit))
            if not ok:
                raise ModelFileError(f"{path}: tensor {name!r} is missing or does not fit architecture {arch!r} "
                                     f"(expects shape {list(tensor.shape)})")


def load_model(path: str | Path,
               architectures: Mapping[str, Builder] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model from its own config; returned in eval mode.

    The file may only name an architecture in `architectures` (default: the built-ins and those
    configured in ./params.yaml); nothing is imported because a file names it. The architecture is
    built on the meta device first and the file's tensors checked against it, then the model is
    built for real and loaded strictly. Tied weights are stored once; the builder makes the tie.
    """
    architectures = trusted_architectures() if architectures is None else architectures
    config = read_config(path)
    spec, input_shape, n_classes = config["model"], config["input_shape"], len(config["classes"])
    if spec["arch"] not in architectures:
        raise ModelFileError(f"{path}: architecture {spec['arch']!r} is neither built in nor configured in "
                             f"params.yaml; refusing to load it (trusted: {sorted(architectures)})")
    try:
        with torch.device("meta"):
            # a pruned model's file records the blocks and widths it lost: the builder cannot express them
            sized = apply_structure(build_model(spec, input_shape, n_classes, architectures), config)
            aliases = tied_aliases(sized)
            expected = {key: t for key, t in sized.state_dict().items() if key not in aliases}
    except Exception as e:  # the options come from the file: any failure of the builder is the file's
        raise ModelFileError(f"{path}: cannot build {spec} for input {input_shape} ({e})") from None
    check_tensors(path, spec["arch"], expected)
    model = apply_structure(build_model(spec, input_shape, n_classes, architectures), config)
    try:
        state = decode_state(load_file(str(path)), {k: t.shape for k, t in expected.items()})
        model.load_state_dict(state | {alias: state[key] for alias, key in aliases.items()})
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, SafetensorError, zlib.error) as e:
        raise ModelFileError(f"{path}: its tensors do not decode to architecture {spec['arch']!r} ({e})") from None
    return model.eval(), config
