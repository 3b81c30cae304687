"""The training loop shared by the teacher, the scratch student and the distilled student.

One recipe (optimizer, schedule, batch size, augmentation, epochs, seed) trains all
three, so the scratch student is a fair baseline for distillation. Training is
deterministic: same params, data and device give byte-identical weights. A checkpoint is
written after every epoch and a rerun with the same fingerprint resumes from it.

Devices: `train.device` (auto: CUDA when present, else the CPU). The model and each batch
move to the device; the data and the random generators that shuffle and augment stay on the
CPU, so the order of samples is the same on every device.

Data parallel: under torchrun (`train.distributed`, see `run_training_stage`) every process
computes the same batches from the same seeded generators and takes its rank's share of each
(rank r: samples r, r + N, ...), so the N processes together take exactly the configured
batch; DDP averages their gradients, each weighted by its share, to the full batch's gradient.
Rank 0 writes checkpoints and outputs; a resumed checkpoint is read by rank 0 and sent to all.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tasks.io import atomic_path, file_sha256, read_json, read_split, write_json
from tasks.text import encode, lengths, load_tokenizer, pad_id, sha256_text, trim_padding
from safetensors.torch import load_file

from tasks.models import BERT_LIMITS, build_model, count_parameters, load_model, save_model
from tasks.params import (PARAMS_FILE, DistillParams, DistributedParams, ModelParams, ParamsError, TrainParams,
                           as_dict)

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class Split:
    X: torch.Tensor
    y: torch.Tensor  # class indices 0..n_classes-1
    pad_id: int | None = None  # text: the padding token id; batches are cut to their longest text


@dataclass
class Trained:
    model: nn.Module
    config: dict[str, Any]
    history: list[dict[str, float]]


@dataclass(frozen=True)
class Replica:
    """This process's place in data-parallel training: `rank` of `world_size` (1: a single process)."""

    rank: int = 0
    world_size: int = 1


def current_replica() -> Replica:
    if dist.is_available() and dist.is_initialized():
        return Replica(dist.get_rank(), dist.get_world_size())
    return Replica()


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else the CPU. Under torchrun each process takes the GPU of its LOCAL_RANK.

    `cuda` without CUDA is refused when the params are read (tasks/params.py); checked again
    here because a params object may have been built on another machine.
    """
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ParamsError(f"device: 'cuda' requested, but torch {torch.__version__} sees no CUDA device")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def make_deterministic(device: torch.device) -> None:
    """Torch's deterministic algorithms; on CUDA also cuDNN's and a fixed cuBLAS workspace."""
    if device.type == "cuda":
        # Read when cuBLAS starts; without it deterministic mode refuses cuBLAS matmuls.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def device_record(device: torch.device, replica: Replica) -> dict[str, Any]:
    """What trained a model, for its config: the device, torch, and how many processes shared the batches."""
    record = {"device": device.type, "torch": torch.__version__, "processes": replica.world_size}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def split_sha256(prepared_dir: Path, split: str) -> str:
    """Hash of one prepared split: its X and y files, names and contents."""
    digest = hashlib.sha256()
    for name in (f"X_{split}.npy", f"y_{split}.npy"):
        digest.update(name.encode())
        digest.update(file_sha256(Path(prepared_dir) / name).encode())
    return digest.hexdigest()


def load_split(prepared_dir: Path, split: str, classes: list[int]) -> Split:
    """The split with each label replaced by its position in `classes`, in the declared order (sorted or not)."""
    X, y = read_split(prepared_dir, split)
    order = np.argsort(classes)
    sorted_classes = np.asarray(classes)[order]
    found = np.minimum(np.searchsorted(sorted_classes, y), len(classes) - 1)
    unknown = sorted_classes[found] != y
    if unknown.any():
        raise ValueError(f"{prepared_dir}/y_{split}.npy: label(s) {np.unique(y[unknown])[:10].tolist()} "
                         f"not in the declared classes {list(classes)}")
    schema = Path(prepared_dir) / "schema.json"  # text: its padding id (a split without a schema is not text)
    return Split(torch.from_numpy(X), torch.from_numpy(order[found]),
                 read_json(schema).get("pad_id") if schema.is_file() else None)


def model_split(prepared_dir: Path, split: str, classes: list, config: dict[str, Any]) -> Split:
    """The split as the model of `config` reads it: text in the model's own tokenizer when that is not the
    data's (trim_vocab gives a model a smaller one), from the split's raw texts."""
    data = load_split(prepared_dir, split, classes)
    schema = read_json(Path(prepared_dir) / "schema.json")
    tokenizer_json = config.get("tokenizer", "")
    if data.pad_id is None or sha256_text(tokenizer_json) == schema["tokenizer_sha256"]:
        return data
    texts = np.load(Path(prepared_dir) / f"text_{split}.npy", allow_pickle=False).tolist()
    pad = pad_id(tokenizer_json)
    X = encode(load_tokenizer(tokenizer_json, schema["max_length"], "the model's tokenizer"), texts,
               schema["max_length"], pad)
    return Split(torch.from_numpy(X), data.y, pad)


def shift_images(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random whole-pixel offset in [-max_shift, max_shift], zero-filled."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for dy, dx in offsets.unique(dim=0).tolist():
        rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1)
        out[rows] = padded[rows, :, dy : dy + h, dx : dx + w]
    return out


def learning_rate(recipe: TrainParams, step: int, total_steps: int) -> float:
    """The rate at `step`: a linear warm-up over the first `warmup` of the steps, then the schedule."""
    warmup_steps = math.ceil(recipe.warmup * total_steps)  # whole steps: the last warm-up step reaches lr, no more
    if step < warmup_steps:
        return recipe.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if recipe.schedule == "constant":
        return recipe.lr
    if recipe.schedule == "linear":
        return recipe.lr * (1 - progress)
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, recipe: TrainParams) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        # BERT's recipe: no decay on biases and normalisation weights (the 1-d parameters)
        matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        vectors = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        return torch.optim.AdamW([{"params": matrices, "weight_decay": recipe.weight_decay},
                                  {"params": vectors, "weight_decay": 0.0}], lr=recipe.lr)
    return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)


# (weight of the sample, index of its partner within the batch) or no mixup; the losses take
# the partners' labels instead of their indices: (weight, partner labels)
Mix = tuple[float, torch.Tensor] | None


def mixup_pairs(n: int, concentration: float, generator: torch.Generator) -> Mix:
    """Draw a mixing weight from Beta(c, c) and a partner index for every sample; None when mixup is off."""
    if concentration == 0:
        return None
    weight = torch.distributions.Beta(concentration, concentration).sample()  # global RNG: checkpointed
    return float(weight), torch.randperm(n, generator=generator)


def balanced_class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per class index, n / (classes present x count): each class's samples weigh as much in total as any
    other's, and the weights average 1 over the samples. A class without samples gets 0 (never read)."""
    counts = torch.bincount(labels).float()
    present = counts > 0
    return torch.where(present, len(labels) / (present.sum() * counts.clamp(min=1)), 0.0)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           class_weights: torch.Tensor | None) -> torch.Tensor:
    """The mean over samples of each one's cross-entropy times its class's weight (not PyTorch's weighted
    mean, which divides by the batch's weights: a batch's loss keeps its scale whatever classes it holds)."""
    if class_weights is None:
        return F.cross_entropy(logits, labels)
    return (F.cross_entropy(logits, labels, reduction="none") * class_weights[labels]).mean()


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, mix: Mix = None,
                    class_weights: torch.Tensor | None = None) -> torch.Tensor:
    if mix is None:
        return weighted_cross_entropy(logits, labels, class_weights)
    weight, partner_labels = mix
    return (weight * weighted_cross_entropy(logits, labels, class_weights)
            + (1 - weight) * weighted_cross_entropy(logits, partner_labels, class_weights))


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      params: DistillParams, mix: Mix = None,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al. 2015: soft-target KL at temperature T (scaled by T^2) mixed with hard-label CE (which
    alone takes the class weights: the teacher's soft targets are its own)."""
    t = params.temperature
    soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t
    return params.alpha * soft + (1 - params.alpha) * hard_label_loss(logits, labels, mix, class_weights)


class HiddenMatch(nn.Module):
    """TinyBERT's intermediate-layer loss (Jiao et al. 2020): student encoder layer i of S against teacher
    layer (i + 1)·T/S − 1, the same relative depth (a DistilBERT-style student of every other layer meets
    the layers after the ones it kept), as the MSE over non-padding tokens, through a learned projection
    when the widths differ. Only the student's file is kept: the projection exists for training alone."""

    def __init__(self, student: nn.Module, teacher: nn.Module, seed: int) -> None:
        super().__init__()
        (student_layers, student_width), (teacher_layers, teacher_width) = (
            encoder_shape(student, "student", "hidden_weight"), encoder_shape(teacher, "teacher", "hidden_weight"))
        # hidden states start with the embeddings' output: layer i's output is state i + 1
        self.pairs = [(i + 1, (i + 1) * teacher_layers // student_layers) for i in range(student_layers)]
        self.projection: nn.Module = nn.Identity()
        if student_width != teacher_width:
            self.projection = nn.Linear(student_width, teacher_width, bias=False)
            nn.init.normal_(self.projection.weight, std=student_width ** -0.5,
                            generator=torch.Generator().manual_seed(seed))

    def forward(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                tokens: torch.Tensor) -> torch.Tensor:
        weight = tokens.unsqueeze(-1).to(student[0].dtype) / (tokens.sum() * teacher[0].shape[-1])
        return torch.stack([((self.projection(student[i]) - teacher[j]) ** 2 * weight).sum()
                            for i, j in self.pairs]).mean()


class AttentionRelations:
    """MiniLMv2's self-attention relation loss (Wang et al. 2021): in the last encoder layer of each model,
    the query, key and value vectors are split into the same number of relation heads (the student's
    attention heads), and the softmax of each head's scaled dot products of every token with every other
    is the relation. The loss is the KL divergence from the teacher's relations to the student's, averaged
    over heads and non-padding tokens and summed over the three. Widths and head counts may differ."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        for model, role in ((student, "student"), (teacher, "teacher")):
            encoder_shape(model, role, "attention_weight")  # a clear error for a model without a BERT encoder
        self.heads = student.bert.encoder.layer[-1].attention.self.num_attention_heads
        width = teacher.bert.encoder.layer[-1].attention.self.query.out_features
        if width % self.heads:
            raise ValueError(f"distill.attention_weight: the teacher's last layer has {width} attention units, "
                             f"which the student's {self.heads} heads do not divide into relation heads")

    def relations(self, model: nn.Module, states: tuple[torch.Tensor, ...],
                  tokens: torch.Tensor) -> list[torch.Tensor]:
        """Log-probabilities [batch, heads, token, token] of the last layer's query, key and value relations."""
        attention, x = model.bert.encoder.layer[-1].attention.self, states[-2]  # the last layer's input
        batch, length, _ = x.shape
        padding = ~tokens[:, None, None, :]
        relations = []
        for projection in (attention.query, attention.key, attention.value):
            vectors = projection(x).view(batch, length, self.heads, -1).transpose(1, 2)
            scores = vectors @ vectors.transpose(-1, -2) / math.sqrt(vectors.shape[-1])
            relations.append(torch.log_softmax(scores.masked_fill(padding, torch.finfo(scores.dtype).min), -1))
        return relations

    def loss(self, student: nn.Module, teacher: nn.Module, student_states: tuple[torch.Tensor, ...],
             teacher_states: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            targets = self.relations(teacher, teacher_states, tokens)
        weight = tokens[:, None, :].to(teacher_states[0].dtype) / (tokens.sum() * self.heads)
        return sum((F.kl_div(ours, theirs, reduction="none", log_target=True).sum(-1) * weight).sum()
                   for ours, theirs in zip(self.relations(student, student_states, tokens), targets))


def encoder_shape(model: nn.Module, role: str, setting: str) -> tuple[int, int]:
    """(encoder layers, hidden width) of a Hugging Face BERT-family model."""
    encoder = getattr(getattr(model, "bert", None), "encoder", None)
    if encoder is None:
        raise ValueError(f"distill.{setting}: the {role} ({type(model).__name__}) has no BERT encoder whose "
                         f"layers could be matched; layer and attention distillation need hf_bert models")
    return len(encoder.layer), model.config.hidden_size


@torch.no_grad()
def predict_logits(model: nn.Module, X: torch.Tensor, batch_size: int = 1024,
                   device: torch.device | None = None, pad_id: int | None = None) -> torch.Tensor:
    """Logits on the CPU; batches go to `device` (where the model is) when given. Text (`pad_id`): each
    batch cut to its longest text, which gives the same logits sooner."""
    model.eval()
    batches = (X[i : i + batch_size] for i in range(0, len(X), batch_size))
    if pad_id is not None:
        batches = (trim_padding(x, pad_id) for x in batches)
    if device is None:
        return torch.cat([model(x) for x in batches])
    return torch.cat([model(x.to(device)).cpu() for x in batches])


BUCKET_CHUNK = 50  # batches whose samples are sorted by length together


def text_lengths(X: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.from_numpy(lengths(X.numpy(), pad))


def bucketed(order: torch.Tensor, lengths: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """`order` regrouped so each batch holds texts of similar length: chunks of BUCKET_CHUNK batches are
    sorted by length, cut into batches, and the batches shuffled. Still a random order (the last, short
    batch stays last, as without bucketing)."""
    chunk = batch_size * BUCKET_CHUNK
    parts = [order[i:i + chunk] for i in range(0, len(order), chunk)]
    batches = [b for part in parts
               for b in part[torch.sort(lengths[part], stable=True).indices].split(batch_size)]
    full, last = (batches[:-1], batches[-1:]) if len(batches[-1]) < batch_size else (batches, [])
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator)]
    return torch.cat(shuffled + last)


def load_checkpoint(path: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The last epoch's state if it belongs to this exact run (same params, data, teacher, device)."""
    if path is None or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if state.get("fingerprint") == fingerprint else None


def shared_checkpoint(path: Path | None, fingerprint: str, replica: Replica) -> dict[str, Any] | None:
    """Rank 0 reads the checkpoint and sends it to every process, so all resume alike (other nodes need no copy)."""
    state = load_checkpoint(path, fingerprint) if replica.rank == 0 else None
    if replica.world_size > 1:
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    return state


def replica_seed(seed: int, rank: int, step: int) -> int:
    """Seed of rank `rank`'s dropout at `step`: each process draws its own masks, reproducibly."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()[:8], "little")


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    recipe: TrainParams,
    *,
    fingerprint: str,
    checkpoint: Path | None = None,
    teacher: nn.Module | None = None,
    distill: DistillParams | None = None,
    on_epoch_end: EpochCallback | None = None,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train `model` in place on `recipe.device` (it ends on the CPU); returns per-epoch curves.

    Resumes from `checkpoint` if it matches. Under torchrun every process calls this; rank 0 writes
    the checkpoint.
    """
    torch.set_num_threads(recipe.threads)
    device = resolve_device(recipe.device)
    make_deterministic(device)
    replica = current_replica()
    model.to(device)
    batch_size = min(recipe.batch_size, len(train.X))
    steps_per_epoch = math.ceil(len(train.X) / batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    match, relations = None, None
    if teacher is not None and distill is not None:
        if distill.hidden_weight:
            match = HiddenMatch(model, teacher, recipe.seed).to(device)
        if distill.attention_weight:
            relations = AttentionRelations(model, teacher)
    inside = match is not None or relations is not None  # the teacher's layers, not only its logits
    class_weights = balanced_class_weights(train.y).to(device) if recipe.class_weight == "balanced" else None
    learned = nn.ModuleList([model, match]) if match is not None else model  # the projection learns too
    optimizer = make_optimizer(learned, recipe)
    data_rng = torch.Generator().manual_seed(recipe.seed)  # on the CPU: the same order on every device
    history: list[dict[str, float]] = []
    start_epoch = 0
    resumed = shared_checkpoint(checkpoint, fingerprint, replica)
    if resumed:
        model.load_state_dict(resumed["model"])
        if match is not None:
            match.load_state_dict(resumed["hidden_match"])
        optimizer.load_state_dict(resumed["optimizer"])
        torch.set_rng_state(resumed["torch_rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(resumed["cuda_rng"], device)
        data_rng.set_state(resumed["data_rng"])
        history, start_epoch = resumed["history"], resumed["epoch"]
        tqdm.write(f"{desc}: resuming from checkpoint {checkpoint} after epoch {start_epoch}")
    cached_teacher_logits = None
    if teacher is not None:
        teacher.to(device).eval()
        if distill is not None and not inside and not (recipe.augment_shift or recipe.mixup):
            # the teacher sees fixed inputs: its logits once, not at every step
            cached_teacher_logits = predict_logits(teacher, train.X, device=device, pad_id=train.pad_id)
    # DDP all-reduces (averages) the gradients of the processes in backward()
    forward = model if replica.world_size == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    shard = slice(replica.rank, None, replica.world_size)  # this process's share of every batch

    bar = tqdm(range(start_epoch, recipe.epochs), desc=desc, unit="epoch", initial=start_epoch, total=recipe.epochs,
               disable=replica.rank != 0)
    text_length = text_lengths(train.X, train.pad_id) if recipe.bucket and train.pad_id is not None else None
    for epoch in bar:
        model.train()
        order = torch.randperm(len(train.X), generator=data_rng)
        if text_length is not None:
            order = bucketed(order, text_length, batch_size, data_rng)
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            # Every process draws the whole batch's augmentation and mixup, so the generators stay
            # in step and the batch is the one a single process would train on.
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = train.X[idx]
            if x.dim() == 4:
                x = shift_images(x, recipe.augment_shift, data_rng)
            if train.pad_id is not None:
                x = trim_padding(x, train.pad_id)
            y = train.y[idx]
            mix = mixup_pairs(len(idx), recipe.mixup, data_rng)
            if mix is not None:
                weight, partner = mix
                x = weight * x + (1 - weight) * x[partner]
                mix = (weight, y[partner][shard].to(device))
            x, y = x[shard].to(device), y[shard].to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, step, total_steps)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                       enabled=replica.world_size > 1):
                if replica.world_size > 1:
                    torch.manual_seed(replica_seed(recipe.seed, replica.rank, step))
                if inside:
                    logits, student_states = forward(x, hidden=True)
                else:
                    logits = forward(x)
            if inside:
                with torch.no_grad():
                    teacher_logits, teacher_states = teacher(x, hidden=True)
                tokens = x != train.pad_id
                loss = distillation_loss(logits, teacher_logits, y, distill, mix, class_weights)
                if match is not None:
                    loss = loss + distill.hidden_weight * match(student_states, teacher_states, tokens)
                if relations is not None:
                    loss = loss + distill.attention_weight * relations.loss(model, teacher, student_states,
                                                                            teacher_states, tokens)
            elif teacher is not None and distill is not None:
                if cached_teacher_logits is not None:
                    teacher_logits = cached_teacher_logits[idx][shard].to(device)
                else:
                    with torch.no_grad():
                        teacher_logits = teacher(x)  # the teacher sees the same augmented batch
                loss = distillation_loss(logits, teacher_logits, y, distill, mix, class_weights)
            else:
                loss = hard_label_loss(logits, y, mix, class_weights)
            optimizer.zero_grad(set_to_none=True)
            if replica.world_size > 1:
                # DDP averages over processes; weighting by the share makes that the mean over the batch,
                # also for a last batch that does not divide evenly
                (loss * (replica.world_size * len(y) / len(idx))).backward()
            else:
                loss.backward()
            if match is not None and replica.world_size > 1:
                for weight in match.parameters():  # outside DDP's model: averaged here as DDP averages
                    dist.all_reduce(weight.grad)
                    weight.grad /= replica.world_size
            if recipe.clip_norm:
                nn.utils.clip_grad_norm_(learned.parameters(), recipe.clip_norm)
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
        if replica.world_size > 1:
            totals = torch.tensor([loss_sum, correct], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            loss_sum, correct = float(totals[0]), int(totals[1])
        val_logits = predict_logits(model, val.X, device=device, pad_id=val.pad_id)
        row = {
            "epoch": epoch + 1,
            "lr": learning_rate(recipe, (epoch + 1) * steps_per_epoch, total_steps),
            "train_loss": loss_sum / len(train.X),
            "train_accuracy": correct / len(train.X),
            "val_loss": float(F.cross_entropy(val_logits, val.y)),
            "val_accuracy": float((val_logits.argmax(1) == val.y).float().mean()),
        }
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_acc=f"{row['val_accuracy']:.4f}")
        if checkpoint is not None and replica.rank == 0:
            state = {"fingerprint": fingerprint, "epoch": epoch + 1, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                     "data_rng": data_rng.get_state(), "history": history}
            if match is not None:
                state["hidden_match"] = match.state_dict()
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
    model.to("cpu")
    if teacher is not None:
        teacher.to("cpu")
    return history


PRETRAINED_DIR = Path("models/pretrained")  # stage `pretrained`'s output
# What the package's file has that the classifier does not: a buffer older transformers saved
PRETRAINED_EXTRA_KEYS = {"bert.embeddings.position_ids"}
# Heads a checkpoint may carry and the classifier replaces: BERT's pretraining heads, an earlier task's classifier
PRETRAINED_HEADS = ("cls.", "classifier.")


def pretrained_start(spec: dict[str, Any], pretrained_dir: Path) -> tuple[dict[str, Any], dict | None, dict]:
    """`model: {arch: hf_bert, pretrained: true}` starts from the pretrained model of stage `pretrained`:
    the spec becomes its architecture values (from its config.json; only dropouts may be overridden), and
    its weights and their hashes are returned too. Any other spec: unchanged, no weights."""
    if not spec.get("pretrained"):
        return spec, None, {}
    manifest = read_json(pretrained_dir / "manifest.json")
    if manifest.get("source") is None:
        raise ParamsError("model.pretrained: no pretrained model is configured (params.yaml:pretrained)")
    expanded = pretrained_spec(spec, read_json(pretrained_dir / "config.json"))
    weights = pretrained_dir / "model.safetensors"
    # a bare BertModel's keys (sentence-transformers) lack the classifier's "bert." prefix
    state = {key if key.startswith("bert.") else f"bert.{key}": tensor for key, tensor in load_file(weights).items()
             if not key.startswith(PRETRAINED_HEADS)}
    hashes = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    return expanded, state, {"pretrained": hashes}


def pretrained_spec(spec: dict[str, Any], hf_config: dict[str, Any]) -> dict[str, Any]:
    """The spec of `{arch: hf_bert, pretrained: true}` with the pretrained model's architecture values from
    its Hugging Face config.json: only the known BERT fields (BERT_LIMITS), and only the dropouts overridden."""
    if spec.get("arch") != "hf_bert":
        raise ParamsError(f"model.pretrained: only for arch hf_bert, got arch {spec.get('arch')!r}")
    overrides = {k: v for k, v in spec.items() if k not in ("arch", "pretrained")}
    fixed = sorted(set(overrides) - {"hidden_dropout_prob", "attention_probs_dropout_prob"})
    if fixed:
        raise ParamsError(f"model: {fixed} are fixed by the pretrained model; only the dropouts may be set")
    values = {k: hf_config[k] for k in (*BERT_LIMITS, "hidden_act") if k in hf_config}
    return {"arch": "hf_bert", **values, **overrides}


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], origin: Path) -> None:
    """The pretrained weights into every layer but the new classifier, strictly otherwise."""
    state = {k: v for k, v in state.items() if k not in PRETRAINED_EXTRA_KEYS}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{origin}: its weights do not fit its config.json ({e})") from None
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(f"{origin}: weights missing {missing[:5]}, unexpected {unexpected[:5]}")


def check_text_model(model: nn.Module, schema: dict[str, Any]) -> None:
    """A Hugging Face text model must embed every id of the data's tokenizer and mask its padding id."""
    config = getattr(model, "config", None)
    if config is None:
        return
    if config.vocab_size < schema["vocab_size"] or config.pad_token_id != schema["pad_id"]:
        raise ParamsError(f"model: vocab_size {config.vocab_size} and pad_token_id {config.pad_token_id}; the "
                          f"data's tokenizer has {schema['vocab_size']} tokens and pads with id {schema['pad_id']}")


def train_model(
    prepared_dir: Path,
    params: ModelParams,
    *,
    role: str,
    checkpoint: Path | None = None,
    teacher_path: Path | None = None,
    distill: DistillParams | None = None,
    on_epoch_end: EpochCallback | None = None,
    pretrained_dir: Path = PRETRAINED_DIR,
) -> Trained:
    """Build the model named in `params`, fit it on the prepared data, return it with its full config."""
    schema = read_json(Path(prepared_dir) / "schema.json")
    classes = schema["classes"]
    train, val = (load_split(prepared_dir, s, classes) for s in ("train", "validation"))
    if params.train.augment_shift and train.X.dim() != 4:
        raise ValueError(f"train.augment_shift: shifting needs image input, data has shape {schema['input_shape']}")
    if params.train.mixup and train.pad_id is not None:
        raise ParamsError("train.mixup: mixes inputs, which token ids cannot be; set it to 0 for text")
    spec, pretrained_state, pretrained_lineage = pretrained_start(params.model, pretrained_dir)
    teacher = None
    # inputs and labels: relabelled data is other data (and must not resume this run's checkpoint)
    lineage: dict[str, Any] = {
        "data_sha256": {s: split_sha256(prepared_dir, s) for s in ("train", "validation", "test")},
        **pretrained_lineage}
    if teacher_path is not None:
        teacher, _ = load_model(teacher_path)
        lineage["teacher_sha256"] = file_sha256(teacher_path)
    config = {
        "role": role,
        "model": spec,
        "train": as_dict(params.train),
        "distill": as_dict(distill) if distill else None,
        "input_shape": schema["input_shape"],
        "classes": classes,
        "lineage": lineage,
        # part of the fingerprint too: a checkpoint resumes only on the device and process count that wrote it
        "trained_on": device_record(resolve_device(params.train.device), current_replica()),
    }
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    if schema.get("modality") == "text":  # the file alone turns raw text into its input
        config.update(modality="text", tokenizer=(Path(prepared_dir) / "tokenizer.json").read_text())
    torch.manual_seed(params.train.seed)
    model = build_model(spec, schema["input_shape"], len(classes))
    if pretrained_state is not None:
        load_pretrained(model, pretrained_state, pretrained_dir / "model.safetensors")
    if schema.get("modality") == "text":
        check_text_model(model, schema)
    config["parameters"] = count_parameters(model)
    history = fit(model, train, val, params.train, fingerprint=fingerprint, checkpoint=checkpoint,
                  teacher=teacher, distill=distill, on_epoch_end=on_epoch_end, desc=role)
    return Trained(model.eval(), config, history)


def make_finetune(prepared_dir: Path, recipe: TrainParams, desc: str = "finetune", *,
                  teacher_path: Path | None = None, distill: DistillParams | None = None) -> Callable[[nn.Module], None]:
    """Fine-tuning for compression steps: the fit loop with `recipe` on the prepared train split,
    from the labels or, given a teacher, by distillation."""
    classes = read_json(Path(prepared_dir) / "schema.json")["classes"]
    train, val = (load_split(prepared_dir, s, classes) for s in ("train", "validation"))
    teacher = load_model(teacher_path)[0] if teacher_path is not None else None

    def finetune(model: nn.Module) -> None:
        torch.manual_seed(recipe.seed)  # dropout and mixup draw from the global RNG: seed it, as train_model does
        fit(model, train, val, recipe, fingerprint=desc, desc=desc, teacher=teacher, distill=distill)

    return finetune


def write_outputs(trained: Trained, model_path: Path, curves_path: Path, metrics_path: Path) -> None:
    with atomic_path(curves_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(trained.history[0]))
        writer.writeheader()
        writer.writerows(trained.history)
    final = trained.history[-1]
    write_json(metrics_path, {"parameters": trained.config["parameters"], "epochs": final["epoch"],
                              "train_accuracy": final["train_accuracy"], "val_accuracy": final["val_accuracy"]})
    save_model(trained.model, model_path, trained.config)  # last: the model marks the stage done


def stage_arguments(argv: list[str] | None, *, with_teacher: bool, description: str) -> argparse.Namespace:
    """The command line every training stage shares (paths come from dvc.yaml)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("validation_result", type=Path)
    if with_teacher:
        parser.add_argument("teacher", type=Path)
    parser.add_argument("model_out", type=Path)
    parser.add_argument("curves_out", type=Path)
    parser.add_argument("metrics_out", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: params.yaml)")
    return parser.parse_args(argv)


def finish(trained: Trained, args: argparse.Namespace) -> None:
    write_outputs(trained, args.model_out, args.curves_out, args.metrics_out)
    if args.checkpoint is not None:
        args.checkpoint.unlink(missing_ok=True)  # only needed to resume an interrupted run
    final = trained.history[-1]
    print(f"{trained.config['role']}: {trained.config['parameters']:,} parameters, "
          f"val accuracy {final['val_accuracy']:.4f} -> {args.model_out}")


def in_torchrun_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun for every process it starts


def torchrun_command(module: str, argv: list[str], distributed: DistributedParams) -> list[str]:
    """`python -m <module> <argv>` under torchrun, which starts `nproc` copies on this node.

    The c10d rendezvous assigns node ranks itself, so every node runs the same command.
    """
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={distributed.nproc}",
            f"--nnodes={distributed.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={distributed.rdzv_endpoint}",
            f"--rdzv-id={distributed.rdzv_id}", "-m", module, *argv]


@contextmanager
def process_group(device_name: str) -> Iterator[Replica]:
    """In a torchrun worker: this process joins the group (NCCL on CUDA, gloo on the CPU) while it trains."""
    if not in_torchrun_worker():
        yield Replica()
        return
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise ParamsError(f"distributed.nproc: process {device.index} of this node has no GPU of its own "
                              f"(this node has {torch.cuda.device_count()})")
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield current_replica()
    finally:
        dist.destroy_process_group()


def wait_for_launcher(launcher: subprocess.Popen) -> int:
    """Its exit code. Stopping this process (SIGTERM, Ctrl-C) stops torchrun, which stops its workers:
    they run in sessions of their own and would otherwise train on."""
    previous = signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    try:
        return launcher.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if launcher.poll() is None:
            launcher.terminate()
            launcher.wait()


def run_training_stage(module: str, argv: list[str] | None, args: argparse.Namespace, recipe: TrainParams,
                       train: Callable[[], Trained]) -> None:
    """A training stage after its checks: `train()`, then rank 0 writes the outputs.

    When `recipe.distributed` asks for more than one process, the stage re-runs itself with the same
    arguments under torchrun and waits: the stage command in dvc.yaml stays the same.
    """
    if recipe.distributed.world_size > 1 and not in_torchrun_worker():
        command = torchrun_command(module, sys.argv[1:] if argv is None else argv, recipe.distributed)
        # torchrun would otherwise set 1 thread per process, and say so
        env = dict(os.environ, OMP_NUM_THREADS=str(recipe.threads))
        returncode = wait_for_launcher(subprocess.Popen(command, env=env))
        if returncode != 0:
            raise SystemExit(returncode)
        return
    with process_group(recipe.device) as replica:
        trained = train()
        if replica.rank == 0:
            finish(trained, args)
