"""Small file helpers shared by the stages: atomic writes and content hashes.

Every output is written to a temporary name beside its target and renamed into
place, so a crash or a rejected input never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success move it to `target` (file or directory)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dir_sha256(path: str | Path) -> str:
    """Hash of a directory's files (names and contents), independent of mtimes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def read_split(prepared_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The (X, y) arrays of one split written by the prepare stage."""
    prepared_dir = Path(prepared_dir)
    return (
        np.load(prepared_dir / f"X_{split}.npy", allow_pickle=False),
        np.load(prepared_dir / f"y_{split}.npy", allow_pickle=False),
    )


# Exit status of a stage that rejected its input or params: rerunning it cannot help.
EXIT_REJECTED = 3


def run_main(run: Callable[[], None]) -> None:
    """Run a stage from the command line; bad input or params exit EXIT_REJECTED with one clear message."""
    try:
        run()
    except ValueError as e:  # DataError, ParamsError, ValidationFailed are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_REJECTED)
