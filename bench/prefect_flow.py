"""Benchmark: the Prefect flow on the MNIST benchmark configuration.

1. Overhead: the flow (every stage forced, one worker, so nothing overlaps) against
   the same stage functions called directly, one after another, in one process.
2. A no-op rerun from a fresh process: local ephemeral API start included, nothing retrained.
3. Parallel branches: the compression branches (compress@<recipe>, their outputs
   deleted so they are stale) rerun on a 2-worker local Dask cluster against one worker.

    python bench/prefect_flow.py
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import time
from pathlib import Path

from mnist_workspace import ROOT, benchmark_params, mnist_workspace, timed

from flows.stages import load_stages, topological_order
from tasks.workspace import write_params


def run_direct(workspace: Path) -> float:
    """Every stage's run() in this process, in dependency order."""
    os.chdir(workspace)
    stages = load_stages()
    start = time.perf_counter()
    for name in topological_order(stages):
        importlib.import_module(stages[name].module).run(stages[name].argv)
    return time.perf_counter() - start


def run_flow(workspace: Path, extra: list[str]) -> float:
    return timed([sys.executable, "-m", "flows.pipeline", *extra], workspace)


def main() -> None:
    out = ROOT / "bench" / "out" / "prefect"
    params = benchmark_params()
    params["orchestration"] = {"task_runner": "thread", "workers": 1}
    workspace = mnist_workspace(out, params=params)
    os.environ["TQDM_DISABLE"] = "1"
    direct = run_direct(workspace)
    sequential_flow = run_flow(workspace, ["--force"])
    noop = run_flow(workspace, [])

    recipes = list(params["compress"]["recipes"])

    def rerun_branches(orchestration: dict) -> float:
        for recipe in recipes:
            shutil.rmtree(workspace / "models" / "candidates" / recipe)
        params["orchestration"] = orchestration
        write_params(workspace, params)
        return run_flow(workspace, [])

    sequential_branches = rerun_branches({"task_runner": "thread", "workers": 1})
    dask_branches = rerun_branches({"task_runner": "dask", "workers": 2})

    print("\n== Prefect flow on the MNIST benchmark configuration ==")
    print(f"stage functions called directly, one process : {direct:7.1f} s")
    print(f"flow, every stage, 1 worker (thread runner)  : {sequential_flow:7.1f} s   "
          f"overhead {100 * (sequential_flow - direct) / direct:+.1f} % (target <= 10 %)")
    print(f"no-op rerun, fresh process + ephemeral API   : {noop:7.1f} s   (target <= 15 s)")
    print(f"{len(recipes)} compression branches + evaluate + gate, 1 worker : {sequential_branches:7.1f} s")
    print(f"{len(recipes)} compression branches + evaluate + gate, 2-worker Dask cluster : {dask_branches:7.1f} s   "
          f"speed-up {sequential_branches / dask_branches:.2f}x (target >= 1.7x)")


if __name__ == "__main__":
    main()
