"""Metrics of real tiny models, and gate verdicts: non-inferiority with Holm, speed with its noise, the reports."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
import yaml

from tasks import gate as gate_stage
from tasks.distill import distill
from tasks.evaluate import base_candidate, evaluate, pareto_front
from tasks.gate import GateParams, comparison_table, gate, model_cells
from tasks.models import save_model
from tasks.params import EvaluateParams, ParamsError, from_dict
from tasks.promote import review_description
from tasks.statistics import drop_upper_bound, paired_comparison, wilson_interval
from tests.conftest import TINY_PARAMS, distill_params, model_params

TEST_SAMPLES, TEACHER_WRONG = 450, 7  # the digits run of reports/evaluation.json: teacher 443/450
# (lost, gained) against the teacher per candidate in that run's `vs_teacher`.
DIGITS_RUN = {"student": (14, 2), "distilled": (6, 3), "pruned_shared": (3, 2), "int8": (6, 3), "fp16": (6, 3),
              "slim_teacher": (6, 2), "search": (12, 2)}
PRODUCED_FROM = {"teacher": {"file": "models/teacher.safetensors", "sha256": "7e" * 32},
                 "data": {"sizes": {"train": 1078, "validation": 269, "test": 450}, "test_sha256": "c4" * 32},
                 "utc": "2025-05-01T10:00:00+00:00"}


def correctness(lost: int, gained: int) -> np.ndarray:
    """A candidate's right/wrong per test example, against a teacher wrong on the last TEACHER_WRONG examples."""
    correct = np.r_[np.ones(TEST_SAMPLES - TEACHER_WRONG, bool), np.zeros(TEACHER_WRONG, bool)]
    correct[:lost] = False
    correct[TEST_SAMPLES - TEACHER_WRONG:TEST_SAMPLES - TEACHER_WRONG + gained] = True
    return correct


def model(lost: int = 0, gained: int = 0, speedup: float = 1.0, interval: tuple = (0.9, 1.1), runtime: str = "pytorch",
          reference: bool = False, **extra) -> dict:
    """Evaluation metrics as tasks.evaluate writes them, with a chosen paired outcome and speed."""
    correct = correctness(lost, gained)
    n_correct = int(correct.sum())
    metrics = {"accuracy": n_correct / TEST_SAMPLES, "accuracy_ci95": list(wilson_interval(n_correct, TEST_SAMPLES)),
               "macro_f1": n_correct / TEST_SAMPLES, "macro_f1_ci95": [0.0, 1.0], "parameters": 1000, "nonzero_parameters": 1000,
               "file_bytes": 10_000, "expanded_bytes": 10_000, "expanded_to_run": False, "size_reduction": 20.0,
               "source": None, "runtime": runtime, "latency_ms_p50": 0.1, "latency_ms_p95": 0.12,
               "throughput_per_s": 1e5, "speedup": speedup, "speedup_interval": list(interval),
               "speedup_by_runtime": {runtime: speedup}, "runtimes": {runtime: {"latency_ms_p50": 0.1}}, **extra}
    if not reference:
        metrics["vs_teacher"] = paired_comparison(correctness(0, 0), correct)
    return metrics


def evaluation_of(models: dict[str, dict]) -> dict:
    return {"reference": "teacher", "reference_runtime": "onnxruntime", "test_samples": TEST_SAMPLES, "threads": 1,
            "devices": {"pytorch": "cuda (NVIDIA L4)", "onnxruntime": "cpu"}, "rounds": 7, "speedup_interval_coverage": 1 - 2.0**-6, "produced_from": PRODUCED_FROM,
            "models": {"teacher": model(reference=True), **models},
            "pareto": {"file_bytes": ["teacher"], "latency_ms_p50": ["teacher"]}}


def test_digits_run_student_and_search_fail_a_three_point_non_inferiority_gate():
    evaluation = evaluation_of({name: model(lost, gained) for name, (lost, gained) in DIGITS_RUN.items()})
    student, search = evaluation["models"]["student"], evaluation["models"]["search"]
    # The raw drops (2.67 and 2.22 points) are within 3 points: the old gate passed both.
    assert -student["vs_teacher"]["accuracy_change_points"] == pytest.approx(2.667, abs=1e-3)
    assert -search["vs_teacher"]["accuracy_change_points"] == pytest.approx(2.222, abs=1e-3)

    verdicts = gate(evaluation, GateParams(max_accuracy_drop=3.0, alpha=0.05))["verdicts"]
    assert {name for name, v in verdicts.items() if v["passed"]} == {"distilled", "pruned_shared", "int8", "fp16",
                                                                     "slim_teacher"}
    # Holm: the five candidates with the smallest p-values pass at 0.05/7 .. 0.05/3; search stops it at 0.05/2.
    assert verdicts["pruned_shared"]["accuracy_drop_test"]["holm_alpha"] == pytest.approx(0.05 / 7)
    for name in ("search", "student"):
        test = verdicts[name]["accuracy_drop_test"]
        lost, gained = DIGITS_RUN[name]
        assert test["holm_alpha"] == pytest.approx(0.025)
        assert test["drop_upper_bound_points"] == pytest.approx(100 * drop_upper_bound(lost, gained, 450, 0.025))
        assert verdicts[name]["failures"] == [
            f"accuracy drop could be as large as {test['drop_upper_bound_points']:.2f} points (upper bound at "
            f"Holm-adjusted α=0.0250) ≥ maximum 3.00"]
    assert verdicts["student"]["failures"][0].startswith("accuracy drop could be as large as 4.77 points")
    assert verdicts["search"]["failures"][0].startswith("accuracy drop could be as large as 4.21 points")
    for name, verdict in verdicts.items():  # every decision is "upper bound at its Holm level < maximum"
        assert verdict["passed"] == (verdict["accuracy_drop_test"]["drop_upper_bound_points"] < 3.0)


def test_holm_correction_is_what_fails_a_borderline_candidate():
    # (6, 2) of 450 passes a 2.5-point maximum alone (bound at 0.05: 2.17) but not among seven candidates.
    alone = gate(evaluation_of({"slim_teacher": model(6, 2)}), GateParams(max_accuracy_drop=2.5))["verdicts"]
    assert alone["slim_teacher"]["passed"] is True
    seven = {name: model(6, 2) for name in DIGITS_RUN}
    verdicts = gate(evaluation_of(seven), GateParams(max_accuracy_drop=2.5))["verdicts"]
    assert not any(v["passed"] for v in verdicts.values())
    assert verdicts["slim_teacher"]["accuracy_drop_test"]["holm_alpha"] == pytest.approx(0.05 / 7)


@pytest.mark.parametrize("field, value, message", [
    ("min_accuracy", -0.1, r"gate.min_accuracy: must be in \[0, 1\]"),
    ("min_accuracy", 90.0, r"gate.min_accuracy: must be in \[0, 1\]"),
    ("max_accuracy_drop", -1.0, r"gate.max_accuracy_drop: must be in \[0, 100\]"),
    ("max_accuracy_drop", 150.0, r"gate.max_accuracy_drop: must be in \[0, 100\]"),
    ("min_size_reduction", 0.0, r"gate.min_size_reduction: must be > 0"),
    ("min_speedup", -0.5, r"gate.min_speedup: must be >= 0"),
    ("min_speedup_vs_source", -1.0, r"gate.min_speedup_vs_source: must be >= 0"),
    ("alpha", 0.0, r"gate.alpha: must be in \(0, 0.5\)"),
    ("alpha", 0.5, r"gate.alpha: must be in \(0, 0.5\)"),
])
def test_out_of_range_gate_thresholds_are_refused_with_the_field_named(tmp_path, field, value, message):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"gate": {field: value}}))
    with pytest.raises(ParamsError, match=message):
        gate_stage.load_section("gate", GateParams, params_file)


def test_speed_minimums_fail_only_when_the_whole_interval_is_below_them():
    evaluation = evaluation_of({
        "noisy": model(speedup=0.97, interval=(0.91, 1.04)),  # could be as fast as the teacher
        "slower": model(speedup=0.80, interval=(0.75, 0.85)),
        "int8_noisy": model(runtime="onnxruntime", source="distilled", speedup_vs_source=0.96,
                            speedup_vs_source_interval=[0.93, 1.01]),
        "int8_slower": model(runtime="onnxruntime", source="distilled", speedup_vs_source=0.728,
                             speedup_vs_source_interval=[0.70, 0.76]),
    })
    verdicts = gate(evaluation, GateParams(min_speedup=1.0, min_speedup_vs_source=1.0))["verdicts"]
    assert verdicts["noisy"]["passed"] and verdicts["int8_noisy"]["passed"]
    assert verdicts["slower"]["failures"] == ["speed-up 0.80x [0.75, 0.85] is below the minimum 1.00x even at the "
                                              "top of its interval"]
    assert verdicts["int8_slower"]["failures"] == [
        "speed-up over its source distilled on onnxruntime 0.728x [0.700, 0.760] is below the minimum 1.000x even at "
        "the top of its interval"]


def reports_fixture() -> tuple[dict, dict, dict]:
    evaluation = evaluation_of({
        "pruned_shared": model(3, 2, speedup=0.16, interval=(0.15, 0.17), source="teacher", file_bytes=10_857,
                               expanded_bytes=212_392, expanded_to_run=True, speedup_vs_source=0.99,
                               speedup_vs_source_interval=[0.97, 1.02],
                               speedup_by_runtime={"pytorch": 0.99, "onnxruntime": 1.0}),
        "int8": model(6, 3, speedup=0.98, interval=(0.95, 1.01), runtime="onnxruntime", source="distilled",
                      speedup_vs_source=0.728, speedup_vs_source_interval=[0.70, 0.76]),
        "search": model(12, 2),
    })
    search_record = {"selected": {"trial": 5, "validation_drop_points": 1.1152, "validation_drop_upper_bound_points": 2.76}}
    result = gate(evaluation, GateParams(max_accuracy_drop=3.0, min_speedup_vs_source=1.0), search_record)
    return evaluation, result, search_record


def test_comparison_table_shows_intervals_verdicts_optimism_and_the_run_it_describes():
    evaluation, result, _ = reports_fixture()
    table = comparison_table(evaluation, result, "2025-05-01T10:05:00+00:00")
    assert table.startswith(f"Produced from teacher `models/teacher.safetensors` sha256 `{'7e' * 32}`, test split "
                            f"sha256 `{'c4' * 32}` (samples: train 1,078 / validation 269 / test 450); evaluated "
                            f"2025-05-01T10:00:00+00:00, gated 2025-05-01T10:05:00+00:00.")
    main_table = table.split("\n\n")[1]  # after the provenance line, before the notes and Pareto fronts
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in main_table.splitlines()
            if line.startswith("| ")}
    assert len(rows["model"]) == 12  # model + 11 columns
    pruned = rows["pruned_shared"]
    assert pruned[1] == "98.22% [96.53, 99.10]"
    paired = evaluation["models"]["pruned_shared"]["vs_teacher"]
    assert pruned[2] == (f"-0.22 [{paired['ci95_points'][0]:+.2f}, {paired['ci95_points'][1]:+.2f}] "
                         f"p={paired['p_value']:.3f}")
    assert pruned[3].startswith("yes: drop ≤ ") and "(α=0.0167)" in pruned[3]
    assert pruned[5] == "10,857 (212,392 expanded to run)"
    assert pruned[9] == "0.16x [0.15, 0.17] (pytorch 0.99x, onnxruntime 1.00x)"
    assert pruned[10] == "0.990x [0.970, 1.020] teacher" and pruned[11].strip(" |") == "PASS"
    assert rows["search"][3].startswith("NO: drop ≤ ") and rows["search"][11].strip(" |") == "FAIL"
    assert rows["teacher"][2] == "reference" and rows["teacher"][11].strip(" |") == "—"
    assert "- **int8** failed: speed-up over its source distilled on onnxruntime 0.728x [0.700, 0.760]" in table
    assert "- **search** failed: accuracy drop could be as large as 3.84 points (upper bound at Holm-adjusted α=0.0500)" in table
    assert ("Selection optimism: `search` was picked on the validation split with a drop of 1.12 points and dropped "
            "2.22 points on test (optimism +1.11 points).") in table
    assert "latency with 1 thread(s): PyTorch on cuda (NVIDIA L4), ONNX Runtime on cpu." in table


def test_promotion_review_shows_the_same_figures_as_the_comparison_table():
    evaluation, result, _ = reports_fixture()
    table = comparison_table(evaluation, result, "2025-05-01T10:05:00+00:00")
    records = {name: {"candidate": name, "metrics": evaluation["models"][name], "problems": [],
                      "gate": {"passed": v["passed"], "failures": v["failures"]}}
               for name, v in result["verdicts"].items()}
    description = review_description(records, table, None)
    for name, verdict in result["verdicts"].items():
        cells = model_cells(evaluation["models"][name], "teacher", verdict)
        review_row = next(line for line in description.splitlines() if line.startswith(f"| {name} |"))
        for key in ("accuracy", "change", "size", "speed-up"):
            assert f"| {cells[key]} |" in review_row and f"| {cells[key]} |" in table
    assert "| pruned_shared | 98.22% [96.53, 99.10] |" in description
    assert "no: failed its gate: accuracy drop could be as large as 3.84 points" in description


def test_gate_stage_writes_verdicts_and_table_naming_the_run(tmp_path):
    evaluation, _, search_record = reports_fixture()
    paths = {name: tmp_path / name for name in ("evaluation.json", "search.json", "gate.json", "comparison.md",
                                                "params.yaml")}
    paths["evaluation.json"].write_text(json.dumps(evaluation))
    paths["search.json"].write_text(json.dumps(search_record))
    paths["params.yaml"].write_text(yaml.safe_dump({"gate": {"max_accuracy_drop": 3.0, "min_speedup_vs_source": 1.0}}))
    gate_stage.run([str(paths["evaluation.json"]), str(paths["gate.json"]), str(paths["comparison.md"]),
                    "--search", str(paths["search.json"]), "--params", str(paths["params.yaml"])])
    report = json.loads(paths["gate.json"].read_text())
    assert report["produced_from"] == PRODUCED_FROM
    gated_at = datetime.datetime.fromisoformat(report["gated_at"])
    assert abs(datetime.datetime.now(datetime.UTC) - gated_at) < datetime.timedelta(minutes=5)
    assert report["thresholds"]["alpha"] == 0.05 and report["thresholds"]["max_accuracy_drop"] == 3.0
    assert report["verdicts"]["search"]["selection"] == pytest.approx(
        {"validation_drop_points": 1.1152, "test_drop_points": 100 * 10 / 450, "optimism_points": 100 * 10 / 450 - 1.1152})
    assert [name for name, v in report["verdicts"].items() if v["passed"]] == ["pruned_shared"]
    table = paths["comparison.md"].read_text()
    assert f"sha256 `{'7e' * 32}`" in table and f"gated {report['gated_at']}" in table


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


def test_gate_records_each_failed_threshold_of_a_real_evaluation_without_raising(evaluation):
    summary, _ = evaluation
    strict = GateParams(min_accuracy=0.999, max_accuracy_drop=0.0, min_size_reduction=1000.0, min_speedup=1000.0)
    result = gate(summary, strict)
    verdict = result["verdicts"]["distilled"]
    assert verdict["passed"] is False
    assert [f.split(" ")[0] for f in verdict["failures"]] == ["accuracy", "accuracy", "size", "speed-up"]
    lenient = gate(summary, GateParams())["verdicts"]["distilled"]
    assert lenient["passed"] is True and lenient["failures"] == []
    table = comparison_table(summary, result, "now")
    assert "| teacher |" in table and "- **distilled** failed: accuracy" in table


def test_pareto_front_keeps_only_undominated_models():
    models = {"big": {"accuracy": 0.99, "file_bytes": 1000}, "small": {"accuracy": 0.97, "file_bytes": 10},
              "worse": {"accuracy": 0.96, "file_bytes": 50}, "tie": {"accuracy": 0.97, "file_bytes": 10}}
    assert pareto_front(models, "file_bytes") == ["small", "tie", "big"]
