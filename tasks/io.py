"""Small file helpers shared by the stages: atomic writes and content hashes.

Every output is written to a temporary name beside its target and renamed into
place, so a crash or a rejected input never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import traceback
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
# Exit status of a stage cut off by a failure a retry may pass (sysexits.h EX_TEMPFAIL): storage, network.
EXIT_TRANSIENT = 75
# Besides ConnectionError and TimeoutError (resets, refusals, timeouts): I/O errors of a flaky disk or network mount.
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ESTALE, errno.ENETUNREACH, errno.EHOSTUNREACH}


def is_transient(error: BaseException) -> bool:
    """A failure of the outside world that may pass on a retry (storage, network), not a bug or bad input."""
    # Not imported: every stage would depend on tasks/storage.py. A process that raised it has imported it.
    storage = sys.modules.get("tasks.storage")
    if storage is not None and isinstance(error, storage.StorageUnavailable):
        return True
    return isinstance(error, (ConnectionError, TimeoutError)) or (
        isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS)


def run_main(run: Callable[[], None]) -> None:
    """Run a stage from the command line. Bad input or params exit EXIT_REJECTED with one clear message,
    transient failures EXIT_TRANSIENT; anything else is a crash (exit 1, traceback), never retried."""
    try:
        run()
    except ValueError as e:  # DataError, ParamsError, ValidationFailed are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_REJECTED)
    except Exception as e:
        if not is_transient(e):
            raise
        traceback.print_exc()
        print(f"error (transient, a retry may pass): {e}", file=sys.stderr)
        sys.exit(EXIT_TRANSIENT)
