"""The Prefect flow on a real temporary Prefect server: same outputs as `dvc repro`, caching, retries, Dask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import CANDIDATES_ARTIFACT, GATE_ARTIFACT, VALIDATION_ARTIFACT, StageRejected, pipeline
from flows.stages import load_stages
from flows.sweep import SWEEP_ARTIFACT, sweep, trial_settings
from tasks.io import file_sha256
from tasks.params import SweepParams
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

    assert sorted(pipeline()) == sorted(load_stages())
    assert out_hashes(repo) == out_hashes(reference)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout

    teacher_mtime = (repo / "models" / "teacher.safetensors").stat().st_mtime_ns
    assert pipeline() == []  # nothing stale: nothing runs
    assert (repo / "models" / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime

    params["distill"]["temperature"] = 2.0
    write_params(repo, params)
    assert sorted(pipeline()) == ["compress@int8", "compress@pruned", "distill", "evaluate", "gate", "search"]
    assert (repo / "models" / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime

    params["compress"]["recipes"]["pruned"]["steps"][0]["sparsity"] = 0.6
    write_params(repo, params)
    int8_mtime = (repo / "models" / "candidates" / "int8" / "lineage.json").stat().st_mtime_ns
    assert sorted(pipeline()) == ["compress@pruned", "evaluate", "gate"]  # one branch, not its siblings
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
    assert not (repo / "models").exists()
    report = read_artifact(VALIDATION_ARTIFACT)[0]
    assert "features have no NaN or inf: 1 of" in report["data"]
    runs = api_filter("task_runs", {"task_runs": {"name": {"like_": "validate"}}, "sort": "EXPECTED_START_TIME_DESC"})
    assert runs and all(r["run_count"] == 1 for r in runs)  # a deterministic failure is not retried


FLAKY_ARCH = '''
"""An architecture whose first build fails like a storage hiccup: the flow must retry it."""
from pathlib import Path

from tasks.models import mlp


def build(input_shape, n_classes, **options):
    marker = Path("flaky_calls.txt")
    calls = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(calls))
    if calls == 1:
        raise OSError("storage temporarily unavailable")
    return mlp(input_shape, n_classes, **options)
'''


def test_transient_failure_is_retried(prefect_server, tmp_path, monkeypatch):
    params = tiny_params()
    params["teacher"]["model"] = {"arch": "flaky_arch:build", "hidden": [16]}
    params["orchestration"] = {"task_runner": "thread", "retries": 2, "retry_delay_seconds": 0.1}
    repo = copy_pipeline(tmp_path / "repo", params)
    (repo / "flaky_arch.py").write_text(FLAKY_ARCH)
    monkeypatch.chdir(repo)
    assert "train_teacher" in pipeline()
    runs = api_filter("task_runs", {"task_runs": {"name": {"like_": "train_teacher"}}, "sort": "EXPECTED_START_TIME_DESC"})
    assert runs[0]["run_count"] == 2  # failed once, then passed on the retry
    assert (repo / "models" / "teacher.safetensors").is_file()


def test_dask_task_runner_with_a_two_worker_local_cluster(prefect_server, tmp_path, monkeypatch):
    params = tiny_params()
    params["orchestration"] = {"task_runner": "dask", "workers": 2}
    repo = copy_pipeline(tmp_path / "repo", params)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # Dask worker processes import flows.pipeline
    assert sorted(pipeline()) == sorted(load_stages())
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
