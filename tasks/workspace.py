"""A scratch copy of the pipeline (code, architectures, dvc.yaml, DVC config) for tests and benchmarks.

Runs there use the real DVC CLI without touching this checkout's outputs or cache.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ("dvc.yaml", ".dvcignore", ".gitignore", "prefect.toml", "prefect.yaml")
PIPELINE_DIRS = ("tasks/", "flows/", "architectures/", "data/raw/", ".dvc/")


def copy_pipeline(dest: Path, params: dict) -> Path:
    """Copy the tracked (and new, unignored) pipeline files to `dest`, write `params`, make it a git repo."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (name.startswith(PIPELINE_DIRS) or name in PIPELINE_FILES) and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    write_params(dest, params)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def write_params(directory: Path, params: dict) -> None:
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
