"""The prepare stage: every source format, normalisation, a seeded stratified split, and unreadable input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from tasks.params import DataParams, ParamsError, from_dict
from tasks.io import EXIT_REJECTED, run_main
from tasks.prepare import min_class_size, prepare, run, split_sizes, stratified_split
from tasks.workspace import write_params
from tests.conftest import TINY_PARAMS


def data_params(**overrides) -> DataParams:
    return from_dict(DataParams, {**TINY_PARAMS["data"], **overrides}, "data")


def write_idx(path, array: np.ndarray, type_code: int = 0x08) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1").tobytes())


def test_digits_split_is_stratified_normalised_and_seeded():
    splits, schema = prepare(data_params())
    assert schema["input_shape"] == [1, 8, 8] and schema["dtype"] == "float32"
    assert schema["sizes"] == {"train": 1078, "validation": 269, "test": 450}
    for split in splits.values():
        assert set(np.unique(split["y"])) == set(range(10))
        assert 0.0 <= split["X"].min() and split["X"].max() <= 1.0
    again, _ = prepare(data_params())
    assert all(np.array_equal(splits[s]["y"], again[s]["y"]) for s in splits)
    other, _ = prepare(data_params(seed=1))
    assert not np.array_equal(splits["test"]["X"], other["test"]["X"])


def test_split_fractions_hold_per_class():
    y = np.repeat(np.arange(3), 100)
    index = stratified_split(y, {"train": 0.6, "validation": 0.1, "test": 0.3}, seed=0)
    assert [len(index[s]) for s in ("train", "validation", "test")] == [180, 30, 90]
    assert len(set(np.concatenate(list(index.values())))) == 300


def test_split_places_every_sample_each_class_within_one_of_its_share():
    # The class sizes of the MNIST test set: per-class rounding used to drop a sample (9,999 of 10,000).
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    y = np.repeat(np.arange(10), counts)
    fractions = {"train": 0.6, "validation": 0.1, "test": 0.3}
    index = stratified_split(y, fractions, seed=0)
    assert np.array_equal(np.sort(np.concatenate(list(index.values()))), np.arange(len(y)))
    assert {s: len(index[s]) for s in index} == {"train": 5999, "validation": 1001, "test": 3000}
    for label, n in enumerate(counts):
        for split, rows in index.items():
            assert abs(np.sum(y[rows] == label) - n * fractions[split]) < 1, (label, split)
    again = stratified_split(y, fractions, seed=0)
    assert all(np.array_equal(index[s], again[s]) for s in index)
    assert split_sizes(4, {"train": 0.6, "validation": 0.15, "test": 0.25}) == {"train": 2, "validation": 1, "test": 1}
    assert min_class_size({"train": 0.6, "validation": 0.15, "test": 0.25}) == 4


def test_npz_csv_and_idx_sources(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 17, size=(200, 8, 8))
    y = np.arange(200) % 10
    np.savez(tmp_path / "d.npz", X=X, y=y)
    splits, schema = prepare(data_params(source="npz", path=str(tmp_path / "d.npz")))
    assert schema["input_shape"] == [1, 8, 8]

    flat = X.reshape(200, 64)
    header = ",".join(f"f{i}" for i in range(64)) + ",digit"
    rows = [",".join(map(str, r)) + f",{label}" for r, label in zip(flat, y)]
    (tmp_path / "d.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    splits_csv, _ = prepare(data_params(source="csv", path=str(tmp_path / "d.csv"), label_column="digit"))
    assert np.array_equal(splits_csv["test"]["X"], splits["test"]["X"])

    write_idx(tmp_path / "x.gz", X)
    write_idx(tmp_path / "y.gz", y)
    splits_idx, _ = prepare(data_params(source="idx", path=str(tmp_path / "x.gz"), labels_path=str(tmp_path / "y.gz")))
    assert np.array_equal(splits_idx["train"]["X"], splits["train"]["X"])


def corrupt_inputs(tmp_path):
    """(params overrides, expected words in the error) for inputs that cannot be read."""
    X = np.zeros((50, 8, 8))
    y = np.arange(50) % 10
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "empty.gz").write_bytes(gzip.compress(b""))
    write_idx(tmp_path / "x.gz", X)
    write_idx(tmp_path / "y.gz", y)
    (tmp_path / "truncated.gz").write_bytes((tmp_path / "x.gz").read_bytes()[:40])
    np.savez(tmp_path / "text.npz", X=np.array([["a"] * 64] * 50), y=y)
    np.savez(tmp_path / "objects.npz", X=np.array([None] * 50, dtype=object), y=y)
    np.savez(tmp_path / "short_y.npz", X=X, y=y[:10])
    np.savez(tmp_path / "float_y.npz", X=X, y=y + 0.5)
    np.savez(tmp_path / "no_y.npz", X=X)
    np.savez(tmp_path / "no_features.npz", X=np.zeros((50, 0)), y=y)
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "no_y.npz").read_bytes()[:100])
    return [
        ({"source": "csv", "path": "empty.csv"}, "empty.csv: file is empty"),
        ({"source": "npz", "path": "empty.npz"}, "empty.npz: not a readable NPZ file"),
        ({"source": "idx", "path": "empty.gz", "labels_path": "y.gz"}, "empty.gz: file is empty"),
        ({"source": "idx", "path": "truncated.gz", "labels_path": "y.gz"}, "truncated.gz: cannot read"),
        ({"source": "npz", "path": "text.npz"}, "X has dtype <U1; expected numbers"),
        ({"source": "npz", "path": "objects.npz"}, "must be numeric, not Python objects"),
        ({"source": "npz", "path": "short_y.npz"}, "X has 50 samples, y has shape (10,)"),
        ({"source": "npz", "path": "float_y.npz"}, "labels must be whole numbers"),
        ({"source": "npz", "path": "no_y.npz"}, "missing array(s) ['y']"),
        ({"source": "npz", "path": "no_features.npz"}, "at least one sample with features, got shape (50, 0)"),
        ({"source": "npz", "path": "truncated.npz"}, "truncated.npz: not a readable NPZ file (File is not a zip file)"),
        ({"source": "npz", "path": "missing.npz"}, "missing.npz: file not found"),
    ]


def test_unreadable_input_is_rejected_by_name_and_writes_nothing(tmp_path, capsys, monkeypatch):
    cases = corrupt_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    for overrides, expected in cases:
        write_params(tmp_path, {"data": {**TINY_PARAMS["data"], **overrides}})
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda: run(["prepared"]))
        assert exit_info.value.code == EXIT_REJECTED
        message = capsys.readouterr().err
        assert expected in message, (overrides, message)
        assert not (tmp_path / "prepared").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


@pytest.mark.parametrize("overrides, expected", [
    ({"source": "parquet"}, "data.source: must be digits, npz, csv or idx"),
    ({"split": {"train": 0.9, "validation": 0.1, "test": 0.2}}, "data.split: fractions must be positive and sum"),
    ({"classes": [1, 1]}, "data.classes: need at least two distinct classes"),
    ({"seed": "zero"}, "data.seed: expected int"),
    ({"colour": 1}, "unknown field(s) ['colour']"),
])
def test_bad_data_params_are_named(overrides, expected):
    with pytest.raises(ParamsError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        data_params(**overrides)
