"""Compression recipes: checked before any training, applied in order, every step's lineage recorded."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tasks import compress as compress_stage
from tasks.compress import CompressParams, compress, parse_recipe, write_lineage
from tasks.io import file_sha256
from tasks.models import load_model, read_config
from tasks.params import DistillParams, ParamsError
from tasks.quantization import read_onnx_config
from tasks.search import SearchParams, plan_trials, search
from tests.conftest import tiny_params


@pytest.mark.parametrize("recipe, message", [
    ({"source": "distilled", "steps": [{"method": "compactify"}]}, r"steps\[0\].method: unknown method 'compactify'"),
    ({"source": "distilled", "steps": [{"method": "prune", "sparsity": 1.0}]}, r"steps\[0\].sparsity: must be in \[0, 1\)"),
    ({"source": "distilled", "steps": [{"method": "prune", "sparsity": -0.2}]}, r"sparsity: must be in \[0, 1\)"),
    ({"source": "distilled", "steps": [{"method": "prune"}]}, r"prune needs \['sparsity'\]"),
    ({"source": "distilled", "steps": [{"method": "share", "bits": 0}]}, r"bits: must be an integer from 1 to 8, got 0"),
    ({"source": "distilled", "steps": [{"method": "share", "bits": 4, "sparsity": 0.5}]}, r"\['sparsity'\] not a setting of share"),
    ({"source": "teacher", "steps": [{"method": "distill", "model": {"arch": "mlp"}}]}, r"distill needs a teacher"),
    ({"source": "distilled", "steps": [{"method": "quantize"}, {"method": "share", "bits": 4}]}, r"quantize must be the last step"),
    ({"source": "distilled", "steps": [{"method": "quantize", "mode": "int4"}]}, r"mode: must be one of"),
    ({"source": "pruned", "steps": [{"method": "quantize"}]}, r"source: must be one of"),
    ({"source": "distilled", "steps": []}, r"steps: a non-empty list"),
])
def test_bad_recipes_are_refused_with_the_field_named(recipe, message):
    with pytest.raises(ParamsError, match=message):
        parse_recipe("r", recipe)


def test_bad_recipe_fails_the_stage_before_anything_is_written(digits_dir, teacher_path, tmp_path):
    params = tiny_params()
    params["compress"]["recipes"]["bad"] = {"source": "teacher", "steps": [{"method": "prune", "sparsity": 1.5}]}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"success": True, "failures": []}))
    out = tmp_path / "candidates" / "bad"
    with pytest.raises(ParamsError, match=r"compress.recipes.bad.steps\[0\].sparsity"):
        compress_stage.run(["bad", str(digits_dir), str(validation), str(teacher_path), str(teacher_path), str(out),
                            "--params", str(params_file)])
    assert not (tmp_path / "candidates").exists() or not any((tmp_path / "candidates").iterdir())


def test_recipe_chain_records_each_parent_and_step(digits_dir, teacher_path, tmp_path):
    recipe = parse_recipe("chain", {"source": "teacher", "teacher": "teacher", "steps": [
        {"method": "distill", "model": {"arch": "mlp", "hidden": [24]}, "train": {"epochs": 2, "augment_shift": 0}},
        {"method": "prune", "sparsity": 0.5, "rounds": 1},
        {"method": "share", "bits": 4},
        {"method": "quantize", "mode": "int8_dynamic"},
    ]})
    params = CompressParams(finetune={"epochs": 1, "augment_shift": 0}, recipes={}, calibration_samples=32)
    chain = compress(recipe, digits_dir, teacher_path, teacher_path, tmp_path, params, DistillParams())
    write_lineage(tmp_path, recipe, chain, teacher_path)

    lineage = json.loads((tmp_path / "lineage.json").read_text())
    assert [link["method"] for link in lineage["chain"]] == ["source", "distill", "prune", "share", "quantize"]
    assert lineage["chain"][0]["sha256"] == file_sha256(teacher_path)
    assert lineage["teacher"]["sha256"] == file_sha256(teacher_path)
    assert lineage["final"] == "step4-quantize.onnx"
    for parent, link in zip(lineage["chain"], lineage["chain"][1:]):
        path = tmp_path / link["file"]
        assert file_sha256(path) == link["sha256"]
        config = read_onnx_config(path) if path.suffix == ".onnx" else read_config(path)
        assert config["compression"]["parent_sha256"] == parent["sha256"]
        assert config["compression"]["method"] == link["method"]
    distilled, config = load_model(tmp_path / "step1-distill.safetensors")
    assert config["model"] == {"arch": "mlp", "hidden": [24]}
    assert lineage["chain"][2]["nonzero_parameters"] < 0.6 * lineage["chain"][2]["parameters"]  # biases stay


def test_search_plans_every_variant_or_a_seeded_sample_within_budget():
    space = [[{"method": "prune", "sparsity": [0.5, 0.8, 0.9], "rounds": 1}, {"method": "share", "bits": [3, 4]}],
             [{"method": "quantize", "mode": ["fp32", "int8_static"]}]]
    assert len(plan_trials(SearchParams(source="distilled", budget=20, space=space))) == 8
    sample = plan_trials(SearchParams(source="distilled", budget=3, seed=1, space=space))
    assert len(sample) == 3 and sample == plan_trials(SearchParams(source="distilled", budget=3, seed=1, space=space))
    with pytest.raises(ParamsError, match=r"search.space.trial0.steps\[0\].sparsity"):
        plan_trials(SearchParams(source="distilled", space=[[{"method": "prune", "sparsity": [1.2]}]]))


def test_search_records_all_trials_and_returns_the_best_within_tolerance(digits_dir, teacher_path, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy2(teacher_path, models / "teacher.safetensors")
    space = [[{"method": "prune", "sparsity": [0.2, 0.5, 0.8], "rounds": 1}, {"method": "share", "bits": [2, 6]}]]
    params = SearchParams(source="teacher", teacher="", max_accuracy_drop=3.0, budget=6, space=space)
    compress_params = CompressParams(finetune={"epochs": 1, "augment_shift": 0}, recipes={}, calibration_samples=32)
    record = search(digits_dir, models, tmp_path / "search", params, compress_params, DistillParams())

    trials = record["trials"]
    assert len(trials) == 6  # every trial recorded, not just the first that passes
    passing = [t for t in trials if t["accuracy_drop_points"] <= 3.0]
    best = trials[record["best"]]
    assert record["found"] and best in passing
    assert best["file_bytes"] == min(t["file_bytes"] for t in passing)
    lineage = json.loads((tmp_path / "search" / "lineage.json").read_text())
    assert [link["method"] for link in lineage["chain"]] == ["source", "prune", "share"]
    assert lineage["chain"][1]["settings"]["sparsity"] == best["steps"][0]["sparsity"]
