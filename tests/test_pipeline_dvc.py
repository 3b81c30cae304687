"""The real `dvc repro` on a copy of this repo with tiny params: outputs, caching, selective reruns, bad data."""

from __future__ import annotations

import json
import re

import numpy as np
import yaml

from tasks.workspace import write_params
from tests.conftest import run, tiny_params


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@]+)'", output)


def test_dvc_repro_end_to_end_then_nothing_then_only_what_changed(repo_copy):
    first = run(["dvc", "repro"], repo_copy)
    assert stages_run(first.stdout) == ["pretrained", "prepare", "validate", "train_teacher", "train_student",
                                        "distill", "compress@pruned", "compress@int8", "search", "evaluate", "gate"]
    for model in ("teacher", "student", "distilled"):
        assert (repo_copy / "models" / f"{model}.safetensors").is_file()
        assert (repo_copy / "reports" / "curves" / f"{model}.csv").read_text().startswith("epoch,")
    evaluation = json.loads((repo_copy / "reports" / "evaluation.json").read_text())
    assert list(evaluation["models"]) == ["teacher", "student", "distilled", "pruned", "int8", "search"]
    assert len(json.loads((repo_copy / "reports" / "search.json").read_text())["trials"]) == 2
    assert evaluation["models"]["int8"]["runtime"] == "onnxruntime"
    assert evaluation["models"]["pruned"]["nonzero_parameters"] < evaluation["models"]["distilled"]["parameters"]
    assert (repo_copy / "reports" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert evaluation["models"]["teacher"]["accuracy"] > 0.5  # 3 epochs of a tiny CNN
    verdicts = json.loads((repo_copy / "reports" / "gate.json").read_text())["verdicts"]
    assert set(verdicts) == {"student", "distilled", "pruned", "int8", "search"}
    table = (repo_copy / "reports" / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in ("teacher", "student", "distilled"))
    assert (repo_copy / "reports" / "data_docs" / "index.html").is_file()
    assert not (repo_copy / "checkpoints" / "teacher.pt").exists()  # removed once training finished

    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]
    teacher_md5 = next(o["md5"] for o in lock["train_teacher"]["outs"] if o["path"] == "models/teacher.safetensors")
    distill_deps = {d["path"]: d["md5"] for d in lock["distill"]["deps"]}
    assert distill_deps["models/teacher.safetensors"] == teacher_md5  # lineage recorded by DVC

    second = run(["dvc", "repro"], repo_copy)
    assert stages_run(second.stdout) == []
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo_copy).stdout

    params = tiny_params()
    params["distill"]["temperature"] = 2.0
    write_params(repo_copy, params)
    third = run(["dvc", "repro"], repo_copy)
    assert stages_run(third.stdout) == ["distill", "compress@pruned", "compress@int8", "search", "evaluate", "gate"]

    params["compress"]["recipes"]["pruned"]["steps"][0]["sparsity"] = 0.6
    write_params(repo_copy, params)
    fourth = run(["dvc", "repro"], repo_copy)
    assert stages_run(fourth.stdout) == ["compress@pruned", "evaluate", "gate"]  # only that branch


def test_dvc_repro_stops_before_training_on_bad_data(repo_copy):
    X = np.random.default_rng(0).integers(0, 17, size=(300, 8, 8)).astype(float)
    X[5, 3, 3] = np.nan
    y = np.arange(300) % 10
    y[7] = 42
    np.savez(repo_copy / "data" / "raw" / "bad.npz", X=X, y=y)
    params = tiny_params()
    params["data"].update(source="npz", path="data/raw/bad.npz")
    write_params(repo_copy, params)
    result = run(["dvc", "repro"], repo_copy, check=False)
    assert result.returncode != 0
    assert "features have no NaN or inf" in result.stderr
    assert "labels from the declared classes" in result.stderr
    assert stages_run(result.stdout) == ["pretrained", "prepare", "validate"]
    assert [p.name for p in (repo_copy / "models").iterdir()] == ["pretrained"]  # no model trained
    assert json.loads((repo_copy / "reports" / "validation.json").read_text())["success"] is False
