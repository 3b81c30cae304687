"""The training loop shared by the teacher, the scratch student and the distilled student.

One recipe (optimizer, schedule, batch size, augmentation, epochs, seed) trains all
three, so the scratch student is a fair baseline for distillation. Training is
deterministic: same params and data give byte-identical weights. A checkpoint is
written after every epoch and a rerun with the same fingerprint resumes from it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tasks.io import atomic_path, file_sha256, read_json, read_split, write_json
from tasks.models import build_model, count_parameters, load_model, save_model
from tasks.params import PARAMS_FILE, DistillParams, ModelParams, TrainParams, as_dict

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class Split:
    X: torch.Tensor
    y: torch.Tensor  # class indices 0..n_classes-1


@dataclass
class Trained:
    model: nn.Module
    config: dict[str, Any]
    history: list[dict[str, float]]


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
    return Split(torch.from_numpy(X), torch.from_numpy(order[found]))


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
    if recipe.schedule == "constant":
        return recipe.lr
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * step / total_steps))


def make_optimizer(model: nn.Module, recipe: TrainParams) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)


Mix = tuple[float, torch.Tensor] | None  # (weight of the sample, index of its partner) or no mixup


def mixup_pairs(n: int, concentration: float, generator: torch.Generator) -> Mix:
    """Draw a mixing weight from Beta(c, c) and a partner for every sample; None when mixup is off."""
    if concentration == 0:
        return None
    weight = torch.distributions.Beta(concentration, concentration).sample()  # global RNG: checkpointed
    return float(weight), torch.randperm(n, generator=generator)


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, mix: Mix = None) -> torch.Tensor:
    if mix is None:
        return F.cross_entropy(logits, labels)
    weight, partner = mix
    return weight * F.cross_entropy(logits, labels) + (1 - weight) * F.cross_entropy(logits, labels[partner])


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      params: DistillParams, mix: Mix = None) -> torch.Tensor:
    """Hinton et al. 2015: soft-target KL at temperature T (scaled by T^2) mixed with hard-label CE."""
    t = params.temperature
    soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t
    return params.alpha * soft + (1 - params.alpha) * hard_label_loss(logits, labels, mix)


@torch.no_grad()
def predict_logits(model: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(X[i : i + batch_size]) for i in range(0, len(X), batch_size)])


def load_checkpoint(path: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The last epoch's state if it belongs to this exact run (same params, data, teacher)."""
    if path is None or not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    return state if state.get("fingerprint") == fingerprint else None


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
    """Train `model` in place; returns per-epoch curves. Resumes from `checkpoint` if it matches."""
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    batch_size = min(recipe.batch_size, len(train.X))
    steps_per_epoch = math.ceil(len(train.X) / batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    optimizer = make_optimizer(model, recipe)
    data_rng = torch.Generator().manual_seed(recipe.seed)
    history: list[dict[str, float]] = []
    start_epoch = 0
    resumed = load_checkpoint(checkpoint, fingerprint)
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        torch.set_rng_state(resumed["torch_rng"])
        data_rng.set_state(resumed["data_rng"])
        history, start_epoch = resumed["history"], resumed["epoch"]
        tqdm.write(f"{desc}: resuming from checkpoint {checkpoint} after epoch {start_epoch}")
    if teacher is not None:
        teacher.eval()

    bar = tqdm(range(start_epoch, recipe.epochs), desc=desc, unit="epoch", initial=start_epoch, total=recipe.epochs)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(train.X), generator=data_rng)
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = train.X[idx]
            if x.dim() == 4:
                x = shift_images(x, recipe.augment_shift, data_rng)
            y = train.y[idx]
            mix = mixup_pairs(len(idx), recipe.mixup, data_rng)
            if mix is not None:
                weight, partner = mix
                x = weight * x + (1 - weight) * x[partner]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, epoch * steps_per_epoch + i, total_steps)
            logits = model(x)
            if teacher is not None and distill is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)  # the teacher sees the same augmented batch
                loss = distillation_loss(logits, teacher_logits, y, distill, mix)
            else:
                loss = hard_label_loss(logits, y, mix)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        val_logits = predict_logits(model, val.X)
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
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                torch.save({"fingerprint": fingerprint, "epoch": epoch + 1, "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                            "data_rng": data_rng.get_state(), "history": history}, tmp)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
    return history


def train_model(
    prepared_dir: Path,
    params: ModelParams,
    *,
    role: str,
    checkpoint: Path | None = None,
    teacher_path: Path | None = None,
    distill: DistillParams | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Trained:
    """Build the model named in `params`, fit it on the prepared data, return it with its full config."""
    schema = read_json(Path(prepared_dir) / "schema.json")
    classes = schema["classes"]
    train, val = (load_split(prepared_dir, s, classes) for s in ("train", "validation"))
    if params.train.augment_shift and train.X.dim() != 4:
        raise ValueError(f"train.augment_shift: shifting needs image input, data has shape {schema['input_shape']}")
    teacher = None
    lineage: dict[str, Any] = {"data_sha256": {s: file_sha256(Path(prepared_dir) / f"X_{s}.npy")
                                               for s in ("train", "validation", "test")}}
    if teacher_path is not None:
        teacher, _ = load_model(teacher_path)
        lineage["teacher_sha256"] = file_sha256(teacher_path)
    config = {
        "role": role,
        "model": params.model,
        "train": as_dict(params.train),
        "distill": as_dict(distill) if distill else None,
        "input_shape": schema["input_shape"],
        "classes": classes,
        "lineage": lineage,
    }
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    torch.manual_seed(params.train.seed)
    model = build_model(params.model, schema["input_shape"], len(classes))
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
