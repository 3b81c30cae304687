"""The GX validation suite: clean data passes; each kind of bad data is named; nothing is trained on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.io import read_split
from tasks.params import DataParams, from_dict
from tasks.validate import ValidationFailed, require_validated, run_validation
from tasks.workspace import write_params
from tests.conftest import TINY_PARAMS

DATA = from_dict(DataParams, TINY_PARAMS["data"], "data")


def corrupted_copy(digits_dir, tmp_path, split: str, change) -> Path:
    out = tmp_path / "prepared"
    shutil.copytree(digits_dir, out)
    X, y = read_split(out, split)
    X, y = change(X.copy(), y.copy())
    np.save(out / f"X_{split}.npy", X)
    np.save(out / f"y_{split}.npy", y)
    return out


def test_clean_data_passes_and_writes_report(digits_dir, tmp_path):
    summary = run_validation(digits_dir, DATA, tmp_path / "validation.json", tmp_path / "docs")
    assert summary["success"] and summary["failures"] == []
    assert json.loads((tmp_path / "validation.json").read_text())["success"] is True
    assert (tmp_path / "docs" / "index.html").is_file()
    require_validated(tmp_path / "validation.json")


def set_nan(X, y):
    X[3, 0, 2, 2] = np.nan
    X[7, 0, 1, 1] = np.nan
    return X, y


def set_inf(X, y):
    X[0, 0, 0, 0] = np.inf
    return X, y


def label_outside(X, y):
    y[:4] = 11
    return X, y


def drop_class(X, y):
    keep = y != 9
    return X[keep], y[keep]


def wrong_shape(X, y):
    return X.reshape(len(X), -1)[:, :60], y


def wrong_dtype(X, y):
    return X.astype(np.float64), y


def wrong_label_dtype(X, y):
    return X, y.astype(np.int32)


def out_of_range(X, y):
    X[5] = 2.0
    return X, y


@pytest.mark.parametrize("split, change, expected", [
    ("train", set_nan, "train: features have no NaN or inf: 2 of"),
    ("test", set_inf, "test: features have no NaN or inf: 1 of"),
    ("validation", label_outside, "validation: labels from the declared classes [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]: 4 of"),
    ("test", drop_class, "test: every declared class present: class 9 has 0 samples in test (135 in total)"),
    ("train", wrong_shape, "train: samples have the declared shape [1, 8, 8]"),
    ("validation", wrong_dtype, "validation: features are float32"),
    ("test", wrong_label_dtype, "test: labels are int64: observed int32"),
    ("train", out_of_range, "train: feature values within [0, 1] (maximum): 1 of"),
])
def test_bad_data_fails_with_each_problem_named(digits_dir, tmp_path, split, change, expected):
    prepared = corrupted_copy(digits_dir, tmp_path, split, change)
    with pytest.raises(ValidationFailed) as error:
        run_validation(prepared, DATA, tmp_path / "validation.json", tmp_path / "docs")
    assert expected in str(error.value)
    result = json.loads((tmp_path / "validation.json").read_text())
    assert result["success"] is False and any(expected in f for f in result["failures"])
    with pytest.raises(ValidationFailed):
        require_validated(tmp_path / "validation.json")


def test_failed_validation_stops_training_and_writes_no_model(digits_dir, tmp_path, monkeypatch):
    from tasks import train_teacher, validate

    prepared = corrupted_copy(digits_dir, tmp_path, "train", set_nan)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, TINY_PARAMS)
    with pytest.raises(ValidationFailed, match="features have no NaN or inf"):
        validate.run([str(prepared), "validation.json", "docs"])
    with pytest.raises(ValidationFailed, match="has not passed validation"):
        train_teacher.run([str(prepared), "validation.json", "teacher.safetensors", "curves.csv", "metrics.json"])
    assert not (tmp_path / "teacher.safetensors").exists()
