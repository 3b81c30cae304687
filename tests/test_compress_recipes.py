"""Compression recipes: checked before any training, applied in order, every step's lineage recorded."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from tasks import compress as compress_stage
from tasks.compress import CompressParams, calibration_data, compress, parse_recipe, write_lineage
from tasks.io import file_sha256
from tasks.models import load_model, read_config
from tasks.params import DistillParams, ParamsError, from_dict, load_section
from tasks.compression.quantization import export_onnx, quantize_onnx, read_onnx_config
from tasks.search import SearchParams, plan_trials, search
from tasks.statistics import drop_upper_bound
from tasks.training import load_split
from tests.conftest import tiny_params


@pytest.mark.parametrize("recipe, message", [
    ({"source": "distilled", "steps": [{"method": "compactify"}]}, r"steps\[0\].method: unknown method 'compactify'"),
    ({"source": "distilled", "steps": [{"method": "prune", "sparsity": 1.0}]}, r"steps\[0\].sparsity: must be in \[0, 1\)"),
    ({"source": "distilled", "steps": [{"method": "prune", "sparsity": -0.2}]}, r"sparsity: must be in \[0, 1\)"),
    ({"source": "distilled", "steps": [{"method": "prune"}]}, r"steps\[0\].sparsity: required field is missing"),
    ({"source": "distilled", "steps": [{"method": "share", "bits": 0}]}, r"bits: must be an integer from 1 to 8, got 0"),
    ({"source": "distilled", "steps": [{"method": "share", "bits": 4, "sparsity": 0.5}]}, r"steps\[0\]: unknown field\(s\) \['sparsity'\]; allowed: \['bits'\]"),
    ({"source": "distilled", "steps": [{"method": "share", "bits": True}]}, r"steps\[0\].bits: expected int, got True"),
    ({"source": "distilled", "steps": [{"method": "prune", "sparsity": 0.5, "rounds": 0}]}, r"rounds: must be an integer >= 1"),
    ({"source": "distilled", "steps": [{"method": "structured_prune", "ratio": 1}]}, r"steps\[0\].ratio: must be in \[0, 1\), got 1.0"),
    ({"source": "teacher", "teacher": "teacher", "steps": [{"method": "distill", "model": {"width": 3}}]},
     r"steps\[0\].model: an architecture spec with 'arch'"),
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


def write_params(directory, params: dict):
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    validation = directory / "validation.json"
    validation.write_text(json.dumps({"success": True, "failures": []}))
    return path, validation


@pytest.mark.parametrize("name", ["../evil", "a b", "-x"])
def test_unsafe_recipe_names_are_refused_where_params_are_read(digits_dir, teacher_path, tmp_path, name):
    params = tiny_params()
    params["compress"]["recipes"][name] = {"source": "teacher", "steps": [{"method": "quantize", "mode": "fp32"}]}
    params_file, validation = write_params(tmp_path, params)
    message = r"compress.recipes: names \[.*\] not allowed; a recipe name is 1-64 of a-z, 0-9"
    with pytest.raises(ParamsError, match=message):
        load_section("compress", CompressParams, params_file)
    # The stage (dvc.yaml passes models/candidates/<name>) fails before writing anywhere, even outside candidates/.
    with pytest.raises(ParamsError, match=message):
        compress_stage.run(["--params", str(params_file), "--", name, str(digits_dir), str(validation),
                            str(teacher_path), str(teacher_path), str(tmp_path / "models" / "candidates" / name)])
    assert not (tmp_path / "models").exists()


def activation_scales(path) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer
            if init.name.endswith("_scale")}


def test_static_int8_is_calibrated_on_training_samples_not_the_validation_split(digits_dir, teacher_path, tmp_path):
    schema = json.loads((digits_dir / "schema.json").read_text())
    samples = calibration_data(digits_dir, schema["classes"], 64)
    train = load_split(digits_dir, "train", schema["classes"]).X.numpy()
    assert len(samples) == 64 and all((train == row).all(axis=tuple(range(1, train.ndim))).any() for row in samples)

    recipe = parse_recipe("int8", {"source": "teacher", "steps": [{"method": "quantize", "mode": "int8_static"}]})
    params = CompressParams(finetune={}, recipes={}, calibration_samples=64)
    (tmp_path / "out").mkdir()
    chain = compress(recipe, digits_dir, teacher_path, None, tmp_path / "out", params, DistillParams())
    model, config = load_model(teacher_path)
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32, config)
    validation = load_split(digits_dir, "validation", schema["classes"]).X.numpy()[:64]
    for name, calibration in (("train", samples), ("validation", validation)):
        quantize_onnx(fp32, tmp_path / f"{name}.onnx", "int8_static", config, calibration)
    produced, on_train = activation_scales(chain[-1].file), activation_scales(tmp_path / "train.onnx")
    assert produced.keys() == on_train.keys() and all(np.array_equal(produced[k], on_train[k]) for k in produced)
    on_validation = activation_scales(tmp_path / "validation.onnx")
    assert any(not np.array_equal(produced[k], on_validation[k]) for k in produced)


def test_recipe_chain_records_each_parent_and_step(digits_dir, teacher_path, tmp_path):
    recipe = parse_recipe("chain", {"source": "teacher", "teacher": "teacher", "steps": [
        {"method": "distill", "model": {"arch": "mlp", "hidden": [24]}, "train": {"epochs": 2, "augment_shift": 0}},
        {"method": "prune", "sparsity": 0.5, "rounds": 1},
        {"method": "share", "bits": 4},
        {"method": "quantize", "mode": "int8_dynamic"},
    ]})
    params = CompressParams(finetune={"epochs": 1, "augment_shift": 0}, recipes={}, calibration_samples=32)
    distill_params = DistillParams(temperature=3.0, alpha=0.6)
    chain = compress(recipe, digits_dir, teacher_path, teacher_path, tmp_path, params, distill_params)
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
        # every file trained by distillation (the distill step, and the fine-tuned prune and share) says how
        # and from which teacher; the quantized one keeps its parent's
        assert config["distill"] == dataclasses.asdict(distill_params)
        assert config["lineage"]["teacher_sha256"] == file_sha256(teacher_path)
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


@pytest.mark.parametrize("field, value, message", [
    ("alpha", 0.0, r"search.alpha: must be in \(0, 0.5\)"),
    ("alpha", 0.95, r"search.alpha: must be in \(0, 0.5\)"),
    ("max_accuracy_drop", -0.5, r"search.max_accuracy_drop: must be in \[0, 100\]"),
])
def test_out_of_range_search_tolerance_is_refused_with_the_field_named(field, value, message):
    with pytest.raises(ParamsError, match=message):
        from_dict(SearchParams, {"space": [[{"method": "quantize"}]], field: value}, "params.yaml:search")


def test_search_records_all_trials_and_returns_the_best_within_tolerance(digits_dir, teacher_path, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy2(teacher_path, models / "teacher.safetensors")
    space = [[{"method": "prune", "sparsity": [0.2, 0.5, 0.8], "rounds": 1}, {"method": "share", "bits": [2, 6]}]]
    params = SearchParams(source="teacher", teacher="", max_accuracy_drop=6.0, budget=6, space=space)
    compress_params = CompressParams(finetune={"epochs": 1, "augment_shift": 0}, recipes={}, calibration_samples=32)
    record = search(digits_dir, models, tmp_path / "search", params, compress_params, DistillParams())

    trials = record["trials"]
    assert len(trials) == 6  # every trial recorded, not just the first that passes
    for trial in trials:  # within tolerance = the validation drop's upper bound at alpha is below the maximum
        bound = 100 * drop_upper_bound(trial["lost"], trial["gained"], record["validation_samples"], 0.05)
        assert trial["drop_upper_bound_points"] == pytest.approx(bound)
        assert trial["within_tolerance"] == (bound < 6.0)
    passing = [t for t in trials if t["within_tolerance"]]
    best = trials[record["best"]]
    assert record["found"] and best in passing
    assert best["file_bytes"] == min(t["file_bytes"] for t in passing)
    assert record["selected"] == {"trial": best["trial"], "validation_drop_points": best["accuracy_drop_points"],
                                  "validation_drop_upper_bound_points": best["drop_upper_bound_points"]}
    lineage = json.loads((tmp_path / "search" / "lineage.json").read_text())
    assert [link["method"] for link in lineage["chain"]] == ["source", "prune", "share"]
    assert lineage["chain"][1]["settings"]["sparsity"] == best["steps"][0]["sparsity"]


def test_search_tolerance_needs_the_drops_upper_bound_below_the_maximum_not_just_the_drop(
        digits_dir, teacher_path, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy2(teacher_path, models / "teacher.safetensors")
    space = [[{"method": "quantize", "mode": ["fp32"]}]]  # the teacher exported unchanged: no drop at all
    compress_params = CompressParams(finetune={}, recipes={}, calibration_samples=32)
    records = {}
    for maximum in (0.5, 1.5):
        params = SearchParams(source="teacher", teacher="", max_accuracy_drop=maximum, budget=1, space=space)
        records[maximum] = search(digits_dir, models, tmp_path / f"search{maximum}", params, compress_params,
                                  DistillParams())
    trial = records[0.5]["trials"][0]
    assert (trial["lost"], trial["gained"], trial["accuracy_drop_points"]) == (0, 0, 0.0)
    # 269 validation samples without a single disagreement still only show "drop < 1.0 points" at 95 %.
    assert trial["drop_upper_bound_points"] == pytest.approx(1.0, abs=0.01)
    assert records[0.5]["found"] is False and records[1.5]["found"] is True
