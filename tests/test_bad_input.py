"""Bad input that used to slip through: each is refused with a message naming the file, split or
check, and leaves nothing half-written (prepared data untouched, validation.json written, no model)."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tasks import prepare, train_teacher, validate
from tasks.io import EXIT_REJECTED, dir_sha256, read_split, run_main, write_json
from tasks.params import DataParams, from_dict
from tasks.train_student import train_student
from tasks.training import load_split, predict_logits
from tasks.workspace import write_params
from tests.conftest import TINY_PARAMS, model_params, tiny_params


def rejected(stage, capsys) -> str:
    """Run a stage as its command line does; it must exit EXIT_REJECTED; returns its error message."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(stage)
    assert exit_info.value.code == EXIT_REJECTED
    return capsys.readouterr().err


def use_data(tmp_path, **data) -> None:
    params = tiny_params()
    params["data"].update(data)
    write_params(tmp_path, params)


def digits_csv(path, rows: np.ndarray) -> None:
    digits = load_digits()
    header = ",".join(f"f{i}" for i in range(64)) + ",label"
    lines = [",".join(map(str, digits.data[r].astype(int))) + f",{digits.target[r]}" for r in rows]
    path.write_text(header + "\n" + "\n".join(lines) + "\n")


def few_of_class_7(path) -> None:
    digits = load_digits()
    keep = np.flatnonzero(digits.target != 7)[:300].tolist() + np.flatnonzero(digits.target == 7)[:2].tolist()
    np.savez(path, X=digits.images[keep], y=digits.target[keep])


@pytest.mark.parametrize("make_data, source, expected", [
    # 20 rows, 2 per class: no class reaches the validation split.
    (lambda path: digits_csv(path, np.concatenate([np.flatnonzero(load_digits().target == c)[:2] for c in range(10)])),
     "csv", ["validation: split is empty",
             "validation: every declared class present: classes 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 have 0 samples in "
             "validation (2, 2, 2, 2, 2, 2, 2, 2, 2, 2 in total; data.split needs at least 4 per class)"]),
    (few_of_class_7, "npz", ["validation: every declared class present: class 7 has 0 samples in validation "
                             "(2 in total; data.split needs at least 4 per class)"]),
], ids=["20-row csv", "class with 2 samples"])
def test_empty_split_fails_validation_with_class_counts(tmp_path, capsys, monkeypatch, make_data, source, expected):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / f"data.{source}")
    use_data(tmp_path, source=source, path=f"data.{source}")
    prepare.run(["prepared"])
    write_json(tmp_path / "validation.json", {"success": True})  # a stale pass must not survive
    message = rejected(lambda: validate.run(["prepared", "validation.json", "docs"]), capsys)
    result = json.loads((tmp_path / "validation.json").read_text())
    for sentence in expected:
        assert sentence in message and sentence in result["failures"], (sentence, message)
    assert result["success"] is False and result["class_counts"]["7"]["validation"] == 0
    assert (tmp_path / "docs" / "index.html").is_file()
    rejected(lambda: train_teacher.run(["prepared", "validation.json", "teacher.safetensors", "curves.csv",
                                        "metrics.json"]), capsys)
    assert not (tmp_path / "teacher.safetensors").exists()


def write_idx(path, array: np.ndarray, magic: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(magic + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.astype(">u1").tobytes())


def unreadable_inputs(tmp_path) -> dict[str, tuple[dict, str]]:
    """name -> (data params, expected words in the error)."""
    X, y = np.zeros((50, 8, 8)), np.arange(50) % 10
    np.save(tmp_path / "array.npy", X)
    (tmp_path / "array.npy").rename(tmp_path / "renamed.npz")
    (tmp_path / "image.npz").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(17))
    (tmp_path / "gzipped.npz").write_bytes(gzip.compress(b"X,y\n"))
    (tmp_path / "header.csv").write_text(",".join(f"f{i}" for i in range(64)) + ",label\n")
    digits_csv(tmp_path / "short.csv", np.arange(30))
    lines = (tmp_path / "short.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0]  # a row without its label
    lines[6] = "," + lines[6].split(",", 1)[1]  # an empty field
    (tmp_path / "short.csv").write_text("\n".join(lines) + "\n")
    write_idx(tmp_path / "images.gz", X, bytes([0, 0, 8, 3]))
    write_idx(tmp_path / "labels.gz", y, bytes([0, 0, 8, 1]))
    write_idx(tmp_path / "labels_ndim3.gz", y, bytes([0, 0, 8, 3]))  # used to be read as a 118 MB shape
    write_idx(tmp_path / "images_ndim4.gz", X, bytes([0, 0, 8, 4]))
    idx = {"source": "idx", "path": "images.gz", "labels_path": "labels.gz"}
    return {
        "npy renamed npz": ({"source": "npz", "path": "renamed.npz"},
                            "renamed.npz: not a readable NPZ file: it is a single .npy array"),
        "png as npz": ({"source": "npz", "path": "image.npz"}, "image.npz: not a readable NPZ file: it is a PNG image"),
        "gzip as npz": ({"source": "npz", "path": "gzipped.npz"},
                        "gzipped.npz: not a readable NPZ file: it is gzip-compressed data"),
        "header-only csv": ({"source": "csv", "path": "header.csv"}, "header.csv: has a header but no rows"),
        "short csv row": ({"source": "csv", "path": "short.csv"},
                          "short.csv: line(s) 4, 7: missing or extra fields (the header has 65)"),
        "labels idx magic": ({**idx, "labels_path": "labels_ndim3.gz"},
                             "labels_ndim3.gz: bad IDX magic 0x00000803 (expected 0x0000, a type byte 08, 09, 0B, "
                             "0C, 0D or 0E, then the number of dimensions, which must be 01)"),
        "images idx magic": ({**idx, "path": "images_ndim4.gz"},
                             "images_ndim4.gz: bad IDX magic 0x00000804: the file's size fits magic 0x00000803 "
                             "(shape (50, 8, 8), uint8)"),
    }


@pytest.mark.parametrize("case", ["npy renamed npz", "png as npz", "gzip as npz", "header-only csv",
                                  "short csv row", "labels idx magic", "images idx magic"])
def test_unreadable_file_is_named_and_prepared_data_is_untouched(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    data, expected = unreadable_inputs(tmp_path)[case]
    use_data(tmp_path)
    prepare.run(["prepared"])
    before = dir_sha256(tmp_path / "prepared")
    use_data(tmp_path, **data)
    message = rejected(lambda: prepare.run(["prepared"]), capsys)
    assert expected in message, message
    assert "Traceback" not in message and "declares shape" not in message
    assert dir_sha256(tmp_path / "prepared") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_leakage_between_every_pair_of_splits_is_named_by_row(digits_dir, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(digits_dir, prepared)
    X_train, _ = read_split(prepared, "train")
    X_val, _ = read_split(prepared, "validation")
    X_test, _ = read_split(prepared, "test")
    X_val[0] = X_train[5]
    X_test[1] = X_train[7]
    X_test[2] = X_val[3]
    # A near-duplicate: the same digit on a slightly different value scale (RMS difference 0.0056).
    X_test[3] = X_train[9] * np.float32(0.99)
    np.save(prepared / "X_validation.npy", X_val)
    np.save(prepared / "X_test.npy", X_test)
    before = dir_sha256(prepared)
    params = from_dict(DataParams, TINY_PARAMS["data"], "data")
    with pytest.raises(validate.ValidationFailed) as error:
        validate.run_validation(prepared, params, tmp_path / "validation.json", tmp_path / "docs")
    result = json.loads((tmp_path / "validation.json").read_text())
    expected = [
        "train/validation: no validation sample identical to a train sample: 1 of 269 rows: "
        "validation row 0 = train row 5",
        "train/test: no test sample identical to a train sample: 1 of 450 rows: test row 1 = train row 7",
        "train/test: no test sample a near-duplicate of a train sample (RMS difference <= 0.01, "
        "data.near_duplicate_distance): 1 of 449 rows: test row 3 ~ train row 9 (RMS 0.0056)",
        "validation/test: no test sample identical to a validation sample: 1 of 450 rows: "
        "test row 2 = validation row 3",
    ]
    assert result["failures"] == expected
    assert all(sentence in str(error.value) for sentence in expected)
    assert result["leakage"]["train/test"]["identical"] == [{"test_row": 1, "train_row": 7}]
    assert result["leakage"]["train/test"]["near_duplicates"][0]["train_row"] == 9
    assert dir_sha256(prepared) == before


def test_unsorted_classes_map_labels_by_position(digits_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    np.save(small / "X_train.npy", np.zeros((5, 1), dtype=np.float32))
    np.save(small / "y_train.npy", np.array([3, 1, 2, 3, 1]))
    assert load_split(small, "train", [3, 1, 2]).y.tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match=r"y_train.npy: label\(s\) \[2\] not in the declared classes \[3, 1\]"):
        load_split(small, "train", [3, 1])

    # The same data declared with 0 and 1 swapped: the model's outputs are positions in that list,
    # so predictions read back through it must be the right digits.
    swapped = tmp_path / "swapped"
    shutil.copytree(digits_dir, swapped)
    classes = [1, 0, *range(2, 10)]
    schema = json.loads((swapped / "schema.json").read_text())
    write_json(swapped / "schema.json", {**schema, "classes": classes})
    trained = train_student(swapped, model_params("student", epochs=10))
    X_test, y_test = read_split(swapped, "test")
    predicted = np.asarray(classes)[predict_logits(trained.model, torch.from_numpy(X_test)).argmax(1).numpy()]
    assert trained.config["classes"] == classes
    assert np.mean(predicted == y_test) > 0.85
    assert np.mean(predicted[np.isin(y_test, [0, 1])] == y_test[np.isin(y_test, [0, 1])]) > 0.85
