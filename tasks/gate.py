"""Stage `gate`: declarative thresholds from params, a verdict per candidate.

Thresholds on noisy measurements are judged with their noise. The accuracy drop is a
non-inferiority test: a candidate passes "drop <= max_accuracy_drop" only when the
upper confidence bound of its paired drop against the teacher (Tango's score interval)
is below the maximum, with Holm's correction over all gated candidates so the chance
that any candidate worse than the maximum passes stays below `alpha`. A speed-up fails
its minimum only when the upper end of its measured interval is below it (confidently
slower), so timing noise cannot fail a candidate that is as fast as its reference.

A failed gate does not fail the pipeline: the verdict and the reason for each failed
threshold are recorded (and shown in the comparison table), and promotion refuses
candidates that did not pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path

from tasks.io import read_json, run_main, write_json, write_text
from tasks.params import PARAMS_FILE, _require, load_section
from tasks.statistics import drop_upper_bound, holm_levels, non_inferiority_p

SEARCH_CANDIDATE = "search"


@dataclass(frozen=True)
class GateParams:
    min_accuracy: float = 0.0  # test accuracy, fraction
    max_accuracy_drop: float = 100.0  # percentage points below the teacher, shown by a non-inferiority test
    min_size_reduction: float = 1.0  # teacher bytes / candidate bytes
    # Teacher p50 latency on its fastest runtime / candidate p50 latency on its own: 1.0 = never slower.
    min_speedup: float = 0.0
    # Candidate vs the model its recipe started from, on the same runtime: 1.0 = never slower
    # (e.g. int8 must not be slower than its fp32 source).
    min_speedup_vs_source: float = 0.0
    alpha: float = 0.05  # family-wise error rate of the accuracy-drop tests over all candidates

    def __post_init__(self) -> None:
        _require(0 <= self.min_accuracy <= 1, f"min_accuracy: must be in [0, 1] (a fraction), got {self.min_accuracy}")
        _require(0 <= self.max_accuracy_drop <= 100,
                 f"max_accuracy_drop: must be in [0, 100] (percentage points), got {self.max_accuracy_drop}")
        _require(self.min_size_reduction > 0, f"min_size_reduction: must be > 0, got {self.min_size_reduction}")
        _require(self.min_speedup >= 0, f"min_speedup: must be >= 0, got {self.min_speedup}")
        _require(self.min_speedup_vs_source >= 0,
                 f"min_speedup_vs_source: must be >= 0, got {self.min_speedup_vs_source}")
        _require(0 < self.alpha < 0.5, f"alpha: must be in (0, 0.5), got {self.alpha}")


def accuracy_drop_tests(evaluation: dict, params: GateParams) -> dict[str, dict]:
    """Per candidate: the non-inferiority test of its paired drop at the maximum, Holm-corrected.

    `drop_upper_bound_points` is the one-sided upper confidence bound at the level Holm's
    procedure decided the candidate at; `passed` is exactly "that bound < max_accuracy_drop".
    """
    reference, n = evaluation["reference"], evaluation["test_samples"]
    margin = params.max_accuracy_drop / 100
    counts = {name: (m["vs_" + reference]["lost"], m["vs_" + reference]["gained"])
              for name, m in evaluation["models"].items() if name != reference}
    p_values = {name: non_inferiority_p(lost, gained, n, margin) for name, (lost, gained) in counts.items()}
    tests = {}
    for name, (level, passed) in holm_levels(p_values, params.alpha).items():
        lost, gained = counts[name]
        tests[name] = {"lost": lost, "gained": gained, "samples": n, "p_value": p_values[name], "holm_alpha": level,
                       "drop_upper_bound_points": 100 * drop_upper_bound(lost, gained, n, level), "passed": passed}
    return tests


def judge(metrics: dict, drop_test: dict, params: GateParams) -> list[str]:
    """Reasons the candidate fails the gate; empty if it passes."""
    failures = []
    if metrics["accuracy"] < params.min_accuracy:
        failures.append(f"accuracy {metrics['accuracy']:.4f} < minimum {params.min_accuracy:.4f}")
    if not drop_test["passed"]:
        failures.append(f"accuracy drop could be as large as {drop_test['drop_upper_bound_points']:.2f} points "
                        f"(upper bound at Holm-adjusted α={drop_test['holm_alpha']:.4f}) "
                        f"≥ maximum {params.max_accuracy_drop:.2f}")
    if metrics["size_reduction"] < params.min_size_reduction:
        failures.append(f"size reduction {metrics['size_reduction']:.1f}x < minimum {params.min_size_reduction:.1f}x")
    low, high = metrics["speedup_interval"]
    if high < params.min_speedup:
        failures.append(f"speed-up {metrics['speedup']:.2f}x [{low:.2f}, {high:.2f}] is below the minimum "
                        f"{params.min_speedup:.2f}x even at the top of its interval")
    if "speedup_vs_source" in metrics:
        low, high = metrics["speedup_vs_source_interval"]
        if high < params.min_speedup_vs_source:
            failures.append(f"speed-up over its source {metrics['source']} on {metrics['runtime']} "
                            f"{metrics['speedup_vs_source']:.3f}x [{low:.3f}, {high:.3f}] is below the minimum "
                            f"{params.min_speedup_vs_source:.3f}x even at the top of its interval")
    return failures


def selection_optimism(search_record: dict, metrics: dict, reference: str) -> dict:
    """How much worse the search's pick did on test than on the validation split it was selected on."""
    validation_drop = search_record["selected"]["validation_drop_points"]
    test_drop = -metrics["vs_" + reference]["accuracy_change_points"]
    return {"validation_drop_points": validation_drop, "test_drop_points": test_drop,
            "optimism_points": test_drop - validation_drop}


def gate(evaluation: dict, params: GateParams, search_record: dict | None = None) -> dict:
    """A verdict for every evaluated model but the reference: nothing is promoted ungated."""
    models, reference = evaluation["models"], evaluation["reference"]
    verdicts = {}
    for name, drop_test in accuracy_drop_tests(evaluation, params).items():
        failures = judge(models[name], drop_test, params)
        verdicts[name] = {"passed": not failures, "failures": failures, "accuracy_drop_test": drop_test}
    if search_record is not None and SEARCH_CANDIDATE in verdicts:
        verdicts[SEARCH_CANDIDATE]["selection"] = selection_optimism(search_record, models[SEARCH_CANDIDATE], reference)
    return {"thresholds": dataclasses.asdict(params), "verdicts": verdicts}


def format_speedup(value: float, interval: list[float], digits: int = 2) -> str:
    return f"{value:.{digits}f}x [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def model_cells(metrics: dict, reference: str, verdict: dict | None) -> dict[str, str]:
    """One model's figures as table cells; the comparison table and the promotion review both use these."""
    low, high = metrics["accuracy_ci95"]
    paired = metrics.get("vs_" + reference)
    change = (f"{paired['accuracy_change_points']:+.2f} [{paired['ci95_points'][0]:+.2f}, "
              f"{paired['ci95_points'][1]:+.2f}] p={paired['p_value']:.3f}") if paired else "reference"
    size = f"{metrics['file_bytes']:,}" + (f" ({metrics['expanded_bytes']:,} expanded to run)"
                                           if metrics["expanded_to_run"] else "")
    per_runtime = ", ".join(f"{rt} {x:.2f}x" for rt, x in metrics["speedup_by_runtime"].items())
    drop_test = (verdict or {}).get("accuracy_drop_test")
    return {
        "accuracy": f"{100 * metrics['accuracy']:.2f}% [{100 * low:.2f}, {100 * high:.2f}]",
        "change": change,
        "non-inferior": "" if drop_test is None else (
            f"{'yes' if drop_test['passed'] else 'NO'}: drop ≤ {drop_test['drop_upper_bound_points']:.2f} "
            f"(α={drop_test['holm_alpha']:.4f})"),
        "macro-F1": "{:.4f} [{:.4f}, {:.4f}]".format(metrics["macro_f1"], *metrics["macro_f1_ci95"]),
        "bytes": size,
        "size": f"{metrics['size_reduction']:.1f}",
        "runtime": metrics["runtime"],
        "p50": f"{metrics['latency_ms_p50']:.3f}",
        "speed-up": f"{format_speedup(metrics['speedup'], metrics['speedup_interval'])} ({per_runtime})",
        "vs source": (f"{format_speedup(metrics['speedup_vs_source'], metrics['speedup_vs_source_interval'], 3)} "
                      f"{metrics['source']}") if "speedup_vs_source" in metrics else "",
        "gate": "—" if verdict is None else "PASS" if verdict["passed"] else "FAIL",
    }


def column_titles(evaluation: dict, thresholds: dict) -> dict[str, str]:
    reference = evaluation["reference"]
    return {
        "accuracy": "test accuracy [95% CI]",
        "change": f"vs {reference}, pts [95% CI] p",
        "non-inferior": f"drop < {thresholds['max_accuracy_drop']:.2f} pts? (bound at Holm α)",
        "macro-F1": "macro-F1 [95% CI]",
        "bytes": "bytes deployed",
        "size": "size ×",
        "runtime": "runtime",
        "p50": "p50 ms",
        "speed-up": f"speed-up vs {reference} on {evaluation['reference_runtime']} [interval] (same runtime)",
        "vs source": "vs source [interval]",
        "gate": "gate",
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def provenance(produced_from: dict, gated_at: str) -> str:
    """Which run a report describes: the teacher and test data evaluate recorded, and when it ran."""
    teacher, data = produced_from["teacher"], produced_from["data"]
    sizes = " / ".join(f"{split} {size:,}" for split, size in data["sizes"].items())
    return (f"Produced from teacher `{teacher['file']}` sha256 `{teacher['sha256']}`, test split sha256 "
            f"`{data['test_sha256']}` (samples: {sizes}); evaluated {produced_from['utc']}, gated {gated_at}.")


def comparison_table(evaluation: dict, result: dict, gated_at: str) -> str:
    """Markdown report: every model's figures, why failing candidates failed, the search's optimism, Pareto fronts."""
    reference, verdicts = evaluation["reference"], result["verdicts"]
    titles = column_titles(evaluation, result["thresholds"])
    rows = [[name] + list(model_cells(m, reference, verdicts.get(name)).values())
            for name, m in evaluation["models"].items()]
    sections = [provenance(evaluation["produced_from"], gated_at), "",
                markdown_table(["model", *titles.values()], rows), ""]
    failures = [f"- **{name}** failed: " + "; ".join(v["failures"]) for name, v in verdicts.items() if not v["passed"]]
    if failures:
        sections += ["Gate failures:", "", *failures, ""]
    selection = verdicts.get(SEARCH_CANDIDATE, {}).get("selection")
    if selection:
        sections += [f"Selection optimism: `{SEARCH_CANDIDATE}` was picked on the validation split with a drop of "
                     f"{selection['validation_drop_points']:.2f} points and dropped {selection['test_drop_points']:.2f} "
                     f"points on test (optimism {selection['optimism_points']:+.2f} points).", ""]
    thresholds = result["thresholds"]
    sections.append(
        f"{evaluation['test_samples']} test samples. Accuracy: Wilson interval. Change: paired on the same "
        f"examples, Tango score interval and the score (McNemar) test at no change. Non-inferiority: the upper "
        f"confidence bound of the drop at the Holm-adjusted level (family-wise α={thresholds['alpha']}) must be "
        f"below {thresholds['max_accuracy_drop']:.2f} points. Batch-1 p50 latency with {evaluation['threads']} "
        f"thread(s): PyTorch on {evaluation['devices']['pytorch']}, ONNX Runtime on "
        f"{evaluation['devices']['onnxruntime']}. Speed-up: against the {reference} on "
        f"its fastest runtime ({evaluation['reference_runtime']}); the interval is the [min, max] of the per-round "
        f"ratios over {evaluation['rounds']} interleaved rounds ({100 * evaluation['speedup_interval_coverage']:.1f} % "
        f"coverage of their median), and a minimum fails only when the whole interval is below it; in brackets, "
        f"against the {reference} on the same runtime; 'vs source' against the model a recipe started from, same "
        f"runtime.")
    return "\n".join(sections) + "\n" + pareto_tables(evaluation)


def pareto_tables(evaluation: dict) -> str:
    """The models no other model beats on accuracy and cost at once, cheapest first."""
    models, sections = evaluation["models"], []
    for cost, title, unit, fmt in (("file_bytes", "accuracy vs bytes on disk", "bytes", "{:,}"),
                                   ("latency_ms_p50", "accuracy vs batch-1 p50 latency", "p50 ms", "{:.3f}")):
        rows = [f"| {name} | {100 * models[name]['accuracy']:.2f}% | {fmt.format(models[name][cost])} |"
                for name in evaluation["pareto"][cost]]
        sections.append(f"\nPareto front, {title}:\n\n| model | test accuracy | {unit} |\n|---|---|---|\n"
                        + "\n".join(rows) + "\n")
    return "".join(sections)


def run(argv: list[str] | None = None) -> None:
    """The stage as dvc.yaml runs it: paths from the command line, params from params.yaml."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation", type=Path)
    parser.add_argument("verdicts_out", type=Path)
    parser.add_argument("table_out", type=Path)
    parser.add_argument("--search", type=Path, help="reports/search.json: shows the search pick's selection optimism")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    evaluation = read_json(args.evaluation)
    result = gate(evaluation, load_section("gate", GateParams, args.params),
                  read_json(args.search) if args.search else None)
    gated_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    table = comparison_table(evaluation, result, gated_at)
    write_json(args.verdicts_out, {"produced_from": evaluation["produced_from"], "gated_at": gated_at, **result})
    write_text(args.table_out, table)
    print(table)


if __name__ == "__main__":
    run_main(run)
