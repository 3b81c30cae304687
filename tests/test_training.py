"""Training: it learns, it is deterministic, it resumes after a crash, weights load safely."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tasks.distill import distill
from tasks.io import file_sha256
from tasks.models import build_model, configured_architectures, load_model, read_config, save_model
from tasks.params import DistillParams, EvaluateParams, ModelParams, ParamsError, TrainParams, from_dict
from tasks.train_student import train_student
from tasks.train_teacher import train_teacher
from tasks.training import (Split, balanced_class_weights, distillation_loss, fit, hard_label_loss, load_split,
                            predict_logits, resolve_device, shift_images)
from tests.conftest import distill_params, model_params


def test_accuracy(model: nn.Module, prepared_dir) -> float:
    test = load_split(prepared_dir, "test", list(range(10)))
    return float((predict_logits(model, test.X).argmax(1) == test.y).float().mean())


test_accuracy.__test__ = False  # a helper, not a test


def test_teacher_learns_and_round_trips_through_safetensors(digits_dir, teacher_path):
    model, config = load_model(teacher_path)
    assert test_accuracy(model, digits_dir) > 0.8
    assert config["role"] == "teacher" and config["model"]["arch"] == "cnn"
    assert config["train"]["epochs"] == 4 and config["classes"] == list(range(10))
    assert set(config["lineage"]["data_sha256"]) == {"train", "validation", "test"}
    assert set(load_file(str(teacher_path))) == set(model.state_dict())


def test_same_params_and_data_give_byte_identical_weights(digits_dir, tmp_path):
    for name in ("a", "b"):
        trained = train_teacher(digits_dir, model_params("teacher", epochs=2))
        save_model(trained.model, tmp_path / f"{name}.safetensors", trained.config)
    assert file_sha256(tmp_path / "a.safetensors") == file_sha256(tmp_path / "b.safetensors")
    other = train_teacher(digits_dir, model_params("teacher", epochs=2, seed=1))
    save_model(other.model, tmp_path / "c.safetensors", other.config)
    assert file_sha256(tmp_path / "c.safetensors") != file_sha256(tmp_path / "a.safetensors")


def test_relabelled_data_is_other_data_to_the_lineage(digits_dir, tmp_path):
    relabelled = tmp_path / "prepared"
    shutil.copytree(digits_dir, relabelled)
    y = np.load(relabelled / "y_train.npy")
    np.save(relabelled / "y_train.npy", np.roll(y, 1))  # the same inputs, other labels
    lineages = [train_teacher(prepared, model_params("teacher", epochs=1)).config["lineage"]["data_sha256"]
                for prepared in (digits_dir, relabelled)]
    assert lineages[0]["train"] != lineages[1]["train"] and lineages[0]["test"] == lineages[1]["test"]


class Crash(RuntimeError):
    pass


def test_interrupted_training_resumes_from_last_checkpoint(digits_dir, tmp_path):
    params = model_params("teacher", epochs=4)
    checkpoint = tmp_path / "teacher.pt"

    def crash_after_second_epoch(epoch, _row):
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        train_teacher(digits_dir, params, checkpoint, on_epoch_end=crash_after_second_epoch)
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 2

    epochs_run = []
    resumed = train_teacher(digits_dir, params, checkpoint, on_epoch_end=lambda e, _: epochs_run.append(e))
    assert epochs_run == [3, 4]
    uninterrupted = train_teacher(digits_dir, params)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_checkpoint_of_other_params_is_not_resumed(digits_dir, tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    train_teacher(digits_dir, model_params("teacher", epochs=1), checkpoint)
    epochs_run = []
    train_teacher(digits_dir, model_params("teacher", epochs=2, lr=0.02), checkpoint,
                  on_epoch_end=lambda e, _: epochs_run.append(e))
    assert epochs_run == [1, 2]


@pytest.mark.parametrize("optimizer, batch_size, epochs, lr", [
    ("sgd", 1, 1, 0.01),  # per-sample SGD
    ("sgd", 100_000, 60, 0.5),  # batch gradient descent: one step per epoch
    ("adam", 32, 2, 0.01),
])
def test_per_sample_mini_batch_and_full_batch_training(digits_dir, optimizer, batch_size, epochs, lr):
    params = model_params("student", optimizer=optimizer, batch_size=batch_size, epochs=epochs, lr=lr)
    trained = train_student(digits_dir, params)
    assert trained.history[0]["train_loss"] > 0
    assert test_accuracy(trained.model, digits_dir) > 0.3  # far above the 0.1 of chance


def test_distilled_student_records_its_teacher(digits_dir, teacher_path):
    trained = distill(digits_dir, teacher_path, model_params("student"), distill_params())
    assert trained.config["lineage"]["teacher_sha256"] == file_sha256(teacher_path)
    assert trained.config["distill"] == {"temperature": 4.0, "alpha": 0.7, "hidden_weight": 0.0, "attention_weight": 0.0}
    assert test_accuracy(trained.model, digits_dir) > 0.5


def test_distillation_loss_reduces_to_its_parts():
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    hard_only = distillation_loss(logits, torch.randn(8, 10), labels, DistillParams(temperature=3.0, alpha=0.0))
    assert torch.allclose(hard_only, F.cross_entropy(logits, labels))
    weights = torch.rand(10)
    weighted = distillation_loss(logits, torch.randn(8, 10), labels, DistillParams(temperature=3.0, alpha=0.0), None,
                                 weights)
    assert torch.allclose(weighted, (F.cross_entropy(logits, labels, reduction="none") * weights[labels]).mean())
    same = distillation_loss(logits, logits.clone(), labels, DistillParams(temperature=3.0, alpha=1.0))
    assert same.abs() < 1e-6


def test_balanced_class_weights_make_a_rare_class_count_as_much_as_a_common_one():
    # each class's samples weigh the same in total; the weights average 1; an absent class weighs nothing
    assert torch.allclose(balanced_class_weights(torch.tensor([0, 0, 0, 2])), torch.tensor([2 / 3, 0.0, 2.0]))
    generator = torch.Generator().manual_seed(0)
    # two overlapping classes, 19:1 in training: unweighted, the boundary moves deep into the rare class
    common, rare = torch.randn(950, 2, generator=generator), torch.randn(50, 2, generator=generator) + 1.5
    train = Split(torch.cat([common, rare]), torch.cat([torch.zeros(950), torch.ones(50)]).long())
    test_rare = Split(torch.randn(500, 2, generator=generator) + 1.5, torch.ones(500).long())
    recall = {}
    for class_weight in ("none", "balanced"):
        torch.manual_seed(0)  # the same initial weights for both
        model = build_model({"arch": "mlp", "hidden": [8]}, [2], 2)
        recipe = TrainParams(lr=0.01, batch_size=100, epochs=20, threads=1, device="cpu", class_weight=class_weight)
        fit(model, train, train, recipe, fingerprint=class_weight)
        recall[class_weight] = float((predict_logits(model, test_rare.X).argmax(1) == 1).float().mean())
    assert recall["none"] < 0.4 and recall["balanced"] > recall["none"] + 0.3, recall


def test_unknown_class_weight_is_refused_naming_the_field():
    with pytest.raises(ParamsError, match=r"^teacher.train.class_weight: must be none or balanced, got 'auto'"):
        from_dict(ModelParams, {"model": {"arch": "mlp"}, "train": {"class_weight": "auto"}}, "teacher")


def test_shift_moves_images_without_wrapping():
    x = torch.zeros(64, 1, 5, 5)
    x[:, 0, 2, 2] = 1.0
    shifted = shift_images(x, 1, torch.Generator().manual_seed(0))
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 1)  # one bright pixel, moved by at most one
    assert shifted[:, 0, 1:4, 1:4].sum() == 64
    assert not torch.equal(shifted, x)


def user_model(input_shape, n_classes, width=4):
    """A user-supplied architecture, referenced as 'tests.test_training:user_model'."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Linear(width, n_classes))


def test_user_architecture_by_module_path(digits_dir, tmp_path):
    params = model_params("student", epochs=1)
    params = type(params)(model={"arch": "tests.test_training:user_model", "width": 8}, train=params.train)
    trained = train_student(digits_dir, params)
    save_model(trained.model, tmp_path / "user.safetensors", trained.config)
    model, _ = load_model(tmp_path / "user.safetensors", configured_architectures({"student": {"model": params.model}}))
    assert model[1].out_features == 8
    assert read_config(tmp_path / "user.safetensors")["model"]["arch"] == "tests.test_training:user_model"


@pytest.mark.parametrize("spec, shape, expected", [
    ({"arch": "resnet9000"}, [1, 8, 8], "unknown architecture 'resnet9000'"),
    ({"arch": "nowhere.module:fn"}, [1, 8, 8], "cannot import 'nowhere.module:fn'"),
    ({"arch": "cnn"}, [64], "needs image input"),
    ({"arch": "cnn", "channels": [4, 4, 4, 4]}, [1, 8, 8], "shrink a [8, 8] image to nothing"),
    ({"arch": "mlp", "depth": 3}, [64], "bad options {'depth': 3}"),
])
def test_bad_architecture_specs_are_named(spec, shape, expected):
    with pytest.raises(ParamsError) as error:
        build_model(spec, shape, 10)
    assert expected in str(error.value)


def test_bad_recipe_is_rejected_by_field():
    with pytest.raises(ParamsError, match="optimizer: must be sgd, adam or adamw"):
        TrainParams(optimizer="rmsprop")
    with pytest.raises(ParamsError, match="batch_size: must be at least 1"):
        TrainParams(batch_size=0)


HERE = "cuda" if torch.cuda.is_available() else "cpu"  # what `auto` picks on this machine


def test_auto_device_is_cuda_when_present_else_the_cpu_and_the_model_records_it(digits_dir, teacher_path):
    assert resolve_device("auto").type == HERE and resolve_device("cpu").type == "cpu"
    _, config = load_model(teacher_path)
    assert config["train"]["device"] == "auto"
    assert config["trained_on"] == {"device": HERE, "torch": torch.__version__, "processes": 1,
                                    **({"gpu": torch.cuda.get_device_name(0)} if HERE == "cuda" else {})}
    on_cpu = train_student(digits_dir, model_params("student", epochs=1, device="cpu"))
    assert on_cpu.config["trained_on"]["device"] == "cpu"
    assert all(p.device.type == "cpu" for p in on_cpu.model.parameters())  # back on the CPU, ready to save


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_naming_the_field():
    section = {"model": {"arch": "mlp"}, "train": {"device": "cuda"}}
    with pytest.raises(ParamsError, match=r"^teacher.train.device: 'cuda' requested, but .* no CUDA device"):
        from_dict(ModelParams, section, "teacher")
    with pytest.raises(ParamsError, match=r"^evaluate.device: 'cuda' requested"):
        from_dict(EvaluateParams, {"device": "cuda"}, "evaluate")
    with pytest.raises(ParamsError, match=r"^device: 'cuda' requested"):
        resolve_device("cuda")  # a recipe built elsewhere is checked again where it runs


def test_unknown_device_is_refused_naming_the_field():
    with pytest.raises(ParamsError, match=r"^student.train.device: must be auto, cpu or cuda, got 'tpu'"):
        from_dict(ModelParams, {"model": {"arch": "mlp"}, "train": {"device": "tpu"}}, "student")


def test_mixup_loss_weights_the_labels_of_sample_and_partner():
    logits, labels, partner_labels = torch.randn(8, 10), torch.randint(0, 10, (8,)), torch.randint(0, 10, (8,))
    mixed = hard_label_loss(logits, labels, (0.3, partner_labels))
    assert torch.allclose(mixed, 0.3 * F.cross_entropy(logits, labels) + 0.7 * F.cross_entropy(logits, partner_labels))
