"""The Prefect flow on a real temporary Prefect server: same outputs as `dvc repro`, caching, checks, retries, Dask."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import (CANDIDATES_ARTIFACT, GATE_ARTIFACT, REMOVED_OUTPUTS_ARTIFACT, VALIDATION_ARTIFACT,
                            StageFailed, StageRejected, pipeline)
from flows.stages import load_stages
from flows.sweep import SWEEP_ARTIFACT, sweep, trial_settings
from tasks.check import WorkspaceInvalid
from tasks.io import EXIT_REJECTED, EXIT_TRANSIENT, file_sha256, run_main
from tasks.params import ParamsError, SweepParams
from tasks.storage import StorageUnavailable
from tasks.workspace import ROOT, copy_pipeline, write_params
from tests.conftest import api_filter, run, tiny_params


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def out_hashes(repo) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])
            if not out["path"].startswith("reports/")}  # reports hold timings and timestamps


def read_artifact(key: str) -> list[dict]:
    """Every version of the artifact under `key`, newest first."""
    return api_filter("artifacts", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"})


def test_flow_equals_dvc_repro_then_caches_then_reruns_one_branch(prefect_server, tmp_path, monkeypatch):
    params = tiny_params()
    reference = copy_pipeline(tmp_path / "dvc", params)
    run(["dvc", "repro"], reference)
    repo = copy_pipeline(tmp_path / "flow", params)
    monkeypatch.chdir(repo)

    assert sorted(pipeline()["ran"]) == sorted(load_stages())
    assert out_hashes(repo) == out_hashes(reference)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout

    teacher_mtime = (repo / "models" / "teacher.safetensors").stat().st_mtime_ns
    assert pipeline()["ran"] == []  # nothing stale: nothing runs
    assert (repo / "models" / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime

    params["distill"]["temperature"] = 2.0
    write_params(repo, params)
    assert sorted(pipeline()["ran"]) == ["compress@int8", "compress@pruned", "distill", "evaluate", "gate", "search"]
    assert (repo / "models" / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime

    params["compress"]["recipes"]["pruned"]["steps"][0]["sparsity"] = 0.6
    write_params(repo, params)
    int8_mtime = (repo / "models" / "candidates" / "int8" / "lineage.json").stat().st_mtime_ns
    assert sorted(pipeline()["ran"]) == ["compress@pruned", "evaluate", "gate"]  # one branch, not its siblings
    assert (repo / "models" / "candidates" / "int8" / "lineage.json").stat().st_mtime_ns == int8_mtime
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout

    tables = read_artifact(CANDIDATES_ARTIFACT)
    assert len(tables) == 3  # one per run that evaluated: the UI keeps the history
    rows = json.loads(tables[0]["data"])
    assert [r["model"] for r in rows] == ["teacher", "student", "distilled", "pruned", "int8", "search"]
    assert read_artifact(GATE_ARTIFACT)


def test_failed_validation_fails_the_flow_trains_nothing_and_is_not_retried(prefect_server, tmp_path, monkeypatch):
    params = tiny_params()
    X = np.random.default_rng(0).integers(0, 17, size=(300, 8, 8)).astype(float)
    X[4, 2, 2] = np.inf
    repo = copy_pipeline(tmp_path / "repo", params)
    np.savez(repo / "data" / "raw" / "bad.npz", X=X, y=np.arange(300) % 10)
    params["data"].update(source="npz", path="data/raw/bad.npz")
    write_params(repo, params)
    monkeypatch.chdir(repo)
    with pytest.raises(StageRejected, match="features have no NaN or inf"):
        pipeline()
    assert [p.name for p in (repo / "models").iterdir()] == ["pretrained"]  # no model trained
    report = read_artifact(VALIDATION_ARTIFACT)[0]
    assert "features have no NaN or inf: 1 of" in report["data"]
    runs = api_filter("task_runs", {"task_runs": {"name": {"like_": "validate"}}, "sort": "EXPECTED_START_TIME_DESC"})
    assert runs and all(r["run_count"] == 1 for r in runs)  # a deterministic failure is not retried


FLAKY_ARCH = '''
"""An architecture whose first training step fails like a storage hiccup: the flow must retry the stage."""
from pathlib import Path

from torch import nn

from tasks.models import mlp


class FailsOnce(nn.Sequential):
    def forward(self, x):
        marker = Path("flaky_failed_once")
        if not marker.exists():
            marker.touch()
            raise ConnectionError("storage temporarily unavailable")
        return super().forward(x)


def build(input_shape, n_classes, **options):
    return FailsOnce(*mlp(input_shape, n_classes, **options))
'''

BROKEN_ARCH = '''
"""An architecture with a deterministic bug in its forward pass: a retry would crash the same way."""
from torch import nn

from tasks.models import mlp


class Broken(nn.Sequential):
    def forward(self, x):
        raise RuntimeError("shape bug in the user's forward")


def build(input_shape, n_classes, **options):
    return Broken(*mlp(input_shape, n_classes, **options))
'''


@pytest.mark.parametrize("error, status", [
    (ConnectionError("storage temporarily unavailable"), EXIT_TRANSIENT),
    (TimeoutError("read timed out"), EXIT_TRANSIENT),
    (OSError(errno.EIO, "Input/output error"), EXIT_TRANSIENT),
    (StorageUnavailable("s3://bucket: failed after 4 attempts"), EXIT_TRANSIENT),
    (ParamsError("params.yaml:teacher.train.lr: must be positive"), EXIT_REJECTED),
])
def test_stage_exit_status_says_whether_a_retry_can_help(error, status):
    def stage():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_main(stage)
    assert exit_info.value.code == status


@pytest.mark.parametrize("error", [RuntimeError("a bug"), FileNotFoundError(errno.ENOENT, "no such file")])
def test_a_crash_is_not_transient(error):
    def stage():
        raise error

    with pytest.raises(type(error)):  # exits 1 with its traceback: the flow does not retry it
        run_main(stage)


def repo_with_teacher_arch(tmp_path, module: str, source: str):
    params = tiny_params()
    params["teacher"]["model"] = {"arch": f"architectures.{module}:build", "hidden": [16]}
    params["orchestration"] = {"task_runner": "thread", "retries": 2, "retry_delay_seconds": 0.1}
    repo = copy_pipeline(tmp_path / "repo", params)
    (repo / "architectures" / f"{module}.py").write_text(source)
    return repo


def teacher_run_counts() -> list[int]:
    runs = api_filter("task_runs", {"task_runs": {"name": {"like_": "train_teacher"}}, "sort": "EXPECTED_START_TIME_DESC"})
    return [r["run_count"] for r in runs]


def test_transient_failure_is_retried(prefect_server, tmp_path, monkeypatch):
    repo = repo_with_teacher_arch(tmp_path, "flaky", FLAKY_ARCH)
    monkeypatch.chdir(repo)
    assert "train_teacher" in pipeline()["ran"]
    assert teacher_run_counts()[0] == 2  # failed once (exit 75), then passed on the retry
    assert (repo / "models" / "teacher.safetensors").is_file()


def test_crash_runs_once_and_removes_the_outputs_it_made_stale(prefect_server, tmp_path, monkeypatch):
    repo = repo_with_teacher_arch(tmp_path, "broken", BROKEN_ARCH)
    previous = ["reports/comparison.md", "reports/gate.json", "models/candidates/pruned/lineage.json",
                "models/distilled.safetensors"]
    for name in previous:  # a previous run's outputs
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("from the previous run")
    monkeypatch.chdir(repo)
    with pytest.raises(StageFailed, match="shape bug in the user's forward"):
        pipeline()
    assert teacher_run_counts()[0] == 1  # a deterministic crash is not retried
    assert not any((repo / name).exists() for name in previous)
    assert (repo / "models" / "student.safetensors").is_file()  # not downstream of the teacher: it ran
    report = read_artifact(REMOVED_OUTPUTS_ARTIFACT)[0]["data"]
    assert "train_teacher failed, so compress@int8, compress@pruned, distill, evaluate, gate, search did not run" in report
    assert all(name.split("/lineage.json")[0] in report for name in previous)


def test_bad_params_fail_the_flow_before_any_stage_runs(prefect_server, tmp_path, monkeypatch):
    params = tiny_params()
    params["distill"]["temprature"] = 2.0
    repo = copy_pipeline(tmp_path / "repo", params)
    monkeypatch.chdir(repo)
    with pytest.raises(WorkspaceInvalid, match=r"params.yaml:distill: unknown field\(s\) \['temprature'\]"):
        pipeline()
    assert not (repo / "models").exists() and not (repo / "data" / "prepared").exists()  # not even prepare ran

    del params["distill"]["temprature"]
    params["teacher"]["train"]["optimizer"] = "rmsprop"
    write_params(repo, params)
    teacher = repo / "models" / "teacher.safetensors"
    teacher.parent.mkdir()
    teacher.write_bytes(b"the teacher of the last good run")
    with pytest.raises(WorkspaceInvalid, match="params.yaml:teacher.train.optimizer: must be sgd, adam or adamw"):
        pipeline()
    assert teacher.read_bytes() == b"the teacher of the last good run"


def test_dask_task_runner_with_a_two_worker_local_cluster(prefect_server, tmp_path, monkeypatch):
    params = tiny_params()
    params["orchestration"] = {"task_runner": "dask", "workers": 2}
    repo = copy_pipeline(tmp_path / "repo", params)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # Dask worker processes import flows.pipeline
    assert sorted(pipeline()["ran"]) == sorted(load_stages())
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout


def test_sweep_records_every_trial_and_adopts_the_best_teacher(prefect_server, tmp_path, monkeypatch):
    repo = copy_pipeline(tmp_path / "repo", tiny_params())
    monkeypatch.chdir(repo)
    best = sweep()
    record = json.loads((repo / "reports" / "sweep.json").read_text())
    accuracies = [t["val_accuracy"] for t in record["trials"]]
    assert [t["overrides"] for t in record["trials"]] == [
        {"lr": 0.003, "seed": 0}, {"lr": 0.003, "seed": 1}, {"lr": 0.01, "seed": 0}, {"lr": 0.01, "seed": 1}]
    assert best["val_accuracy"] == max(accuracies) and record["best"] == best["trial"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert {k: params["teacher"]["train"][k] for k in ("lr", "seed")} == best["overrides"]
    assert file_sha256(repo / "models" / "teacher.safetensors") == file_sha256(best["outputs"][0])
    status = run(["dvc", "status", "train_teacher"], repo).stdout
    assert "train_teacher" not in status  # the adopted weights are what the stage would produce
    assert len(read_artifact(SWEEP_ARTIFACT)[0]["data"]) > 0


def test_random_sweep_draws_reproducible_settings_within_the_ranges():
    params = SweepParams(method="random", trials=5, seed=3,
                         space={"lr": {"min": 1e-4, "max": 1e-1, "log": True}, "batch_size": [16, 32, 64]})
    settings = trial_settings(params)
    assert settings == trial_settings(params) and len(settings) == 5
    assert all(1e-4 <= s["lr"] <= 1e-1 and s["batch_size"] in (16, 32, 64) for s in settings)
    assert len({s["lr"] for s in settings}) == 5
