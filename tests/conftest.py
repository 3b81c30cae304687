"""Shared fixtures: tiny params, prepared digits data, a copy of the repo for real `dvc repro` runs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.params import DataParams, DistillParams, ModelParams, from_dict
from tasks.prepare import prepare, write_prepared
from tasks.workspace import copy_pipeline

RECIPE = {"optimizer": "adam", "lr": 0.01, "batch_size": 64, "epochs": 3, "seed": 0, "augment_shift": 1, "threads": 1}
TINY_PARAMS = {
    "data": {"source": "digits", "classes": list(range(10)), "input_shape": [1, 8, 8], "value_range": [0, 16],
             "split": {"train": 0.6, "validation": 0.15, "test": 0.25}, "seed": 0},
    "teacher": {"model": {"arch": "cnn", "channels": [8, 16], "hidden": 32}, "train": RECIPE},
    "student": {"model": {"arch": "mlp", "hidden": [16]}, "train": dict(RECIPE, augment_shift=0)},
    "distill": {"temperature": 4.0, "alpha": 0.7},
    "evaluate": {"threads": 1, "warmup": 2, "latency_repeats": 20, "throughput_batch": 32, "throughput_repeats": 2},
    "compress": {"finetune": {"epochs": 1}, "calibration_samples": 64, "recipes": {
        "pruned": {"source": "distilled", "steps": [{"method": "prune", "sparsity": 0.5, "rounds": 1}]},
        "int8": {"source": "distilled", "steps": [{"method": "quantize", "mode": "int8_dynamic"}]},
    }},
    "search": {"source": "distilled", "teacher": "", "max_accuracy_drop": 50.0, "budget": 2,
               "space": [[{"method": "prune", "sparsity": [0.3, 0.6], "rounds": 1}]]},
    "gate": {"min_accuracy": 0.5, "max_accuracy_drop": 50.0, "min_size_reduction": 2.0, "min_speedup": 0.0},
    "orchestration": {"task_runner": "thread", "workers": 2, "retries": 1, "retry_delay_seconds": 0.1},
    "sweep": {"method": "grid", "space": {"lr": [0.003, 0.01], "seed": [0, 1]}},
}


def tiny_params() -> dict:
    return copy.deepcopy(TINY_PARAMS)


def model_params(section: str, **train_overrides) -> ModelParams:
    values = tiny_params()[section]
    values["train"].update(train_overrides)
    return from_dict(ModelParams, values, section)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Digits, prepared once per session with the tiny params."""
    out = tmp_path_factory.mktemp("digits") / "prepared"
    write_prepared(out, *prepare(from_dict(DataParams, TINY_PARAMS["data"], "data")))
    return out


@pytest.fixture(scope="session")
def teacher_path(digits_dir, tmp_path_factory) -> Path:
    from tasks.models import save_model
    from tasks.train_teacher import train_teacher

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    trained = train_teacher(digits_dir, model_params("teacher", epochs=4))
    save_model(trained.model, path, trained.config)
    return path


def distill_params() -> DistillParams:
    return from_dict(DistillParams, TINY_PARAMS["distill"], "distill")


def tool_env() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first, so `python` and `dvc` are the venv's."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = ""
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A fresh git + DVC repo holding this project's pipeline, with tiny params."""
    return copy_pipeline(tmp_path / "repo", tiny_params())
