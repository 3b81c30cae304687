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


if __name__ == "__main__":
    main()
