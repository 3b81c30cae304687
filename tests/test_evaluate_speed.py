"""Speed and size measurement of real tiny models: interleaved rounds, GC off, native inputs,
speed-ups against the teacher's fastest runtime and per runtime, sizes of the deployed artifacts."""

from __future__ import annotations

import dataclasses
import gc
import shutil

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tasks.compress import CompressParams, compress, parse_recipe, write_lineage
from tasks.evaluate import (Candidate, Runner, base_candidate, evaluate, measure_speed, measure_speeds,
                            recipe_candidate, runner, speedup, split_sha256)
from tasks.io import file_sha256, read_json
from tasks.models import load_model, save_model
from tasks.params import EvaluateParams, ParamsError, from_dict
from tasks.compression.quantization import OnnxClassifier, read_onnx_config, save_onnx
from tests.conftest import TINY_PARAMS, distill_params

FAST = EvaluateParams(threads=1, rounds=3, warmup=1, latency_repeats=4, throughput_batch=2, throughput_repeats=1)


class Recording(nn.Module):
    """A real linear classifier that logs every call: which model, its input type, and whether GC was on."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, type(x), gc.isenabled()))
        return self.linear(x)


def test_models_are_timed_in_turn_every_round_with_gc_off():
    log: list = []
    runners = {name: runner(Recording(name, log)) for name in ("a", "b")}
    speeds = measure_speeds(runners, torch.rand(5, 64), FAST)

    assert gc.isenabled()  # restored afterwards
    assert {enabled for _, _, enabled in log} == {False}
    assert {kind for _, kind, _ in log} == {torch.Tensor}  # PyTorch gets tensors, converted before timing
    calls_per_turn = FAST.warmup + FAST.latency_repeats + 1 + FAST.throughput_repeats
    assert [name for name, _, _ in log].count("a") == FAST.rounds * calls_per_turn
    # One model after the other would switch once; in turn, at every round (the first model rotates).
    switches = sum(1 for before, after in zip(log, log[1:]) if before[0] != after[0])
    assert switches >= FAST.rounds
    for speed in speeds.values():
        assert len(speed["latency_ms_p50_rounds"]) == FAST.rounds
        assert 0 < speed["latency_ms_p50"] <= speed["latency_ms_p95"] and speed["throughput_per_s"] > 0
        assert speed["latency_p50_spread_pct"] >= 0


def test_gc_is_restored_when_a_model_fails():
    class Failing(nn.Module):
        def forward(self, x):
            raise RuntimeError("broken model")

    with pytest.raises(RuntimeError, match="broken model"):
        measure_speed(Failing(), torch.rand(3, 64), FAST)
    assert gc.isenabled()


def slice_model(path, width: int) -> OnnxClassifier:
    """An ONNX model that reads 10 of `width` input values: converting its input costs far more than running it."""
    graph = helper.make_graph(
        [helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["logits"])], "slice",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(np.array([v]), name) for v, name in ((0, "starts"), (10, "ends"), (1, "axes"))])
    save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path, {})
    return OnnxClassifier(path)


def test_onnx_runtime_inputs_are_converted_before_timing(tmp_path):
    """The timed calls receive the float32 arrays prepared up front: no conversion is charged to a call."""
    classifier = slice_model(tmp_path / "slice.onnx", 64)
    real = runner(classifier)
    events: list = []

    def prepare(x):
        events.append(("prepare", None))
        return real.prepare(x)

    def call(x):
        events.append(("call", (type(x), getattr(x, "dtype", None))))
        return real.call(x)

    measure_speeds({"slice": Runner(prepare, call)}, torch.rand(6, 64, dtype=torch.float64), FAST)
    first_call = [kind for kind, _ in events].index("call")
    assert {kind for kind, _ in events[:first_call]} == {"prepare"}  # every input is prepared first ...
    assert {kind for kind, _ in events[first_call:]} == {"call"}  # ... and nothing is converted while timing
    assert {info for _, info in events[first_call:]} == {(np.ndarray, np.dtype(np.float32))}


def test_speedup_is_the_median_of_paired_round_ratios_with_their_range():
    teacher = {"latency_ms_p50_rounds": [1.0, 2.0, 1.0, 4.0, 1.0]}
    candidate = {"latency_ms_p50_rounds": [0.5, 0.5, 2.0, 1.0, 0.25]}  # ratios 2, 4, 0.5, 4, 4
    assert speedup(teacher, candidate) == (4.0, [0.5, 4.0])
    # A slow round slows both models: pairing cancels it, where pooled p50s would not.
    steady = {"latency_ms_p50_rounds": [2.0, 20.0, 2.0]}
    assert speedup({"latency_ms_p50_rounds": [1.0, 10.0, 1.0]}, steady) == (0.5, [0.5, 0.5])


class EagerOverhead(nn.Module):
    """A linear classifier whose forward also does fixed Python work: per-call overhead that eager
    PyTorch pays and ONNX Runtime, running the same layer as a graph, does not."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sum(range(50_000))
        return self.linear(x.flatten(1))


def onnx_mlp(path, layers: list[nn.Linear], config: dict) -> None:
    """The ONNX graph of flatten -> linear (-> relu -> linear ...), with the layers' weights."""
    nodes, names, initializers = [helper.make_node("Flatten", ["input"], ["h0"])], ["h0"], []
    for i, layer in enumerate(layers):
        initializers += [numpy_helper.from_array(layer.weight.detach().numpy(), f"w{i}"),
                         numpy_helper.from_array(layer.bias.detach().numpy(), f"b{i}")]
        out = "logits" if i == len(layers) - 1 else f"g{i}"
        nodes.append(helper.make_node("Gemm", [names[-1], f"w{i}", f"b{i}"], [out], transB=1))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out], [f"h{i + 1}"]))
            names.append(f"h{i + 1}")
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializers)
    save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path, config)


def test_an_onnx_only_candidate_is_compared_with_the_teacher_on_onnx_runtime(digits_dir, tmp_path):
    """Teacher on PyTorch and ONNX Runtime; candidate an ONNX-only MLP. Its speed-ups pair its rounds with the
    teacher's on the teacher's fastest runtime and on ONNX Runtime, never with eager PyTorch's (the old
    cross-runtime ratio that showed int8 6x faster than a teacher it was slower than on ONNX Runtime)."""
    config = {"classes": list(range(10)), "input_shape": [1, 8, 8]}
    teacher = EagerOverhead().eval()
    save_model(teacher, tmp_path / "teacher.safetensors", dict(config, parameters=650))
    onnx_mlp(tmp_path / "teacher.onnx", [teacher.linear], config)
    heavy = [nn.Linear(64, 512), nn.Linear(512, 512), nn.Linear(512, 10)]
    onnx_mlp(tmp_path / "heavy.onnx", heavy, dict(config, model={"arch": "mlp", "hidden": [512, 512]},
                                                  parameters=sum(p.numel() for layer in heavy for p in layer.parameters())))
    candidates = {
        "teacher": Candidate(tmp_path / "teacher.safetensors", tmp_path / "teacher.onnx", None, teacher, config,
                             onnx_is_artifact=False),
        "heavy": Candidate(tmp_path / "heavy.onnx", tmp_path / "heavy.onnx", "teacher", None,
                           read_onnx_config(tmp_path / "heavy.onnx")),
    }
    summary, _ = evaluate(digits_dir, candidates, dataclasses.replace(FAST, latency_repeats=20))
    teacher_speed, heavy_m = summary["models"]["teacher"]["runtimes"], summary["models"]["heavy"]
    assert heavy_m["runtime"] == "onnxruntime" and set(heavy_m["runtimes"]) == {"onnxruntime"}
    fastest = min(teacher_speed, key=lambda runtime: teacher_speed[runtime]["latency_ms_p50"])
    assert summary["reference_runtime"] == fastest
    on_onnx = speedup(teacher_speed["onnxruntime"], heavy_m["runtimes"]["onnxruntime"])
    assert heavy_m["speedup_by_runtime"] == {"onnxruntime": pytest.approx(on_onnx[0])}
    against_fastest = speedup(teacher_speed[fastest], heavy_m["runtimes"]["onnxruntime"])
    assert heavy_m["speedup"] == pytest.approx(against_fastest[0])
    assert heavy_m["speedup_interval"] == pytest.approx(against_fastest[1])
    assert heavy_m["speedup_vs_source"] == pytest.approx(on_onnx[0])  # its source is the teacher, same runtime


def ratios(reference: dict, candidate: dict) -> list[float]:
    """Reference p50 / candidate p50 in each round."""
    return [r / c for r, c in zip(reference["latency_ms_p50_rounds"], candidate["latency_ms_p50_rounds"])]


@pytest.fixture(scope="module")
def pruned_evaluation(digits_dir, teacher_path, tmp_path_factory):
    """The real teacher and a compress@pruned stage output (90 % pruned: a compact file), evaluated."""
    out = tmp_path_factory.mktemp("pruned")
    recipe = parse_recipe("pruned", {"source": "teacher", "steps": [{"method": "prune", "sparsity": 0.9, "rounds": 1}]})
    chain = compress(recipe, digits_dir, teacher_path, None, out, CompressParams(finetune={"epochs": 1}, recipes={}),
                     distill_params())
    write_lineage(out, recipe, chain, None)
    params = from_dict(EvaluateParams, TINY_PARAMS["evaluate"], "evaluate")
    candidates = {"teacher": base_candidate(teacher_path, out), "pruned": recipe_candidate(out)}
    return evaluate(digits_dir, candidates, params)[0], out


def test_speedups_are_against_the_teachers_fastest_runtime_with_round_intervals(pruned_evaluation):
    summary, _ = pruned_evaluation
    teacher, pruned = summary["models"]["teacher"], summary["models"]["pruned"]
    fastest = min(teacher["runtimes"], key=lambda r: teacher["runtimes"][r]["latency_ms_p50"])
    assert summary["reference_runtime"] == fastest
    assert summary["rounds"] == TINY_PARAMS["evaluate"]["rounds"]
    assert summary["speedup_interval_coverage"] == pytest.approx(1 - 2 ** (1 - summary["rounds"]))
    for metrics in (teacher, pruned):
        deployed = metrics["runtimes"][metrics["runtime"]]
        per_round = ratios(teacher["runtimes"][fastest], deployed)
        assert metrics["speedup"] == pytest.approx(np.median(per_round))
        assert metrics["speedup_interval"] == pytest.approx([min(per_round), max(per_round)])
        assert set(metrics["speedup_by_runtime"]) == {"pytorch", "onnxruntime"}
        for runtime, ratio in metrics["speedup_by_runtime"].items():
            assert ratio == pytest.approx(np.median(ratios(teacher["runtimes"][runtime], metrics["runtimes"][runtime])))
    assert teacher["speedup_by_runtime"] == {"pytorch": 1.0, "onnxruntime": 1.0}
    # The pruned model's source is the teacher: same runtime (PyTorch), same rounds.
    assert pruned["speedup_vs_source"] == pytest.approx(pruned["speedup_by_runtime"]["pytorch"])
    low, high = pruned["speedup_vs_source_interval"]
    assert low <= high


def test_sizes_are_those_of_the_artifact_each_runtime_loads(pruned_evaluation, teacher_path):
    summary, out = pruned_evaluation
    teacher, pruned = summary["models"]["teacher"], summary["models"]["pruned"]
    final = out / read_json(out / "lineage.json")["final"]
    dense = sum(t.numel() * t.element_size() for t in load_model(final)[0].state_dict().values())

    on_pytorch, on_onnx = pruned["runtimes"]["pytorch"], pruned["runtimes"]["onnxruntime"]
    assert on_pytorch["artifact"] == str(final) and on_pytorch["artifact_bytes"] == final.stat().st_size
    assert on_pytorch["expanded_to_run"] and on_pytorch["expanded_bytes"] == dense > on_pytorch["artifact_bytes"]
    assert on_onnx["artifact"] == str(out / "runtime.onnx")
    assert on_onnx["artifact_bytes"] == (out / "runtime.onnx").stat().st_size == on_onnx["expanded_bytes"]
    assert on_onnx["artifact_bytes"] > on_pytorch["artifact_bytes"]  # the ONNX graph holds every weight, dense
    assert pruned["runtime"] == "pytorch" and pruned["file_bytes"] == on_pytorch["artifact_bytes"]
    assert pruned["expanded_bytes"] == dense and pruned["expanded_to_run"]
    assert pruned["size_reduction"] == pytest.approx(teacher["file_bytes"] / pruned["file_bytes"])

    # The dense teacher file is loaded as it is; its ONNX export exists only to measure ONNX Runtime.
    assert teacher["file_bytes"] == teacher_path.stat().st_size == teacher["runtimes"]["pytorch"]["expanded_bytes"]
    assert not teacher["expanded_to_run"] and teacher["runtimes"]["onnxruntime"]["artifact"] is None


def test_every_latency_names_the_device_it_was_measured_on(pruned_evaluation):
    summary, _ = pruned_evaluation
    here = "cpu" if not torch.cuda.is_available() else f"cuda ({torch.cuda.get_device_name(0)})"
    assert summary["devices"] == {"pytorch": here, "onnxruntime": "cpu"}  # evaluate.device: auto
    for metrics in summary["models"].values():
        assert {runtime: m["device"] for runtime, m in metrics["runtimes"].items()} == summary["devices"]
        assert metrics["device"] == summary["devices"][metrics["runtime"]]


def test_the_report_names_the_teacher_and_data_it_was_computed_from(pruned_evaluation, teacher_path, digits_dir):
    summary, _ = pruned_evaluation
    produced = summary["produced_from"]
    assert produced["teacher"] == {"file": str(teacher_path), "sha256": file_sha256(teacher_path)}
    assert produced["data"]["sizes"] == read_json(digits_dir / "schema.json")["sizes"]
    assert len(produced["data"]["test_sha256"]) == 64
    assert produced["utc"].endswith("+00:00")


def test_the_test_split_hash_changes_with_the_test_data(digits_dir, tmp_path):
    copy = tmp_path / "prepared"
    shutil.copytree(digits_dir, copy)
    before = split_sha256(copy, "test")
    assert before == split_sha256(digits_dir, "test")
    y = np.load(copy / "y_test.npy")
    y[0] = (y[0] + 1) % 10
    np.save(copy / "y_test.npy", y)
    assert split_sha256(copy, "test") != before


@pytest.mark.parametrize("field", ["rounds", "latency_repeats", "throughput_repeats", "threads"])
def test_speed_settings_below_one_are_refused_with_the_field_named(field):
    with pytest.raises(ParamsError, match=f"evaluate.{field}"):
        from_dict(EvaluateParams, {field: 0}, "evaluate")
