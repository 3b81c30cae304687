"""The compression methods a recipe step may name: one definition each.

A method is its settings (a dataclass: fields, defaults and range checks, parsed with the field named
on error), whether the step is fine-tuned afterwards, whether it needs a teacher, whether it must be the
last step (its output is an ONNX Runtime model), and its function. Adding a method is adding one entry
to METHODS. `dry_run` applies a chain of steps to a model without training, on a batch of two zero
inputs, so a method that cannot apply to an architecture is found, with the reason, before anything trains.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.compression.layers import layer_prune
from tasks.compression.pruning import Finetune, magnitude_prune
from tasks.compression.qat import (
    Int8Check,
    check_fake_quant,
    quantization_aware_training,
)
from tasks.compression.quantization import (
    NO_STATIC_INT8_FOR_TEXT,
    QUANTIZATION_MODES,
    export_onnx,
    quantize_onnx,
)
from tasks.compression.shapes import (
    ATTENTION_HEADS,
    PRUNED_SHAPES,
    REMOVED_LAYERS,
    remove_layers,
    structure,
)
from tasks.compression.structured import structured_prune
from tasks.compression.transformer import prune_heads_and_mlp
from tasks.compression.tuning import tune_static
from tasks.compression.weight_sharing import share_weights
from tasks.models import BUILT_IN, build_model
from tasks.params import ModelParams, ParamsError, TrainParams, _require, from_dict
from tasks.text import example_input, is_text_config, pad_id, trim_vocabulary
from tasks.training import Split, predict_logits


class NotApplicable(ParamsError):
    """A recipe step cannot apply to the model's architecture (found by a dry run before training)."""


@dataclass
class StepContext:
    """What a step needs besides its model and settings. `config` is the step's output config (a copy of the
    parent's): a method that changes the architecture records it there."""

    config: dict[str, Any]
    input_shape: list[int]
    n_classes: int
    finetune: Finetune | None = None  # None in a dry run
    train: Callable[[ModelParams], Any] | None = None  # trains a new architecture from the teacher; None in a dry run
    calibration: np.ndarray | None = None  # inputs that calibrate static int8
    train_inputs: np.ndarray | None = None  # the whole train split's inputs (trim_vocab); None in a dry run
    validation: Split | None = None  # selects among quantizations (qat, quantize_tuned); never the test split


@dataclass(frozen=True)
class DistillSettings:
    model: dict[str, Any]  # the new (smaller) architecture
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the parent's training recipe

    def __post_init__(self) -> None:
        _require(isinstance(self.model.get("arch"), str), f"model: an architecture spec with 'arch', got {self.model!r}")


@dataclass(frozen=True)
class PruneSettings:
    sparsity: float
    scope: str = "global"
    rounds: int = 3

    def __post_init__(self) -> None:
        _require(0 <= self.sparsity < 1, f"sparsity: must be in [0, 1), got {self.sparsity!r}")
        _require(self.scope in ("global", "layer"), f"scope: must be 'global' or 'layer', got {self.scope!r}")
        _require(self.rounds >= 1, f"rounds: must be an integer >= 1, got {self.rounds!r}")


@dataclass(frozen=True)
class StructuredPruneSettings:
    ratio: float  # fraction of each dependency group's channels removed
    heads: float = 0.0  # fraction of each attention layer's whole heads removed first (one always stays)

    def __post_init__(self) -> None:
        _require(0 <= self.ratio < 1, f"ratio: must be in [0, 1), got {self.ratio!r}")
        _require(0 <= self.heads < 1, f"heads: must be in [0, 1), got {self.heads!r}")


@dataclass(frozen=True)
class TransformerPruneSettings:
    heads: float = 0.5  # fraction of every encoder layer's attention heads removed (one always stays)
    mlp: float = 0.0  # fraction of every encoder layer's MLP units removed

    def __post_init__(self) -> None:
        _require(0 <= self.heads < 1, f"heads: must be in [0, 1), got {self.heads!r}")
        _require(0 <= self.mlp < 1, f"mlp: must be in [0, 1), got {self.mlp!r}")


@dataclass(frozen=True)
class TrimVocabSettings:
    keep_characters: bool = True  # keep every single-character piece: unseen words split into characters


@dataclass(frozen=True)
class LayerPruneSettings:
    keep_every: int = 2  # in each run of interchangeable blocks, one of every keep_every stays

    def __post_init__(self) -> None:
        _require(self.keep_every >= 2, f"keep_every: must be an integer >= 2, got {self.keep_every!r}")


@dataclass(frozen=True)
class ShareSettings:
    bits: int

    def __post_init__(self) -> None:
        _require(1 <= self.bits <= 8, f"bits: must be an integer from 1 to 8, got {self.bits!r}")


@dataclass(frozen=True)
class QuantizeSettings:
    mode: str = "int8_static"

    def __post_init__(self) -> None:
        _require(self.mode in QUANTIZATION_MODES, f"mode: must be one of {list(QUANTIZATION_MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class QATSettings:
    rounds: int = 3  # fake-quantized fine-tuning rounds at most, each one compress.finetune
    max_drop: float = 0.5  # points of validation accuracy the int8 model may lose against the fp32 input

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, f"rounds: must be an integer >= 1, got {self.rounds!r}")
        _require(self.max_drop >= 0, f"max_drop: must be >= 0 points, got {self.max_drop!r}")


@dataclass(frozen=True)
class QuantizeTunedSettings:
    max_drop: float = 0.5  # points of validation accuracy the int8 model may lose against the fp32 input

    def __post_init__(self) -> None:
        _require(self.max_drop >= 0, f"max_drop: must be >= 0 points, got {self.max_drop!r}")


def distill(model: nn.Module, settings: DistillSettings, context: StepContext) -> nn.Module:
    recipe = from_dict(TrainParams, {**context.config["train"], **settings.train}, "distill step train")
    for key in (PRUNED_SHAPES, ATTENTION_HEADS, REMOVED_LAYERS):  # a new architecture, as its spec builds it
        context.config.pop(key, None)
    if context.train is None:
        context.config["model"] = settings.model
        return build_model(settings.model, context.input_shape, context.n_classes)
    trained = context.train(ModelParams(model=settings.model, train=recipe))
    context.config.update(model=trained.config["model"], train=trained.config["train"])
    return trained.model


def prune(model: nn.Module, settings: PruneSettings, context: StepContext) -> nn.Module:
    return magnitude_prune(model, settings.sparsity, scope=settings.scope, rounds=settings.rounds,
                           finetune=context.finetune)


def architecture(context: StepContext) -> nn.Module:
    """The step's architecture as its spec builds it, less the blocks layer pruning removed (unpruned widths)."""
    model = build_model(context.config["model"], context.input_shape, context.n_classes)
    return remove_layers(model, context.config.get(REMOVED_LAYERS))


def record_structure(config: dict[str, Any], recorded: dict[str, Any]) -> None:
    """Replace the config's recorded structure (`recorded` has attention_heads only when heads were removed)."""
    config.pop(ATTENTION_HEADS, None)
    config.update(recorded)


def prune_structure(model: nn.Module, settings: StructuredPruneSettings, context: StepContext) -> nn.Module:
    small, recorded = structured_prune(model, settings.ratio, lambda: architecture(context),
                                       example_input(context.config), context.finetune, settings.heads)
    record_structure(context.config, recorded)
    return small


def prune_transformer(model: nn.Module, settings: TransformerPruneSettings, context: StepContext) -> nn.Module:
    small = prune_heads_and_mlp(model, settings.heads, settings.mlp)
    if context.finetune is not None:
        context.finetune(small)
    with torch.device("meta"):
        record_structure(context.config, structure(small, architecture(context)))
    return small


def trim_vocab(model: nn.Module, settings: TrimVocabSettings, context: StepContext) -> nn.Module:
    """Keep only the embedding rows of the tokens the train split uses (the embedding is half of MiniLM): the
    file gets its own, smaller tokenizer. Training texts map to the same vectors, so nothing is fine-tuned;
    texts with other words split into smaller known pieces."""
    config = context.config
    embeddings = getattr(getattr(getattr(model, "bert", None), "embeddings", None), "word_embeddings", None)
    if not is_text_config(config) or not isinstance(embeddings, nn.Embedding):
        raise ValueError("trim_vocab needs a Hugging Face BERT-family text model (bert.embeddings.word_embeddings)")
    if context.train_inputs is None:  # a dry run: no corpus to trim to
        return model
    config["tokenizer"], kept = trim_vocabulary(config["tokenizer"], context.train_inputs, settings.keep_characters)
    embeddings.weight = nn.Parameter(embeddings.weight.detach()[torch.from_numpy(kept)].clone())
    pad = pad_id(config["tokenizer"])
    embeddings.padding_idx = model.config.pad_token_id = config["model"]["pad_token_id"] = pad
    with torch.device("meta"):
        record_structure(config, structure(model, architecture(context)))
    return model


def prune_layers(model: nn.Module, settings: LayerPruneSettings, context: StepContext) -> nn.Module:
    small, removed = layer_prune(model, settings.keep_every, example_input(context.config),
                                 context.finetune)
    context.config[REMOVED_LAYERS] = [*context.config.get(REMOVED_LAYERS, []), removed]
    if PRUNED_SHAPES in context.config:  # earlier structured pruning: its structure, named as the blocks now are
        with torch.device("meta"):
            record_structure(context.config, structure(small, architecture(context)))
    return small


def share(model: nn.Module, settings: ShareSettings, context: StepContext) -> nn.Module:
    return share_weights(model, settings.bits, finetune=context.finetune)


def keep(model: nn.Module, settings: Any, context: StepContext) -> nn.Module:
    return model


def write_quantized(model: nn.Module, settings: QuantizeSettings, context: StepContext, path: Path) -> None:
    """The model as an ONNX Runtime model at `path`, quantized (or cast) as `mode` says."""
    fp32 = path.with_name(path.stem + ".fp32.onnx")
    export_onnx(model, fp32, context.config)
    try:
        quantize_onnx(fp32, path, settings.mode, context.config, context.calibration)
    finally:
        fp32.unlink(missing_ok=True)


def validation_split(context: StepContext, method: str) -> Split:
    if context.validation is None or context.calibration is None:
        raise ParamsError(f"{method}: needs the validation split and calibration data (the compress stage gives both)")
    return context.validation


def qat(model: nn.Module, settings: QATSettings, context: StepContext) -> nn.Module:
    """Quantization-aware training (tasks/compression/qat.py); its rounds are recorded in the config."""
    if context.finetune is None:  # a dry run: the fake quantization must apply, nothing trains
        check_fake_quant(model, context.input_shape)
        return model
    validation = validation_split(context, "qat")
    device = next(model.parameters()).device
    source_accuracy = float(100 * (predict_logits(model, validation.X, device=device).argmax(1)
                                   == validation.y).double().mean())
    check = Int8Check(context.config, context.calibration, validation.X.numpy(), validation.y.numpy())
    trained, record = quantization_aware_training(model, context.finetune, check, source_accuracy,
                                                  settings.rounds, settings.max_drop)
    context.config["quantization_aware_training"] = record
    return trained


def write_static_int8(model: nn.Module, settings: Any, context: StepContext, path: Path) -> None:
    write_quantized(model, QuantizeSettings("int8_static"), context, path)


def write_tuned(model: nn.Module, settings: QuantizeTunedSettings, context: StepContext, path: Path) -> None:
    """Static int8 with the first scheme within the tolerance on validation (tasks/compression/tuning.py)."""
    validation = validation_split(context, "quantize_tuned")
    fp32 = path.with_name(path.stem + ".fp32.onnx")
    export_onnx(model, fp32, context.config)
    try:
        context.config["quantization_tuning"] = tune_static(
            fp32, path, context.config, context.calibration, validation.X.numpy(), validation.y.numpy(),
            settings.max_drop)
    finally:
        fp32.unlink(missing_ok=True)


@dataclass(frozen=True)
class Method:
    settings: type  # a dataclass, parsed by tasks.params.from_dict
    run: Callable[[nn.Module, Any, StepContext], nn.Module]
    finetunes: bool = False  # fine-tuned after the step (from the teacher if the recipe has one)
    needs_teacher: bool = False
    write_onnx: Callable[[nn.Module, Any, StepContext, Path], None] | None = None  # last step only: an ORT model
    reads_train: bool = False  # gets the train split's inputs (StepContext.train_inputs)


METHODS: dict[str, Method] = {
    "distill": Method(DistillSettings, distill, needs_teacher=True),
    "prune": Method(PruneSettings, prune, finetunes=True),
    "structured_prune": Method(StructuredPruneSettings, prune_structure, finetunes=True),
    "layer_prune": Method(LayerPruneSettings, prune_layers, finetunes=True),
    "transformer_prune": Method(TransformerPruneSettings, prune_transformer, finetunes=True),
    # fine-tuning after it would read the data's token ids, not the trimmed tokenizer's: only quantize may follow
    "trim_vocab": Method(TrimVocabSettings, trim_vocab, reads_train=True),
    "share": Method(ShareSettings, share, finetunes=True),
    "quantize": Method(QuantizeSettings, keep, write_onnx=write_quantized),
    "quantize_tuned": Method(QuantizeTunedSettings, keep, write_onnx=write_tuned),
    "qat": Method(QATSettings, qat, finetunes=True, write_onnx=write_static_int8),
}


@dataclass(frozen=True)
class Step:
    method: str
    options: Any  # the method's settings dataclass

    @property
    def settings(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self.options, name)) for name in self.options.__dataclass_fields__}

    def describe(self) -> str:
        return self.method + "".join(f" {k}={v}" for k, v in self.settings.items() if k not in ("model", "train"))


def parse_step(raw: Any, where: str) -> Step:
    if not isinstance(raw, dict) or "method" not in raw:
        raise ParamsError(f"{where}: a step is a mapping with a 'method', got {raw!r}")
    name = raw["method"]
    if name not in METHODS:
        raise ParamsError(f"{where}.method: unknown method {name!r}; use one of {sorted(METHODS)}")
    options = from_dict(METHODS[name].settings, {k: v for k, v in raw.items() if k != "method"}, where)
    return Step(name, options)


def refusal(step: Step, config: dict[str, Any]) -> str | None:
    """Why `step` cannot apply to the model of `config` although its code would run in a dry run (it would
    fail, or do harm, only once trained); None when it can."""
    static_int8 = step.method in ("qat", "quantize_tuned") or (step.method == "quantize"
                                                                and step.options.mode == "int8_static")
    if static_int8 and is_text_config(config):
        return NO_STATIC_INT8_FOR_TEXT
    if step.method == "structured_prune" and config["model"]["arch"] == "hf_bert":
        return ("it would narrow the attention's channels across heads, which BERT's fixed head size reads as "
                "fewer, mixed heads; use transformer_prune, which removes whole heads and MLP units")
    return None


def dry_run(steps: list[Step], model: nn.Module, config: dict[str, Any], input_shape: list[int], n_classes: int,
            where: str, memo: dict[str, Any] | None = None) -> None:
    """Apply `steps` to a copy of `model` (config: its model spec, training recipe, input shape and classes)
    without training, on a batch of two zero inputs, and export the final model to ONNX as the stage will
    (quantization then works on any exported graph); NotApplicable names the step and the reason when one
    cannot apply. Exporting is the slow part (seconds): it is skipped for the built-in architectures, which
    always export. `memo`, shared by the dry runs of one source model, keeps each chain prefix's result and
    the architectures (spec and tensor shapes) already exported, so each is computed once."""
    memo = {} if memo is None else memo
    trimmed = [i for i, s in enumerate(steps) if s.method == "trim_vocab"]
    after = [s for s in steps[trimmed[0] + 1:] if s.method != "quantize"] if trimmed else []
    if after:
        raise NotApplicable(f"{where}.steps[{trimmed[0]}]: trim_vocab can only be followed by quantize (fine-tuning "
                            f"reads the data's token ids, not the trimmed tokenizer's), not by {after[0].method}")
    example = example_input(dict(config, input_shape=list(input_shape)))
    for index, step in enumerate(steps):
        prefix = json.dumps(["steps", [dataclasses.asdict(s) for s in steps[:index + 1]]], sort_keys=True)
        if prefix in memo:
            model, config = memo[prefix]
            continue
        reason = refusal(step, config)
        if reason:
            raise NotApplicable(f"{where}.steps[{index}]: {step.describe()} cannot apply to architecture "
                                f"{config['model'].get('arch')!r}: {reason}")
        context = StepContext(copy.deepcopy(config), list(input_shape), n_classes)
        try:
            model = METHODS[step.method].run(copy.deepcopy(model), step.options, context).eval()
            with torch.no_grad():
                shape = list(model(example).shape)
            if shape != [2, n_classes]:
                raise ValueError(f"the output has shape {shape}, not [2, {n_classes}]")
            architecture = json.dumps(["export", context.config["model"], context.config.get(ATTENTION_HEADS),
                                       {k: list(t.shape) for k, t in model.state_dict().items()}])
            if index == len(steps) - 1 and context.config["model"]["arch"] not in BUILT_IN \
                    and architecture not in memo:
                with tempfile.TemporaryDirectory() as scratch:
                    export_onnx(model, Path(scratch) / "dry-run.onnx", context.config)
                memo[architecture] = True
        except Exception as e:  # noqa: BLE001 -- a user's architecture may fail in any way: that is the finding
            raise NotApplicable(f"{where}.steps[{index}]: {step.describe()} cannot apply to architecture "
                                f"{config['model'].get('arch')!r}: {type(e).__name__}: {e}") from None
        config = context.config
        memo[prefix] = (model, config)
