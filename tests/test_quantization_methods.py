"""Quantization-aware training and accuracy-driven quantization tuning: real int8 artifacts, chosen on validation."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
import yaml

from tasks import compress as compress_stage
from tasks.compress import (
    CompressParams,
    calibration_data,
    finetune_recipe,
    parse_recipe,
)
from tasks.compression.methods import METHODS, StepContext
from tasks.compression.quantization import (
    StaticScheme,
    export_onnx,
    onnx_accuracy,
    quantize_onnx,
    read_onnx_config,
    weighted_nodes,
)
from tasks.io import file_sha256
from tasks.models import load_model
from tasks.params import ParamsError, from_dict
from tasks.training import Split, load_split, make_finetune, predict_logits
from tests.conftest import tiny_params


def run_final_step(raw_step: dict, digits_dir, source_path, out_path, validation: Split | None = None,
                   finetune_epochs: int = 1) -> dict:
    """One recipe's final (ONNX-writing) step, given what the compress stage gives it: the fine-tuning,
    the training-split calibration and the validation split. Returns the artifact's config."""
    step = parse_recipe("r", {"source": "teacher", "steps": [raw_step]}).steps[0]
    model, config = load_model(source_path)
    params = from_dict(CompressParams, {**tiny_params()["compress"], "finetune": {"epochs": finetune_epochs}},
                       "compress")
    classes = config["classes"]
    context = StepContext(copy.deepcopy(config), config["input_shape"], len(classes),
                          finetune=make_finetune(digits_dir, finetune_recipe(config, params.finetune)),
                          calibration=calibration_data(digits_dir, classes, params.calibration_samples),
                          validation=validation or load_split(digits_dir, "validation", classes))
    method = METHODS[step.method]
    model = method.run(model, step.options, context)
    method.write_onnx(model, step.options, context, out_path)
    return read_onnx_config(out_path)


def is_int8(path) -> bool:
    model = onnx.load_model(str(path))
    return any(node.op_type in ("QuantizeLinear", "QLinearConv", "QLinearMatMul") for node in model.graph.node) \
        and any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)


def split_accuracy(path, digits_dir, split: str) -> float:
    data = load_split(digits_dir, split, list(range(10)))
    return onnx_accuracy(path, data.X.numpy(), data.y.numpy())


def labelled_by_fp32(source_path, digits_dir) -> Split:
    """Blends of two validation inputs (near the decision boundaries) labelled with the fp32 model's own
    predictions: the fp32 model scores 100 % on them, and an int8 model that disagrees on any drops below it."""
    model, config = load_model(source_path)
    X = load_split(digits_dir, "validation", config["classes"]).X
    blends = torch.cat([(X + X.roll(shift, 0)) / 2 for shift in (1, 2, 3)])
    return Split(blends, predict_logits(model, blends).argmax(1))


def test_qat_writes_an_int8_model_and_stops_at_the_first_round_within_the_threshold(digits_dir, teacher_path,
                                                                                    tmp_path):
    path = tmp_path / "qat.onnx"
    # The tiny teacher's post-training int8 loses more than 0.5 points on validation, so rounds must train.
    config = run_final_step({"method": "qat", "rounds": 3, "max_drop": 0.5}, digits_dir, teacher_path, path)
    record = config["quantization_aware_training"]
    assert is_int8(path)
    assert record["met"] and record["source_validation_accuracy"] - split_accuracy(path, digits_dir, "validation") \
        <= 0.5
    assert len(record["rounds"]) > 1 and record["chosen_round"] >= 1  # post-training int8 missed; QAT met it
    last = record["rounds"][-1]
    assert record["source_validation_accuracy"] - last["int8_validation_accuracy"] <= 0.5
    assert all(record["source_validation_accuracy"] - r["int8_validation_accuracy"] > 0.5
               for r in record["rounds"][:-1])  # every earlier round missed: it stopped at the first that met
    assert split_accuracy(path, digits_dir, "validation") == pytest.approx(
        record["rounds"][record["chosen_round"]]["int8_validation_accuracy"])


def test_qat_runs_every_round_when_the_threshold_cannot_be_met_and_keeps_the_best(digits_dir, teacher_path,
                                                                                  tmp_path):
    path = tmp_path / "qat.onnx"
    validation = labelled_by_fp32(teacher_path, digits_dir)
    config = run_final_step({"method": "qat", "rounds": 2, "max_drop": 0.0}, digits_dir, teacher_path, path,
                            validation=validation)
    record = config["quantization_aware_training"]
    assert record["source_validation_accuracy"] == 100.0  # selection measured on the split it was given
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2] and not record["met"]
    best = max(r["int8_validation_accuracy"] for r in record["rounds"])
    assert record["rounds"][record["chosen_round"]]["int8_validation_accuracy"] == best
    assert onnx_accuracy(path, validation.X.numpy(), validation.y.numpy()) == pytest.approx(best)
    assert is_int8(path)


def test_tuner_keeps_the_first_scheme_within_tolerance_on_validation(digits_dir, teacher_path, tmp_path):
    path = tmp_path / "tuned.onnx"
    config = run_final_step({"method": "quantize_tuned", "max_drop": 1.0}, digits_dir, teacher_path, path)
    record = config["quantization_tuning"]
    assert is_int8(path) and record["selected_on"] == "validation"
    chosen = record["tried"][record["chosen"]]
    assert record["chosen"] == len(record["tried"]) - 1  # stopped at the first within tolerance
    assert record["source_validation_accuracy"] - chosen["validation_accuracy"] <= 1.0
    assert split_accuracy(path, digits_dir, "validation") == pytest.approx(chosen["validation_accuracy"])


def test_tuner_tries_every_scheme_cheapest_first_when_none_is_within_tolerance(digits_dir, teacher_path, tmp_path):
    path = tmp_path / "tuned.onnx"
    validation = labelled_by_fp32(teacher_path, digits_dir)
    config = run_final_step({"method": "quantize_tuned", "max_drop": 0.0}, digits_dir, teacher_path, path,
                            validation=validation)
    record = config["quantization_tuning"]
    assert record["source_validation_accuracy"] == 100.0 and not record["met"]
    tried = [(t["calibration"], t["per_channel"], len(t["float_nodes"])) for t in record["tried"]]
    assert tried == [(c, pc, fallback) for fallback in (0, 2) for c in ("minmax", "percentile", "entropy")
                     for pc in (False, True)]
    accuracies = [t["validation_accuracy"] for t in record["tried"]]
    assert record["chosen"] == accuracies.index(max(accuracies))
    assert onnx_accuracy(path, validation.X.numpy(), validation.y.numpy()) == pytest.approx(max(accuracies))
    assert is_int8(path)


def test_layers_left_in_float_read_float_weights_and_the_others_int8(teacher_path, digits_dir, tmp_path):
    model, config = load_model(teacher_path)
    export_onnx(model, tmp_path / "fp32.onnx", config)
    layers = weighted_nodes(tmp_path / "fp32.onnx")
    scheme = StaticScheme("minmax", True, (layers[0], layers[-1]))
    quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", "int8_static", config,
                  calibration_data(digits_dir, config["classes"], 64), scheme)
    graph = onnx.load_model(str(tmp_path / "int8.onnx")).graph
    dequantized = {output for n in graph.node if n.op_type == "DequantizeLinear" for output in n.output}
    reads_int8 = {n.name: n.input[1] in dequantized for n in graph.node if n.name in layers}  # input 1: weight
    assert reads_int8 == {name: name not in scheme.float_nodes for name in layers}


@pytest.mark.parametrize("step, message", [
    ({"method": "qat", "rounds": 0}, r"steps\[0\].rounds: must be an integer >= 1"),
    ({"method": "qat", "max_drop": -1}, r"steps\[0\].max_drop: must be >= 0"),
    ({"method": "quantize_tuned", "max_drop": -0.5}, r"steps\[0\].max_drop: must be >= 0"),
    ({"method": "qat", "tolerance": 1}, r"steps\[0\]: unknown field\(s\) \['tolerance'\]"),
])
def test_bad_quantization_settings_are_refused_with_the_field_named(step, message):
    with pytest.raises(ParamsError, match=message):
        parse_recipe("r", {"source": "teacher", "steps": [step]})


@pytest.mark.parametrize("method", ["qat", "quantize_tuned"])
def test_quantization_steps_must_be_last(method):
    with pytest.raises(ParamsError, match=rf"steps\[0\]: {method} must be the last step"):
        parse_recipe("r", {"source": "teacher", "steps": [{"method": method}, {"method": "prune", "sparsity": 0.5}]})


@pytest.mark.parametrize("step, record_key", [({"method": "qat", "rounds": 1, "max_drop": 0.5},
                                               "quantization_aware_training"),
                                              ({"method": "quantize_tuned", "max_drop": 0.5}, "quantization_tuning")])
def test_quantization_recipes_run_through_the_compress_stage(digits_dir, teacher_path, tmp_path, step, record_key):
    params = tiny_params()
    params["compress"]["recipes"] = {"q": {"source": "teacher", "steps": [step]}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"success": True, "failures": []}))
    out = tmp_path / "candidates" / "q"
    compress_stage.run(["q", str(digits_dir), str(validation), str(teacher_path), str(teacher_path), str(out),
                        "--params", str(params_file)])
    lineage = json.loads((out / "lineage.json").read_text())
    final = out / lineage["final"]
    assert lineage["final"] == lineage["runtime_onnx"] == f"step1-{step['method']}.onnx" and is_int8(final)
    config = read_onnx_config(final)
    assert config["compression"]["parent_sha256"] == file_sha256(teacher_path)
    assert config[record_key]["source_validation_accuracy"] == pytest.approx(
        torch_validation_accuracy(teacher_path, digits_dir))


def torch_validation_accuracy(path, digits_dir) -> float:
    model, config = load_model(path)
    validation = load_split(digits_dir, "validation", config["classes"])
    return float(100 * (predict_logits(model, validation.X).argmax(1) == validation.y).double().mean())
