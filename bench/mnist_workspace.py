"""A scratch copy of the pipeline set up for the MNIST benchmark configuration (bench/mnist.yaml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.workspace import copy_pipeline  # noqa: E402

MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def benchmark_params(config: str = "mnist.yaml") -> dict:
    """params.yaml with the sections bench/<config> sets replaced by the benchmark's."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return params | yaml.safe_load((ROOT / "bench" / config).read_text())


def mnist_workspace(out: Path, mnist_dir: Path = MNIST_DIR, params: dict | None = None) -> Path:
    """A fresh copy of the pipeline at `out` with the benchmark params and the MNIST files in data/raw."""
    shutil.rmtree(out, ignore_errors=True)
    workspace = copy_pipeline(out, params or benchmark_params())
    raw = workspace / "data" / "raw" / "mnist"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy2(mnist_dir / name, raw / name)
    return workspace


def timed(command: list[str], cwd: Path) -> float:
    """Run a command (output shown), return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True)
    return time.perf_counter() - start
