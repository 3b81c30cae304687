"""Benchmark: the whole pipeline on the MNIST test set (6,000 / 1,000 / 3,000, stratified, seeded).

Runs the real `dvc repro`, stage by stage, in a scratch copy of the repo
(bench/out/mnist) with the params in bench/mnist.yaml, then reruns the students
with more seeds. Prints stage wall times, the comparison table and the figures
the foundation issue sets targets for. Nothing here asserts: it reports.

    python bench/mnist.py [--seeds 0 1 2] [--mnist ../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnist_workspace import MNIST_DIR, ROOT, benchmark_params, mnist_workspace, timed

from flows.stages import load_stages, topological_order
from tasks.workspace import write_params


def accuracies(workspace: Path) -> dict[str, float]:
    models = json.loads((workspace / "reports" / "evaluation.json").read_text())["models"]
    return {name: m["accuracy"] for name, m in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=MNIST_DIR)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "mnist")
    args = parser.parse_args()

    params = benchmark_params()
    workspace = mnist_workspace(args.out, args.mnist, params)
    stages = topological_order(load_stages(workspace / "dvc.yaml"))
    stage_times = {stage: timed(["dvc", "repro", "--single-item", stage], workspace) for stage in stages}
    noop = timed(["dvc", "repro"], workspace)
    table = (workspace / "reports" / "comparison.md").read_text()
    evaluation = json.loads((workspace / "reports" / "evaluation.json").read_text())["models"]
    search_record = json.loads((workspace / "reports" / "search.json").read_text())

    runs = {params["student"]["train"]["seed"]: accuracies(workspace)}
    for seed in args.seeds:
        if seed not in runs:
            params["student"]["train"]["seed"] = seed
            write_params(workspace, params)
            timed(["dvc", "repro"], workspace)
            runs[seed] = accuracies(workspace)

    print("\n== Stage wall times (dvc repro --single-item, seconds) ==")
    for stage, seconds in stage_times.items():
        print(f"{stage:>14}: {seconds:7.1f}")
    print(f"{'whole pipeline':>14}: {sum(stage_times.values()):7.1f}   (target <= 300)")
    print(f"{'no-op repro':>14}: {noop:7.1f}   (target <= 3)")
    print(f"\n== Comparison (student seed {next(iter(runs))}) ==\n{table}")

    print("== Distillation over student seeds ==")
    print("seed | teacher | student | distilled | gap closed")
    closed = []
    for seed, acc in sorted(runs.items()):
        gap = acc["teacher"] - acc["student"]
        fraction = (acc["distilled"] - acc["student"]) / gap if gap > 0 else float("nan")
        closed.append(fraction)
        print(f"{seed:>4} | {100 * acc['teacher']:.2f}% | {100 * acc['student']:.2f}% | "
              f"{100 * acc['distilled']:.2f}% | {100 * fraction:.0f}%")
    mean = {k: sum(r[k] for r in runs.values()) / len(runs) for k in ("teacher", "student", "distilled")}
    mean_closed = (mean["distilled"] - mean["student"]) / (mean["teacher"] - mean["student"])
    ratio = evaluation["teacher"]["parameters"] / evaluation["distilled"]["parameters"]
    print(f"mean | {100 * mean['teacher']:.2f}% | {100 * mean['student']:.2f}% | {100 * mean['distilled']:.2f}% | "
          f"{100 * mean_closed:.0f}%   (target >= 50% of the gap closed)")
    print(f"\nteacher test accuracy {100 * evaluation['teacher']['accuracy']:.2f}% (target >= 99.0%), "
          f"trained in {stage_times['train_teacher']:.1f} s (target <= 120 s)")
    print(f"student has {ratio:.1f}x fewer parameters than the teacher (target >= 10x)")
    print_compression_targets(evaluation, search_record, stage_times)


def print_compression_targets(models: dict, search_record: dict, stage_times: dict[str, float]) -> None:
    """The compression suite's targets, from the student-seed-0 evaluation (test split)."""
    teacher = models["teacher"]

    def drop(m: dict) -> float:
        return 100 * (teacher["accuracy"] - m["accuracy"])

    candidates = {n: m for n, m in models.items() if n not in ("teacher", "student", "distilled")}
    print("\n== Compression ==")
    for name, m in candidates.items():
        print(f"{name:>18}: drop {drop(m):+.2f} pts, {m['size_reduction']:.1f}x fewer bytes ({m['file_bytes']:,}), "
              f"{m['speedup']:.1f}x lower p50 on {m['runtime']} ({m['latency_ms_p50']:.3f} ms)"
              + (f", {m['speedup_vs_source']:.2f}x vs its source {m['source']}" if "speedup_vs_source" in m else ""))
    within = {n: m for n, m in models.items() if n != "teacher" and drop(m) <= 0.3}
    if within:
        name, m = max(within.items(), key=lambda item: item[1]["size_reduction"])
        print(f"smallest with drop <= 0.3: {name}, {m['size_reduction']:.1f}x fewer bytes (target >= 50x)")
    within = {n: m for n, m in models.items() if n != "teacher" and drop(m) <= 0.5}
    if within:
        name, m = max(within.items(), key=lambda item: item[1]["speedup"])
        print(f"fastest with drop <= 0.5: {name}, {m['speedup']:.1f}x lower p50 (target >= 10x)")
    for name, m in candidates.items():
        if "int8" in name:
            print(f"{name}: drop {drop(m):+.2f} pts (target <= 0.3), {m['speedup_vs_source']:.2f}x the speed of its "
                  f"fp32 source on {m['runtime']} (target >= 1.0)")
    best = search_record["trials"][search_record["best"]]
    print(f"search: {len(search_record['trials'])} trials in {stage_times['search']:.0f} s (target <= 20 trials, "
          f"<= 900 s); best {best['steps']} {'within' if search_record['found'] else 'NOT within'} "
          f"{search_record['max_accuracy_drop']} pts on validation")


if __name__ == "__main__":
    main()
