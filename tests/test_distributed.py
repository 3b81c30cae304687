"""Data-parallel teacher training: the train_teacher stage re-launches itself under torchrun (2 CPU processes,
gloo) and trains like one process, on one node or two; an interrupted run resumes from its checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tasks.models import load_model
from tasks.params import DataParams, ModelParams, ParamsError, TrainParams, from_dict
from tasks.statistics import wilson_interval
from tasks.train_teacher import train_teacher
from tasks.training import load_split, predict_logits
from tasks.validate import run_validation
from tests.conftest import free_port, tiny_params, tool_env

REPO = Path(__file__).resolve().parent.parent


def teacher_section(nproc: int) -> dict:
    """The tiny teacher without batch norm: with it each process would normalise by its own half batch, so
    without it two processes compute one process's gradients (up to rounding), a sharp test of the sharding.
    On the CPU (gloo) even where there is a GPU."""
    section = tiny_params()["teacher"]
    section["model"]["batchnorm"] = False
    section["train"].update(lr=0.03, epochs=6, augment_shift=0, device="cpu", distributed={"nproc": nproc})
    return section


@pytest.fixture(scope="module")
def stage_dir(digits_dir, tmp_path_factory) -> Path:
    """Validated digits and a params file asking for 2 processes: what the train_teacher stage reads."""
    root = tmp_path_factory.mktemp("distributed")
    run_validation(digits_dir, from_dict(DataParams, tiny_params()["data"], "data"), root / "validation.json",
                   root / "docs")
    (root / "params.yaml").write_text(yaml.safe_dump({"teacher": teacher_section(2)}))
    return root


def run_stage(digits_dir: Path, root: Path, name: str, checkpoint: Path | None = None) -> subprocess.Popen:
    """`python -m tasks.train_teacher ...` exactly as dvc.yaml runs it (one process, which starts torchrun)."""
    command = [sys.executable, "-m", "tasks.train_teacher", str(digits_dir), str(root / "validation.json"),
               str(root / f"{name}.safetensors"), str(root / f"{name}.csv"), str(root / f"{name}.json"),
               "--params", str(root / "params.yaml")]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    env = dict(tool_env(), PYTHONPATH=str(REPO))
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def resumed(digits_dir, stage_dir) -> tuple[int, str]:
    """A 2-process run stopped after an epoch, then run again: the epoch it stopped at and the rerun's output."""
    checkpoint = stage_dir / "teacher.pt"
    process = run_stage(digits_dir, stage_dir, "teacher", checkpoint)
    deadline = time.monotonic() + 240
    while not checkpoint.exists():  # rank 0 writes it after each epoch
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    process.terminate()  # as a cancelled run is stopped: the stage stops torchrun, torchrun its workers
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output
    time.sleep(2)  # a worker left running would finish within this and remove the checkpoint
    interrupted_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= interrupted_at < 6 and not (stage_dir / "teacher.safetensors").exists()
    return interrupted_at, finished(run_stage(digits_dir, stage_dir, "teacher", checkpoint))


def test_interrupted_two_process_run_resumes_from_its_checkpoint(stage_dir, resumed):
    interrupted_at, output = resumed
    assert f"resuming from checkpoint {stage_dir / 'teacher.pt'} after epoch {interrupted_at}" in output
    assert not (stage_dir / "teacher.pt").exists()  # removed once the model is written
    _, config = load_model(stage_dir / "teacher.safetensors")
    assert config["trained_on"] == {"device": "cpu", "torch": torch.__version__, "processes": 2}
    assert config["train"]["distributed"]["nproc"] == 2
    assert [int(row.split(",")[0]) for row in (stage_dir / "teacher.csv").read_text().splitlines()[1:]] == [
        1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def single(digits_dir):
    trained = train_teacher(digits_dir, from_dict(ModelParams, teacher_section(1), "teacher"))
    assert trained.config["trained_on"]["processes"] == 1
    return trained


def curves_match(csv_path: Path, history: list[dict[str, float]]) -> None:
    """Each process took its share of every batch and DDP averaged the gradients: one process's
    training, up to rounding."""
    rows = [row.split(",") for row in csv_path.read_text().splitlines()[1:]]
    for row, expected in zip(rows, history, strict=True):
        assert float(row[2]) == pytest.approx(expected["train_loss"], rel=1e-4)


def test_two_processes_reach_the_accuracy_of_one(digits_dir, stage_dir, resumed, single):
    model, _ = load_model(stage_dir / "teacher.safetensors")
    test = load_split(digits_dir, "test", list(range(10)))
    correct = [int((predict_logits(m, test.X).argmax(1) == test.y).sum()) for m in (single.model, model)]
    one, two = (c / len(test.y) for c in correct)
    low, high = wilson_interval(correct[0], len(test.y))
    assert one > 0.88 and low <= two <= high
    assert abs(one - two) <= 2 / len(test.y)  # the same training, across the interruption too
    curves_match(stage_dir / "teacher.csv", single.history)


def test_two_nodes_meet_at_the_rendezvous_and_train_like_one_process(digits_dir, tmp_path, stage_dir, single):
    """Two "nodes" of one process each, on this machine: each runs the same stage command with the same params."""
    section = teacher_section(1)
    section["train"]["distributed"].update(nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"teacher": section}))
    shutil.copy(stage_dir / "validation.json", tmp_path)
    nodes = [run_stage(digits_dir, tmp_path, "teacher") for _ in range(2)]
    for node in nodes:
        finished(node)
    _, config = load_model(tmp_path / "teacher.safetensors")
    assert config["trained_on"]["processes"] == 2
    curves_match(tmp_path / "teacher.csv", single.history)


def test_batch_must_divide_among_the_processes():
    with pytest.raises(ParamsError, match=r"batch_size 64 must divide evenly among 3 processes"):
        from_dict(TrainParams, {"batch_size": 64, "distributed": {"nproc": 3}}, "teacher.train")
    with pytest.raises(ParamsError, match=r"train.distributed.rdzv_endpoint: 2 nodes must meet at a fixed port"):
        from_dict(TrainParams, {"distributed": {"nnodes": 2}}, "teacher.train")
