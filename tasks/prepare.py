"""Stage `prepare`: load the dataset named in params, normalise it, split it.

Sources: sklearn's `digits` (the default, no download), an NPZ file (`X`, `y`),
a CSV file (feature columns + a label column), or an IDX gzip pair like MNIST.
Output: `X_<split>.npy` (float32) and `y_<split>.npy` (int64) for train, validation
and test, and `schema.json` (sample shape, dtype, classes, split sizes). Plain .npy
rather than .npz: zip entries carry timestamps, and equal data must hash equal.

Problems that make the file unreadable raise `DataError` here; problems in
readable data (NaN, labels outside the class set, ...) are left for `validate`,
which reports all of them at once.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from tasks.io import atomic_path, run_main, write_json
from tasks.params import DataParams, load_section
from tasks.text import encode_counting_cut, load_tokenizer, normalise_text, pad_id, sha256_text

SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """The input data cannot be read or is structurally wrong."""


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return digits.images, digits.target


# What a file holds, from its first bytes: NPZ files are zip archives, anything else is named.
_SIGNATURES = {
    b"\x93NUMPY": "a single .npy array (np.save), not an NPZ archive of X and y (np.savez)",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"\x1f\x8b": "gzip-compressed data",
    b"\x80": "a Python pickle",
}


def npz_signature_problem(path: Path) -> str | None:
    """Why the file cannot be an NPZ archive, judged by its first bytes; None if it starts like a zip."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):
        return None
    for signature, kind in _SIGNATURES.items():
        if head.startswith(signature):
            return f"it is {kind}"
    return f"it does not start with a zip signature (first bytes {head[:4].hex(' ')})"


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    problem = npz_signature_problem(path)
    if problem:
        raise DataError(f"{path}: not a readable NPZ file: {problem}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"X", "y"} - set(f.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; found {sorted(f.files)}")
            return f["X"], f["y"]
    except DataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):  # allow_pickle=False refuses object arrays: text or mixed columns
            raise DataError(f"{path}: arrays must be numeric, not Python objects") from None
        raise DataError(f"{path}: not a readable NPZ file ({e})") from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable NPZ file ({e or type(e).__name__})") from None


def read_csv_frame(path: Path):
    """A CSV file as a pandas frame, with unreadable files, header-only files and incomplete rows named."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except pd.errors.ParserError as e:
        require_complete_rows(path)
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    if frame.empty:
        raise DataError(f"{path}: has a header but no rows")
    # pandas fills a short row with NaN, and takes a longer first row as an index column: both shift values.
    if frame.isna().to_numpy().any() or not frame.index.equals(pd.RangeIndex(len(frame))):
        require_complete_rows(path)
    return frame


def csv_features(path: Path, frame, label_column: str) -> np.ndarray:
    """The feature columns (all but the label column, if present), which must be numeric."""
    features = frame.drop(columns=[label_column], errors="ignore")
    non_numeric = [c for c in features.columns if not np.issubdtype(features[c].dtype, np.number)]
    if non_numeric:
        raise DataError(f"{path}: feature column(s) {non_numeric[:10]} are not numeric")
    return features.to_numpy()


def load_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    frame = read_csv_frame(path)
    if label_column not in frame.columns:
        raise DataError(f"{path}: label column '{label_column}' not found; columns are {list(frame.columns)[:10]}")
    return csv_features(path, frame, label_column), frame[label_column].to_numpy()


def require_complete_rows(path: Path) -> None:
    """Name the file lines whose row has fewer or more fields than the header, or an empty one."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(row for row in reader if row)  # blank lines are skipped, as pandas does
        bad = [reader.line_num for row in reader
               if row and (len(row) != len(header) or any(not value.strip() for value in row))]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(f"{path}: line(s) {shown}: missing or extra fields (the header has {len(header)})")


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed): magic, dims, then the data.

    The magic is checked before the header's sizes are believed, so a file that is not IDX,
    or declares the wrong type or number of dimensions, is reported as a bad magic rather
    than as a huge shape read from data bytes. `ndim`, when given, is the required dimension count.
    """
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e or 'truncated gzip stream'})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: file is empty or too short for an IDX header")
    magic = f"0x{raw[:4].hex()}"
    zero, type_code, declared_ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in _IDX_DTYPES or declared_ndim == 0 or (ndim and declared_ndim != ndim):
        raise DataError(f"{path}: bad IDX magic {magic} (expected 0x0000, a type byte 08, 09, 0B, 0C, 0D or 0E, "
                        f"then the number of dimensions{f', which must be {ndim:02x}' if ndim else ''})")
    header = 4 + 4 * declared_ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(declared_ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    if len(raw) < header or len(raw) != header + math.prod(dims) * dtype.itemsize:
        fitting = idx_layout_fitting(raw)
        if fitting:
            fitting_magic, fitting_dims, fitting_dtype = fitting
            raise DataError(f"{path}: bad IDX magic {magic}: the file's size fits magic 0x{fitting_magic.hex()} "
                            f"(shape {fitting_dims}, {fitting_dtype.name})")
        raise DataError(f"{path}: IDX header declares shape {dims} of {dtype.name} "
                        f"({header + math.prod(dims) * dtype.itemsize} bytes) but the file has {len(raw)} bytes "
                        "(truncated, or the magic is wrong)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def idx_layout_fitting(raw: bytes) -> tuple[bytes, tuple[int, ...], np.dtype] | None:
    """The IDX magic (with its shape and dtype) whose header agrees with the file size, if one does."""
    for ndim in range(1, 5):
        header = 4 + 4 * ndim
        dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        for type_code, name in _IDX_DTYPES.items():
            dtype = np.dtype(name)
            if len(raw) >= header and len(raw) == header + math.prod(dims) * dtype.itemsize:
                return bytes([0, 0, type_code, ndim]), dims, dtype
    return None


def load_source(params: DataParams) -> tuple[np.ndarray, np.ndarray]:
    if params.source == "digits":
        return load_digits()
    path = Path(params.path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (params.yaml:data.path)")
    if params.source == "npz":
        return load_npz(path)
    if params.source == "csv":
        return load_csv(path, params.label_column)
    labels_path = Path(params.labels_path)
    if not labels_path.is_file():
        raise DataError(f"{labels_path}: file not found (params.yaml:data.labels_path)")
    return read_idx(path), read_idx(labels_path, ndim=1)


def normalise(X: np.ndarray, y: np.ndarray, params: DataParams, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale features to [0, 1] from the declared raw range; shape samples as declared."""
    if X.ndim < 2 or X.size == 0:
        raise DataError(f"{origin}: X must hold at least one sample with features, got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise DataError(f"{origin}: y must be one label per sample: X has {len(X)} samples, y has shape {y.shape}")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise DataError(f"{origin}: X has dtype {X.dtype}; expected numbers")
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{origin}: labels have dtype {y.dtype}; expected integers")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise DataError(f"{origin}: labels must be whole numbers; found {y[~np.isfinite(y) | (y != np.round(y))][:5]}")
    low, high = params.value_range
    X = ((X.astype(np.float64) - low) / (high - low)).astype(np.float32)
    per_sample = int(np.prod(X.shape[1:]))
    # Samples whose size does not match the declared shape are kept flat, for validate to report.
    shape = params.input_shape if per_sample == int(np.prod(params.input_shape)) else [per_sample]
    return X.reshape(len(X), *shape), y.astype(np.int64)


def split_sizes(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of `n` samples each split gets: largest-remainder rounding, so no sample is lost
    to rounding (all `n` are placed when the fractions sum to 1) and each split is within one
    sample of its exact share. Ties go to the earlier split in SPLITS, so the result is deterministic."""
    quotas = [n * fractions[s] for s in SPLITS]
    sizes = [math.floor(q + 1e-9) for q in quotas]  # 1e-9: 0.29 * 100 is 28.999..., not below 29
    placed = min(n, round(n * sum(fractions.values())))
    by_remainder = sorted(range(len(SPLITS)), key=lambda i: sizes[i] - quotas[i])
    for i in by_remainder[: max(0, placed - sum(sizes))]:
        sizes[i] += 1
    return dict(zip(SPLITS, sizes))


def min_class_size(fractions: dict[str, float]) -> int:
    """The smallest class size from which every larger class also gets a sample in every split."""
    n = math.ceil(1 / min(fractions.values()))  # from here on every split's exact share is at least one
    while n > 1 and min(split_sizes(n - 1, fractions).values()) >= 1:
        n -= 1
    return n


def stratified_split(y: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Seeded per-class split: each class is divided in the given proportions (`split_sizes`).

    A class too small to reach every split is left missing there, for validate to report,
    instead of being silently oversampled.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        sizes = split_sizes(len(members), fractions)
        n_test, n_val = sizes["test"], sizes["validation"]
        parts["test"].append(members[:n_test])
        parts["validation"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val : n_test + n_val + sizes["train"]])
    return {s: np.sort(np.concatenate(parts[s])) for s in SPLITS}


def load_text_csv(path: Path, text_column: str, label_column: str) -> tuple[list[str], np.ndarray]:
    """The texts and labels of a CSV file (gzip-compressed too), read as strings: an empty text stays
    an empty string, for validate to report, instead of becoming NaN."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: file not found (params.yaml:data.path)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    missing = [c for c in (text_column, label_column) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found (params.yaml:data.text_column, "
                        f"data.label_column); columns are {list(frame.columns)[:10]}")
    if frame.empty:
        raise DataError(f"{path}: has a header but no rows")
    return frame[text_column].tolist(), frame[label_column].to_numpy(dtype=str)


def group_texts(texts: list[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Rows with the same normalised text form one group, so they land in one split. Returns each row's
    group, each group's label (its most frequent; ties: the first in sorted order) and the groups whose
    rows disagree on the label."""
    keys = [normalise_text(t) for t in texts]
    unique_keys, group = np.unique(np.asarray(keys, dtype=str), return_inverse=True)
    group_labels = np.empty(len(unique_keys), dtype=labels.dtype)
    conflicts = []
    for g in np.flatnonzero(np.bincount(group) > 1):
        rows = np.flatnonzero(group == g)
        values, counts = np.unique(labels[rows], return_counts=True)
        if len(values) > 1:
            conflicts.append({"text": texts[rows[0]], "rows": len(rows),
                              "labels": {str(v): int(c) for v, c in zip(values, counts)}})
        group_labels[g] = values[np.argmax(counts)]
    single_rows = np.flatnonzero(np.bincount(group)[group] == 1)
    group_labels[group[single_rows]] = labels[single_rows]
    return group, group_labels, conflicts


def prepare_text(params: DataParams, pretrained_dir: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Text: group duplicates, split the groups stratified by label, tokenize with the pretrained model's
    own tokenizer. Conflicting labels are kept (each row its own) and reported in the schema."""
    tokenizer_path = Path(pretrained_dir) / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path}: not found; text data needs a pretrained model "
                        "(params.yaml:pretrained) whose tokenizer turns texts into token ids")
    tokenizer_json = tokenizer_path.read_text()
    tokenizer = load_tokenizer(tokenizer_json, params.max_length, str(tokenizer_path))
    pad = pad_id(tokenizer_json)
    texts, labels = load_text_csv(Path(params.path), params.text_column, params.label_column)
    group, group_labels, conflicts = group_texts(texts, labels)
    group_split = stratified_split(group_labels, params.split, params.seed)
    splits, truncated = {}, {}
    for name, groups in group_split.items():
        rows = np.flatnonzero(np.isin(group, groups))
        split_texts = [texts[i] for i in rows]
        X, truncated[name] = encode_counting_cut(tokenizer, split_texts, params.max_length, pad)
        splits[name] = {"X": X, "y": labels[rows], "text": np.asarray(split_texts, dtype=str)}
    duplicated = np.bincount(group) > 1
    schema = {
        "source": params.source,
        "modality": "text",
        "input_shape": [params.max_length],
        "dtype": "int64",
        "label_dtype": "str",
        "classes": params.classes,
        "max_length": params.max_length,
        "pad_id": pad,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": sha256_text(tokenizer_json),
        "sizes": {s: len(arrays["y"]) for s, arrays in splits.items()},
        "duplicates": {"texts": int(duplicated.sum()), "rows": int(duplicated[group].sum())},
        "conflicts": conflicts,
        "truncated": truncated,
    }
    return splits, schema


def prepare(params: DataParams, pretrained_dir: Path | None = None) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Load, normalise and split; returns the arrays per split and the schema."""
    if params.is_text:
        return prepare_text(params, pretrained_dir or Path("models/pretrained"))
    origin = params.path or f"sklearn {params.source}"
    X, y = normalise(*load_source(params), params, origin)
    index = stratified_split(y, params.split, params.seed)
    splits = {s: {"X": X[idx], "y": y[idx]} for s, idx in index.items()}
    schema = {
        "source": params.source,
        "input_shape": list(X.shape[1:]),
        "dtype": str(X.dtype),
        "label_dtype": str(y.dtype),
        "classes": params.classes,
        "value_range": [0.0, 1.0],
        "sizes": {s: int(len(idx)) for s, idx in index.items()},
    }
    return splits, schema


def write_prepared(out_dir: Path, splits: dict[str, dict[str, np.ndarray]], schema: dict,
                   tokenizer_json: str | None = None) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, arrays in splits.items():
            for key, array in arrays.items():
                np.save(tmp / f"{key}_{name}.npy", array)
        write_json(tmp / "schema.json", schema)
        if tokenizer_json is not None:  # text: the tokenizer that made the ids travels with them
            (tmp / "tokenizer.json").write_text(tokenizer_json)


def run(argv: list[str] | None = None) -> None:
    """The stage as dvc.yaml runs it: paths from the command line, params from params.yaml."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrained"),
                        help="text: the pretrained model directory whose tokenizer.json tokenizes the texts")
    args = parser.parse_args(argv)
    splits, schema = prepare(load_section("data", DataParams), args.pretrained)
    text = schema.get("modality") == "text"
    write_prepared(args.out_dir, splits, schema, (args.pretrained / "tokenizer.json").read_text() if text else None)
    print(f"prepared {schema['sizes']} samples of shape {schema['input_shape']} -> {args.out_dir}")


if __name__ == "__main__":
    run_main(run)
