"""The GX suite on text data: clean texts pass; each kind of bad text is named with its split, check and rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.params import DataParams, from_dict
from tasks.validate import ValidationFailed, require_validated, run_validation

MAX_LENGTH, PAD = 6, 0
TEXT = from_dict(DataParams, {
    "source": "csv", "path": "texts.csv", "text_column": "text", "label_column": "label",
    "classes": ["act", "animal"], "max_length": MAX_LENGTH, "text_chars": [1, 50],
    "split": {"train": 0.5, "validation": 0.25, "test": 0.25}}, "data")
CLEAN = {
    "train": [("The cat sat", "animal"), ("run fast now", "act"), ("a dog barks", "animal"),
              ("jump over it and back again today", "act")],  # cut at max_length: the truncated row
    "validation": [("an owl hoots", "animal"), ("swim", "act"), ("sing a song", "act")],
    "test": [("a fox", "animal"), ("write it down", "act"), ("read a book", "act")],
}
SCHEMA = {"modality": "text", "input_shape": [MAX_LENGTH], "dtype": "int64", "classes": ["act", "animal"],
          "pad_id": PAD, "max_length": MAX_LENGTH, "conflicts": [{"text": "swim", "rows": 2, "labels": {"act": 1}}],
          "duplicates": {"texts": 1, "rows": 2}, "truncated": {"train": 1, "validation": 0, "test": 0}}


def token_ids(texts: list[str]) -> np.ndarray:
    """A stand-in tokenizer: [CLS]=1, a made-up id per word, [SEP]=2, cut at MAX_LENGTH, right-padded."""
    ids = np.full((len(texts), MAX_LENGTH), PAD, dtype=np.int64)
    for row, text in enumerate(texts):
        tokens = [1, *(3 + sum(map(ord, word)) for word in text.split())][: MAX_LENGTH - 1] + [2]
        ids[row, : len(tokens)] = tokens
    return ids


def write_text_dir(tmp_path: Path, change=None) -> Path:
    """A prepared text directory as prepare writes it; `change(split, texts, labels)` edits a split first."""
    out = tmp_path / "prepared"
    out.mkdir()
    for split, rows in CLEAN.items():
        texts, labels = [t for t, _ in rows], [label for _, label in rows]
        if change:
            change(split, texts, labels)
        np.save(out / f"X_{split}.npy", token_ids(texts))
        np.save(out / f"y_{split}.npy", np.asarray(labels, dtype=str))
        np.save(out / f"text_{split}.npy", np.asarray(texts, dtype=str))
    (out / "schema.json").write_text(json.dumps(SCHEMA))
    return out


def test_clean_text_passes_with_warnings(tmp_path):
    summary = run_validation(write_text_dir(tmp_path), TEXT, tmp_path / "validation.json", tmp_path / "docs")
    assert summary["success"] and summary["failures"] == []
    assert summary["warnings"] == {"conflicting_labels": 1, "duplicates": {"texts": 1, "rows": 2},
                                   "truncated": {"train": 1, "validation": 0, "test": 0}}
    assert summary["class_counts"] == {"act": {"train": 2, "validation": 2, "test": 2},
                                       "animal": {"train": 2, "validation": 1, "test": 1}}
    assert not any("near-duplicate" in c["check"] for c in summary["checks"])  # token ids have no distance
    assert (tmp_path / "docs" / "index.html").is_file()
    require_validated(tmp_path / "validation.json")


def blank_text(split, texts, labels):
    if split in ("train", "test"):  # blank in two splits: named by the split check, not as a leak
        texts[2] = "   \t"


def long_text(split, texts, labels):
    if split == "validation":
        texts[1] = "a" * 60


def unknown_label(split, texts, labels):
    if split == "test":
        labels[2] = "plant"


def no_animal(split, texts, labels):
    if split == "validation":
        labels[0] = "act"


def empty_test(split, texts, labels):
    if split == "test":
        texts.clear()
        labels.clear()


def leaked_text(split, texts, labels):
    if split == "test":
        texts[2] = "  the CAT\tsat "  # train row 0, up to case and whitespace


@pytest.mark.parametrize("change, expected", [
    (blank_text, "train: texts are not empty or whitespace-only: 1 of 4 rows fail (rows 2 '   \\t')"),
    (long_text, ("validation: texts have 1 to 50 characters (data.text_chars): 1 of 3 rows fail "
                f"(rows 1 '{'a' * 39}…'; values 60)")),
    (unknown_label, ("test: labels from the declared classes ['act', 'animal']: 1 of 3 rows fail "
                    "(rows 2 'read a book'; values plant)")),
    (empty_test, "test: split is empty"),
    (no_animal, "validation: every declared class present: class animal has 0 samples in validation (3 in total"),
    (leaked_text, ("train/test: no test text equal to a train text (ignoring case, whitespace and Unicode forms): "
                  "1 of 3 rows: test row 2 = train row 0 '  the CAT\\tsat '")),
])
def test_bad_text_fails_with_each_problem_named(tmp_path, change, expected):
    with pytest.raises(ValidationFailed) as error:
        run_validation(write_text_dir(tmp_path, change), TEXT, tmp_path / "validation.json", tmp_path / "docs")
    assert expected in str(error.value)
    result = json.loads((tmp_path / "validation.json").read_text())
    assert result["success"] is False and any(expected in f for f in result["failures"])
    if change is blank_text:
        assert "test: texts are not empty or whitespace-only" in str(error.value)
        assert result["leakage"] == {}
    if change is no_animal:
        assert result["class_counts"]["animal"] == {"train": 2, "validation": 0, "test": 1}
    if change is leaked_text:
        assert result["leakage"] == {"train/test": {"identical": [
            {"test_row": 2, "train_row": 0, "text": "  the CAT\tsat "}]}}
    with pytest.raises(ValidationFailed):
        require_validated(tmp_path / "validation.json")


@pytest.mark.parametrize("corrupt, expected", [
    (lambda out: np.save(out / "X_test.npy", np.load(out / "X_test.npy").astype(np.int32)),
     "test: token ids are int64: 3 of 3 rows fail"),
    (lambda out: np.save(out / "X_train.npy", np.load(out / "X_train.npy")[:, :4]),
     "train: token ids have the declared width 6 (data.max_length): 4 of 4 rows fail"),
])
def test_token_ids_of_the_wrong_kind_are_named(tmp_path, corrupt, expected):
    out = write_text_dir(tmp_path)
    corrupt(out)
    with pytest.raises(ValidationFailed, match="data validation failed") as error:
        run_validation(out, TEXT, tmp_path / "validation.json", tmp_path / "docs")
    assert expected in str(error.value)


@pytest.mark.parametrize("corrupt, expected", [
    (lambda out: np.save(out / "text_validation.npy", np.asarray(["one", "two"])),
     "text_validation.npy: 2 texts, but X_validation.npy has 3 rows and y_validation.npy 3 labels"),
    (lambda out: np.save(out / "text_test.npy", np.asarray(["a fox", None, "x"], dtype=object)),
     "text_test.npy: not a numpy unicode array"),
    (lambda out: (out / "text_train.npy").unlink(), "text_train.npy: not found"),
    (lambda out: (out / "schema.json").write_text(json.dumps({"input_shape": [6]})),
     "schema.json: modality 'image', but params.yaml:data.text_column is set"),
    (lambda out: (out / "schema.json").write_text(json.dumps({"modality": "text", "pad_id": 0})),
     "schema.json: text schema lacks ['conflicts', 'duplicates', 'truncated']"),
])
def test_malformed_text_dir_is_refused_naming_the_file(tmp_path, corrupt, expected):
    out = write_text_dir(tmp_path)
    corrupt(out)
    with pytest.raises(ValidationFailed) as error:
        run_validation(out, TEXT, tmp_path / "validation.json", tmp_path / "docs")
    assert expected in str(error.value)
