"""Stage code dependencies derived from imports: dvc.yaml declares them all, so editing code (ours or a user's
architecture) makes the stages that run it stale under the real DVC CLI."""

from __future__ import annotations

import json
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

from tasks.codedeps import arch_references, code_deps, external_architectures, missing_code_deps
from tasks.io import file_sha256
from tasks.lineage import candidate_lineage, format_lineage
from tasks.workspace import ROOT, write_params
from tests.conftest import run, tiny_params

MODEL_STAGES = {"train_teacher", "train_student", "distill", "compress@pruned", "compress@int8", "search", "evaluate"}
TINY_ARCH = """import math

from torch import nn


def build(input_shape, n_classes, hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, n_classes))
"""


def test_this_repo_declares_every_stage_code_dependency():
    assert missing_code_deps(ROOT) == []
    derived = {name: {dep.file for dep in deps} for name, (_, deps) in code_deps(ROOT).items()}
    # found through imports, as the hand-kept lists were not: models.py imports encodings.py
    assert {"tasks/__init__.py", "tasks/models.py", "tasks/encodings.py", "tasks/params.py"} <= derived["evaluate"]
    assert {"tasks/__init__.py", "tasks/params.py", "tasks/io.py"} <= derived["gate"]
    assert "tasks/models.py" not in derived["prepare"]


def test_an_undeclared_import_is_reported(repo_copy):
    assert missing_code_deps(repo_copy) == []
    gate = repo_copy / "tasks" / "gate.py"
    # relative, inside a function, and what lineage imports (codedeps imports flows.stages inside a function)
    gate.write_text(gate.read_text() + "\n\ndef lineage_of(root, candidate):\n    from . import lineage\n"
                    "    return lineage.candidate_lineage(root, candidate)\n")
    assert missing_code_deps(repo_copy) == [
        "dvc.yaml: stage gate imports flows/__init__.py via tasks/codedeps.py, which is not among its deps",
        "dvc.yaml: stage gate imports flows/stages.py via tasks/codedeps.py, which is not among its deps",
        "dvc.yaml: stage gate imports tasks/codedeps.py via tasks/lineage.py, which is not among its deps",
        "dvc.yaml: stage gate imports tasks/lineage.py, which is not among its deps",
        "dvc.yaml: stage gate imports tasks/storage.py via tasks/lineage.py, which is not among its deps"]


def test_a_declared_module_the_stage_does_not_import_is_reported(repo_copy):
    dvc_yaml = repo_copy / "dvc.yaml"
    text = dvc_yaml.read_text()
    gate_deps = "      - reports/search.json\n"
    assert gate_deps in text
    dvc_yaml.write_text(text.replace(gate_deps, gate_deps + "      - tasks/registry.py\n", 1))
    assert missing_code_deps(repo_copy) == [
        "dvc.yaml: stage gate declares tasks/registry.py, which it does not import (remove it)"]


def test_a_user_architecture_outside_architectures_dir_is_reported(repo_copy):
    (repo_copy / "mynets").mkdir()
    (repo_copy / "mynets" / "__init__.py").write_text("")
    (repo_copy / "mynets" / "wide.py").write_text("from mynets.blocks import build\n")
    (repo_copy / "mynets" / "blocks.py").write_text(TINY_ARCH)
    params = tiny_params()
    params["student"]["model"] = {"arch": "mynets.wide:build", "hidden": 8}
    write_params(repo_copy, params)
    missing = missing_code_deps(repo_copy)
    assert ("dvc.yaml: stage distill builds models with mynets.wide:build (params.yaml student.model.arch) from "
            "mynets/wide.py, which is not among its deps (put your architecture modules under architectures/)"
            ) in missing
    assert any("stage evaluate builds models with mynets.wide:build (params.yaml student.model.arch), which imports "
               "mynets/blocks.py" in message for message in missing)
    reported = {message.split()[2] for message in missing}
    assert reported == MODEL_STAGES  # not prepare, validate or gate: they build no model
    assert len(missing) == 3 * len(MODEL_STAGES)  # mynets/__init__.py, wide.py, blocks.py

    shutil.move(repo_copy / "mynets", repo_copy / "architectures" / "mynets")
    params["student"]["model"]["arch"] = "architectures.mynets.wide:build"
    (repo_copy / "architectures" / "mynets" / "wide.py").write_text("from architectures.mynets.blocks import build\n")
    write_params(repo_copy, params)
    assert missing_code_deps(repo_copy) == []


def test_architectures_anywhere_in_params_are_found_and_installed_ones_named_by_distribution(repo_copy):
    (repo_copy / "architectures" / "small.py").write_text(TINY_ARCH)
    params = tiny_params()
    params["compress"]["recipes"]["small"] = {"source": "teacher", "teacher": "teacher", "steps": [
        {"method": "distill", "model": {"arch": "architectures.small:build", "hidden": 8}}]}
    params["search"]["space"] = [[{"method": "distill", "model": [{"arch": "yaml:safe_load"}, {"arch": "mlp"}]}]]
    params["student"]["model"]["arch"] = "nowhere.nets:build"
    found = list(arch_references(params))
    assert found == [("student.model.arch", "nowhere.nets:build"),
                     ("compress.recipes.small.steps[0].model.arch", "architectures.small:build"),
                     ("search.space[0][0].model[0].arch", "yaml:safe_load")]
    # not files of the repository: a distribution and its version stand for their code, if one provides them
    assert external_architectures(repo_copy, found) == {
        "yaml:safe_load": {"module": "yaml", "distributions": {"PyYAML": version("PyYAML")}},
        "nowhere.nets:build": {"module": "nowhere.nets", "distributions": {}}}


def commit(repo: Path) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=shrinkflow-test", "-c", "user.email=test@localhost", "commit", "-qm", "run"], repo)


def stale(repo: Path) -> set[str]:
    """Stages `dvc status` reports changed (or never run)."""
    return set(json.loads(run(["dvc", "status", "--json"], repo).stdout or "{}"))


def test_editing_imported_code_or_an_architecture_makes_dvc_status_stale_and_the_lineage_incomplete(repo_copy):
    (repo_copy / "architectures" / "tiny.py").write_text(TINY_ARCH)
    params = tiny_params()
    params["teacher"]["model"] = {"arch": "architectures.tiny:build", "hidden": 8}
    params["teacher"]["train"]["epochs"] = 1
    write_params(repo_copy, params)
    run(["dvc", "repro", "train_teacher"], repo_copy)
    assert "architectures.tiny:build" in json.dumps(
        yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]["train_teacher"]["params"])
    ran = {"prepare", "validate", "train_teacher"}
    run([sys.executable, "-m", "compileall", "-q", "architectures"], repo_copy)  # bytecode: not code (.dvcignore)
    assert (repo_copy / "architectures" / "__pycache__").is_dir() and stale(repo_copy) & ran == set()

    for edited, expected in [("tasks/params.py", {"prepare", "validate", "train_teacher"}),
                             ("tasks/encodings.py", {"train_teacher"}),
                             ("tasks/__init__.py", {"prepare", "validate", "train_teacher"}),
                             ("architectures/tiny.py", {"train_teacher"})]:
        path = repo_copy / edited
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        assert stale(repo_copy) & ran == expected, edited
        path.write_bytes(original)
    assert stale(repo_copy) & ran == set()

    # The teacher's lineage (evaluated and gated by the stages' own commands) names every code file by sha256.
    run([sys.executable, "-m", "tasks.evaluate", "data/prepared", "reports", "teacher=models/teacher.safetensors"],
        repo_copy)
    run([sys.executable, "-m", "tasks.gate", "reports/evaluation.json", "reports/gate.json", "reports/comparison.md"],
        repo_copy)
    commit(repo_copy)
    record = candidate_lineage(repo_copy, "teacher")
    assert record["problems"] == []
    files = record["code"]["files"]
    assert {"architectures/tiny.py", "architectures/__init__.py", "tasks/train_teacher.py", "tasks/params.py",
            "tasks/encodings.py", "tasks/prepare.py", "tasks/validate.py"} <= set(files)
    assert "tasks/evaluate.py" not in files  # evaluate measured the teacher; it did not make it
    assert all(digest == file_sha256(repo_copy / path) for path, digest in files.items())
    assert f"{len(files)} files, sha256:" in format_lineage(record) and "lineage   complete" in format_lineage(record)

    (repo_copy / "architectures" / "tiny.py").write_text(TINY_ARCH.replace("nn.ReLU()", "nn.Tanh()"))
    problems = candidate_lineage(repo_copy, "teacher")["problems"]
    assert "train_teacher changed since dvc.lock (changed deps: architectures modified); run `dvc repro` or the flow" \
        in problems and "architectures/tiny.py: not committed" in " ".join(problems)
