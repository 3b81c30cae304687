"""Stage `gate`: declarative thresholds from params, a verdict per candidate.

A failed gate does not fail the pipeline: the verdict and the reason for each
failed threshold are recorded (and shown in the comparison table), and promotion
refuses candidates that did not pass.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tasks.io import read_json, run_main, write_json, write_text
from tasks.params import GateParams, load_section


def judge(metrics: dict, reference: dict, params: GateParams) -> list[str]:
    """Reasons the candidate fails the gate; empty if it passes."""
    failures = []
    drop = 100 * (reference["accuracy"] - metrics["accuracy"])
    if metrics["accuracy"] < params.min_accuracy:
        failures.append(f"accuracy {metrics['accuracy']:.4f} < minimum {params.min_accuracy:.4f}")
    if drop > params.max_accuracy_drop:
        failures.append(f"accuracy drop {drop:.2f} points > maximum {params.max_accuracy_drop:.2f}")
    if metrics["size_reduction"] < params.min_size_reduction:
        failures.append(f"size reduction {metrics['size_reduction']:.1f}x < minimum {params.min_size_reduction:.1f}x")
    if metrics["speedup"] < params.min_speedup:
        failures.append(f"speed-up {metrics['speedup']:.2f}x < minimum {params.min_speedup:.2f}x")
    if metrics.get("speedup_vs_source", math.inf) < params.min_speedup_vs_source:
        failures.append(f"speed-up over its source {metrics['source']} on {metrics['runtime']} "
                        f"{metrics['speedup_vs_source']:.3f}x < minimum {params.min_speedup_vs_source:.3f}x")
    return failures


def gate(evaluation: dict, params: GateParams) -> dict:
    """A verdict for every evaluated model but the reference: nothing is promoted ungated."""
    models = evaluation["models"]
    reference = models[evaluation["reference"]]
    verdicts = {}
    for name, metrics in models.items():
        if name != evaluation["reference"]:
            failures = judge(metrics, reference, params)
            verdicts[name] = {"passed": not failures, "failures": failures}
    return {"thresholds": vars(params), "verdicts": verdicts}


def comparison_table(evaluation: dict, verdicts: dict) -> str:
    """Markdown table of every model: accuracy (CI), paired change vs the reference, size, speed, verdict."""
    reference = evaluation["reference"]
    header = ["model", "test accuracy (95% CI)", f"vs {reference} (McNemar p)", "macro-F1", "parameters",
              "non-zero", "bytes", "size ×", "runtime", "p50 ms", "p95 ms", "samples/s", "speed-up",
              "vs source", "ORT p50 ms", "gate"]
    rows = []
    for name, m in evaluation["models"].items():
        low, high = m["accuracy_ci95"]
        paired = m.get("vs_" + reference)
        change = (f"{paired['accuracy_change_points']:+.2f} pts (p={paired['mcnemar_p']:.3f}"
                  f"{', significant' if paired['distinguishable'] else ', within noise'})") if paired else "reference"
        verdict = verdicts.get(name)
        status = "—" if verdict is None else "PASS" if verdict["passed"] else "FAIL: " + "; ".join(verdict["failures"])
        vs_source = f"{m['speedup_vs_source']:.3f}x {m['source']}" if "speedup_vs_source" in m else ""
        rows.append([name, f"{100 * m['accuracy']:.2f}% [{100 * low:.2f}, {100 * high:.2f}]", change,
                     f"{m['macro_f1']:.4f}", f"{m['parameters']:,}", f"{m['nonzero_parameters']:,}",
                     f"{m['file_bytes']:,}", f"{m['size_reduction']:.1f}", m["runtime"],
                     f"{m['latency_ms_p50']:.3f}", f"{m['latency_ms_p95']:.3f}", f"{m['throughput_per_s']:,.0f}",
                     f"{m['speedup']:.2f}", vs_source, f"{m['runtimes']['onnxruntime']['latency_ms_p50']:.3f}",
                     status])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = (f"\n{evaluation['test_samples']} test samples; latency at batch 1 and throughput at "
            f"batch {evaluation['throughput_batch']} on {evaluation['threads']} CPU thread(s), on the runtime "
            f"the file is deployed on; speed-up is against the {reference} on its runtime, 'vs source' against "
            f"the model a recipe started from on the same runtime.\n" + pareto_tables(evaluation))
    return "\n".join(lines) + "\n" + note


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
    args = parser.parse_args(argv)
    evaluation = read_json(args.evaluation)
    result = gate(evaluation, load_section("gate", GateParams))
    table = comparison_table(evaluation, result["verdicts"])
    write_json(args.verdicts_out, result)
    write_text(args.table_out, table)
    print(table)


if __name__ == "__main__":
    run_main(run)
