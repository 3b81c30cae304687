"""`shrinkflow check`: every section of params.yaml and the workspace, every problem at once, before anything runs."""

from __future__ import annotations

import pytest

from tasks.check import check_workspace
from tasks.params import DataParams, OrchestrationParams, ParamsError, SweepParams, TrainParams
from tasks.workspace import write_params
from tests.conftest import run, tiny_params

USER_ARCH = '''
import math

from torch import nn


def build(input_shape, n_classes, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Linear(width, n_classes))
'''


def test_valid_params_pass(repo_copy):
    assert check_workspace(repo_copy) == []
    result = run(["shrinkflow", "check"], repo_copy)
    assert result.stdout.strip() == "params.yaml: 13 sections valid"


def test_every_problem_in_every_section_is_reported_at_once(repo_copy):
    params = tiny_params()
    params["distill"]["temprature"] = 2.0
    params["teacher"]["train"]["lr"] = -1
    params["compress"]["recipes"]["pruned"]["steps"][0]["sparsity"] = 1.5
    params["search"]["objective"] = "bytes"
    params["storage"]["backend"] = "ftp"
    params["evalute"] = params.pop("evaluate")
    params["serve"] = {"poll_seconds": 0}
    del params["sweep"]
    write_params(repo_copy, params)
    problems = check_workspace(repo_copy)
    expected = [
        "params.yaml:distill: unknown field(s) ['temprature']",
        "params.yaml:teacher.train.lr: must be positive, got -1",
        "params.yaml:compress.recipes.pruned.steps[0].sparsity: must be in [0, 1), got 1.5",
        "params.yaml:search.objective: must be one of ['file_bytes', 'latency_ms_p50'], got 'bytes'",
        "params.yaml:storage.backend: must be local or s3, got 'ftp'",
        "params.yaml: unknown section(s) ['evalute']",
        "params.yaml: section 'evaluate' is missing",
        "params.yaml: section 'sweep' is missing",
        "params.yaml:serve.poll_seconds: must be positive, got 0",
    ]
    for message in expected:
        assert any(p.startswith(message) for p in problems), (message, problems)
    assert len(problems) == len(expected)

    result = run(["shrinkflow", "check"], repo_copy, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert f"shrinkflow check found {len(expected)} problem(s)" in result.stderr
    assert all(message in result.stderr for message in expected)


def test_layer_distillation_on_image_models_and_a_recipes_bad_fine_tuning_are_reported(repo_copy):
    params = tiny_params()
    params["distill"].update(hidden_weight=1.0, attention_weight=0.5)
    params["compress"]["recipes"]["pruned"]["finetune"] = {"epochs": 0}
    write_params(repo_copy, params)
    problems = check_workspace(repo_copy)
    assert len(problems) == 3, problems
    finetune, attention, layers = sorted(problems)
    for setting, problem in (("attention_weight", attention), ("hidden_weight", layers)):
        assert problem.startswith(f"params.yaml:distill.{setting}: distilling from inside the layers needs BERT "
                                  "encoders (hf_bert) on both sides; not hf_bert: ['teacher.model', 'student.model'"), problem
    assert finetune.startswith("params.yaml:compress.recipes.pruned.finetune.epochs: must be"), finetune


def test_every_configured_architecture_builds_a_module(repo_copy):
    (repo_copy / "architectures" / "small.py").write_text(USER_ARCH)
    params = tiny_params()
    params["teacher"]["model"] = {"arch": "architectures.small:build", "width": 16}  # fine
    params["student"]["model"] = {"arch": "builtins:print"}
    params["compress"]["recipes"]["pruned"] = {"source": "distilled", "teacher": "teacher", "steps": [
        {"method": "distill", "model": {"arch": "resnet9000"}}]}
    params["search"]["space"] = [[{"method": "distill", "model": [{"arch": "mlp", "hidden": [8]},
                                                                  {"arch": "mlp", "depth": 3}]}]]
    params["search"]["teacher"] = "teacher"
    write_params(repo_copy, params)
    assert sorted(check_workspace(repo_copy)) == [
        "params.yaml:compress.recipes.pruned.steps[0].model: ParamsError: model.arch: unknown architecture "
        "'resnet9000'; use ['cnn', 'hf_bert', 'mlp'] or 'module:function'",
        "params.yaml:search.space[0][0].model[1]: ParamsError: model: bad options {'depth': 3} for arch 'mlp' "
        "(mlp() got an unexpected keyword argument 'depth')",
        "params.yaml:student.model: ParamsError: model.arch 'builtins:print' returned None, not a torch.nn.Module",
    ]


FIXED_WIDTH_ARCH = '''
import math

import torch
from torch import nn


class FixedWidth(nn.Module):  # forward hard-codes the hidden width: structured pruning cannot shrink it
    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.hidden, self.out = nn.Linear(math.prod(input_shape), 16), nn.Linear(16, n_classes)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x.flatten(1))).reshape(-1, 16))


def build(input_shape, n_classes):
    return FixedWidth(input_shape, n_classes)
'''


def test_a_recipe_that_cannot_apply_to_its_architecture_is_reported_before_anything_trains(repo_copy):
    (repo_copy / "architectures" / "fixed.py").write_text(FIXED_WIDTH_ARCH)
    params = tiny_params()
    params["teacher"]["model"] = {"arch": "architectures.fixed:build"}
    params["compress"]["recipes"]["slim"] = {"source": "teacher", "steps": [{"method": "structured_prune",
                                                                             "ratio": 0.5}]}
    params["compress"]["recipes"]["shallow"] = {"source": "distilled", "steps": [{"method": "layer_prune"}]}
    write_params(repo_copy, params)
    problems = check_workspace(repo_copy)
    assert len(problems) == 2, problems
    slim, shallow = sorted(problems, reverse=True)
    assert slim.startswith("params.yaml:compress.recipes.slim.steps[0]: structured_prune ratio=0.5 heads=0.0 cannot apply "
                           "to architecture 'architectures.fixed:build'"), slim
    assert shallow.startswith("params.yaml:compress.recipes.shallow.steps[0]: layer_prune"), shallow
    assert not (repo_copy / "models").exists() or not any((repo_copy / "models").iterdir())


def test_leftover_partial_candidate_and_undeclared_architecture_are_reported(repo_copy):
    (repo_copy / "models" / "candidates" / "pruned.partial").mkdir(parents=True)
    (repo_copy / "mine.py").write_text(USER_ARCH)  # outside architectures/: no stage declares it
    params = tiny_params()
    params["student"]["model"] = {"arch": "mine:build"}
    write_params(repo_copy, params)
    problems = check_workspace(repo_copy)
    assert ("models/candidates/pruned.partial: left by an interrupted compress@pruned run; delete it "
            "(DVC would hash it into evaluate's models/candidates dependency)") in problems
    assert any(p.startswith("dvc.yaml: stage train_student") and "mine.py" in p for p in problems), problems


@pytest.mark.parametrize("cls, values, expected", [
    (TrainParams, {"weight_decay": -0.1}, "weight_decay: must be >= 0, got -0.1"),
    (TrainParams, {"momentum": 1.0}, "momentum: must be in [0, 1), got 1.0"),
    (OrchestrationParams, {"retry_delay_seconds": -1}, "retry_delay_seconds: must be >= 0, got -1"),
    (DataParams, {"source": "csv", "path": "x.csv", "label_column": ""}, "label_column: required for source 'csv'"),
    (DataParams, {"input_shape": []}, "input_shape: sizes must be positive, got []"),
    (SweepParams, {"method": "random", "space": {"lr": {"max": 0.1}}}, "space.lr: a range {min, max, log}"),
    (SweepParams, {"method": "random", "space": {"lr": {"min": 0, "max": 0.1, "log": True}}}, "(min > 0 if log)"),
])
def test_out_of_range_values_are_refused_by_field(cls, values, expected):
    with pytest.raises(ParamsError) as error:
        cls(**values)
    assert expected in str(error.value)
