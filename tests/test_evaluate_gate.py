"""Evaluation statistics, the metrics of real tiny models, and gate verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.distill import distill
from tasks.evaluate import base_candidate, evaluate, paired_comparison, pareto_front, wilson_interval
from tasks.gate import comparison_table, gate
from tasks.models import save_model
from tasks.params import EvaluateParams, GateParams, from_dict
from tests.conftest import TINY_PARAMS, distill_params, model_params


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(95, 100)
    assert low == pytest.approx(0.8883, abs=1e-4) and high == pytest.approx(0.9785, abs=1e-4)
    low, high = wilson_interval(100, 100)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.9630, abs=1e-4)


def test_paired_comparison_counts_discordant_pairs():
    reference = np.array([True] * 90 + [False] * 10)
    candidate = reference.copy()
    candidate[:12] = False  # loses 12 the reference got right
    candidate[95:] = True  # gains 5 the reference got wrong
    result = paired_comparison(reference, candidate)
    assert (result["lost"], result["gained"]) == (12, 5)
    assert result["accuracy_change_points"] == pytest.approx(-7.0)
    assert result["mcnemar_p"] == pytest.approx(0.1435, abs=1e-3)  # exact binomial, two-sided
    assert result["distinguishable"] is False
    big = paired_comparison(np.ones(1000, bool), np.r_[np.zeros(40, bool), np.ones(960, bool)])
    assert big["distinguishable"] is True and big["ci95_points"][1] < 0


@pytest.fixture(scope="module")
def evaluation(digits_dir, teacher_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    distilled = distill(digits_dir, teacher_path, model_params("student"), distill_params())
    save_model(distilled.model, out / "distilled.safetensors", distilled.config)
    params = from_dict(EvaluateParams, TINY_PARAMS["evaluate"], "evaluate")
    candidates = {"teacher": base_candidate(teacher_path, out), "distilled": base_candidate(out / "distilled.safetensors", out)}
    return evaluate(digits_dir, candidates, params)


def test_evaluate_reports_every_metric_against_the_teacher(evaluation, teacher_path):
    summary, predictions = evaluation
    teacher, distilled = summary["models"]["teacher"], summary["models"]["distilled"]
    assert summary["test_samples"] == len(predictions["actual"]) == 450
    assert teacher["file_bytes"] == teacher_path.stat().st_size
    assert teacher["parameters"] > distilled["parameters"] and distilled["size_reduction"] > 1
    for metrics in (teacher, distilled):
        low, high = metrics["accuracy_ci95"]
        assert low < metrics["accuracy"] < high
        assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p95"] and metrics["throughput_per_s"] > 0
        assert metrics["runtime"] == "pytorch" and set(metrics["runtimes"]) == {"pytorch", "onnxruntime"}
        assert metrics["nonzero_parameters"] <= metrics["parameters"]
    paired = distilled["vs_teacher"]
    expected = 100 * (distilled["accuracy"] - teacher["accuracy"])
    assert paired["accuracy_change_points"] == pytest.approx(expected)
    assert paired["lost"] - paired["gained"] == round(-expected * 450 / 100)


def test_gate_records_each_failed_threshold_without_raising(evaluation):
    summary, _ = evaluation
    strict = GateParams(min_accuracy=0.999, max_accuracy_drop=0.0, min_size_reduction=1000.0, min_speedup=1000.0)
    verdict = gate(summary, strict)["verdicts"]["distilled"]
    assert verdict["passed"] is False
    assert [f.split(" ")[0] for f in verdict["failures"]] == ["accuracy", "accuracy", "size", "speed-up"]
    lenient = gate(summary, GateParams())["verdicts"]["distilled"]
    assert lenient == {"passed": True, "failures": []}
    table = comparison_table(summary, {"distilled": verdict})
    assert "| teacher |" in table and "FAIL: accuracy" in table


def test_gate_can_refuse_a_candidate_slower_than_its_source():
    def model(accuracy, p50, **extra):
        return {"accuracy": accuracy, "size_reduction": 4.0, "speedup": 1.0, "latency_ms_p50": p50, **extra}

    summary = {"reference": "teacher", "models": {
        "teacher": model(0.99, 1.0),
        "int8": model(0.99, 1.2, source="teacher", runtime="onnxruntime", speedup_vs_source=0.8),
    }}
    assert gate(summary, GateParams())["verdicts"]["int8"]["passed"] is True  # reported, not required
    verdict = gate(summary, GateParams(min_speedup_vs_source=1.0))["verdicts"]["int8"]
    assert verdict["failures"] == ["speed-up over its source teacher on onnxruntime 0.800x < minimum 1.000x"]


def test_pareto_front_keeps_only_undominated_models():
    models = {"big": {"accuracy": 0.99, "file_bytes": 1000}, "small": {"accuracy": 0.97, "file_bytes": 10},
              "worse": {"accuracy": 0.96, "file_bytes": 50}, "tie": {"accuracy": 0.97, "file_bytes": 10}}
    assert pareto_front(models, "file_bytes") == ["small", "tie", "big"]
