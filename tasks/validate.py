"""Stage `validate`: a Great Expectations suite over the prepared data.

GX validates tables, so the data becomes tables the checks can be written against:
- one per split, a row per sample with the per-sample facts (label, feature count,
  min/max, count of NaN/inf, dtype);
- `class_counts`, a row per declared class with its sample count in each split, so a
  class missing from a split (or a split with no samples at all) is named with its counts;
- one per pair of splits (train/validation, train/test, validation/test), a row per sample
  of the later split with the row of an identical sample in the earlier split and the
  distance to its nearest neighbour there: leakage, exact and near-duplicate, by row.

Text (`data.text_column` set) has its own per-split table (label, text, characters, tokens) and
leakage tables keyed on the normalised text (case, whitespace and Unicode forms ignored), with
no near-duplicate search; the schema's duplicates, label conflicts and truncations become warnings.

Writes the result as JSON and GX Data Docs (HTML) in every case; on failure it
raises `ValidationFailed` listing each failed check, so no training starts.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.io import atomic_path, read_json, read_split, run_main, write_json
from tasks.params import DataParams, load_section
from tasks.prepare import SPLITS, min_class_size
from tasks.text import lengths, normalise_text

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

# Leakage is checked from each split into every later one: (earlier split, later split).
SPLIT_PAIRS = (("train", "validation"), ("train", "test"), ("validation", "test"))
LEAKAGE_TABLES = [f"{earlier}/{later}" for earlier, later in SPLIT_PAIRS]
SHOWN = 10  # rows or classes named in a failure message; validation.json has them all
TEXT_SHOWN = 40  # characters of a text quoted in a failure message
# What validate needs from a text schema.json beyond the arrays: padding to count tokens, the rest as warnings.
TEXT_SCHEMA_KEYS = ("pad_id", "conflicts", "duplicates", "truncated")


class ValidationFailed(ValueError):
    """The prepared data broke one or more expectations."""


def flatten(X: np.ndarray) -> np.ndarray:
    return X.reshape(len(X), math.prod(X.shape[1:]))  # not -1: an empty split has no size to infer


def sample_table(X: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    flat = flatten(X)
    finite = np.where(np.isfinite(flat), flat, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: reported by n_nonfinite
        x_min, x_max = np.nanmin(finite, axis=1), np.nanmax(finite, axis=1)
    return pd.DataFrame({
        "row": np.arange(len(X)),
        "label": y,
        "n_features": np.full(len(X), flat.shape[1]),
        "n_nonfinite": (~np.isfinite(flat)).sum(axis=1),
        "x_min": x_min,
        "x_max": x_max,
        "x_dtype": str(X.dtype),
    })


def read_text_schema(prepared_dir: Path) -> dict[str, Any]:
    """The text schema.json, refused if prepare wrote images or left out a field validate needs."""
    path = Path(prepared_dir) / "schema.json"
    schema = read_json(path)
    modality = schema.get("modality", "image")  # image schemas predate the key
    if modality != "text":
        raise ValidationFailed(f"{path}: modality {modality!r}, but params.yaml:data.text_column is set; "
                               "rerun prepare with the current params")
    missing = [key for key in TEXT_SCHEMA_KEYS if key not in schema]
    if missing:
        raise ValidationFailed(f"{path}: text schema lacks {missing}")
    return schema


def read_texts(prepared_dir: Path, split: str, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The raw texts of a split: a unicode array, a text per row of X and y."""
    path = Path(prepared_dir) / f"text_{split}.npy"
    if not path.is_file():
        raise ValidationFailed(f"{path}: not found; text data keeps its raw texts beside the token ids")
    try:
        texts = np.load(path, allow_pickle=False)
    except ValueError as e:  # an object array: it could hold None or anything else
        raise ValidationFailed(f"{path}: not a numpy unicode array ({e})") from None
    if texts.dtype.kind != "U" or texts.ndim != 1:
        raise ValidationFailed(f"{path}: must be a 1-D numpy unicode array (dtype '<U..'), "
                               f"got {texts.dtype} of shape {texts.shape}")
    if not len(texts) == len(X) == len(y):
        raise ValidationFailed(f"{path}: {len(texts)} texts, but X_{split}.npy has {len(X)} rows "
                               f"and y_{split}.npy {len(y)} labels")
    return texts


def text_sample_table(X: np.ndarray, y: np.ndarray, texts: np.ndarray, pad: int, max_length: int) -> pd.DataFrame:
    flat = flatten(X)
    n_tokens = lengths(flat, pad)
    return pd.DataFrame({
        "row": np.arange(len(X)),
        "label": y,
        "text": texts,
        "n_chars": np.char.str_len(texts),
        "n_tokens": n_tokens,
        "truncated": n_tokens == max_length,  # filled to max_length: cut, or exactly that long
        "n_features": np.full(len(X), flat.shape[1]),
        "x_dtype": str(X.dtype),
    })


def class_count_table(labels: dict[str, np.ndarray], classes: list[int | str]) -> pd.DataFrame:
    counts = {split: [int(np.sum(y == c)) for c in classes] for split, y in labels.items()}
    return pd.DataFrame({"class": classes, **counts, "total": np.sum(list(counts.values()), axis=0)})


def leakage_table(earlier: str, X_earlier: np.ndarray, later: str, X_later: np.ndarray) -> pd.DataFrame:
    """A row per sample of `later`: the first identical sample in `earlier` (by bytes) and the
    nearest one by root-mean-square feature difference (brute-force nearest neighbour)."""
    from sklearn.neighbors import NearestNeighbors

    ref, query = flatten(X_earlier), flatten(X_later)
    digests = [hashlib.sha1(sample.tobytes()).digest() for sample in ref]
    first_row = {digest: row for row, digest in reversed(list(enumerate(digests)))}
    identical = [first_row.get(hashlib.sha1(q.tobytes()).digest(), pd.NA) for q in query]
    nearest = np.full(len(query), -1)
    rms = np.full(len(query), np.nan)
    # Samples with NaN/inf (reported by the split checks) have no distance; nor do splits of different shapes.
    ref_ok, query_ok = np.isfinite(ref).all(axis=1), np.isfinite(query).all(axis=1)
    if ref.shape[1] == query.shape[1] and ref_ok.any() and query_ok.any():
        ref_rows = np.flatnonzero(ref_ok)
        _, index = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(ref[ref_ok]).kneighbors(query[query_ok])
        nearest[query_ok] = ref_rows[index[:, 0]]
        # The search's distances come from a dot-product expansion; recompute the reported ones exactly.
        diff = query[query_ok].astype(np.float64) - ref[nearest[query_ok]]
        rms[query_ok] = np.sqrt(np.mean(diff * diff, axis=1))
    return pd.DataFrame({
        f"{later}_row": np.arange(len(query)),
        f"identical_{earlier}_row": pd.array(identical, dtype="Int64"),
        f"nearest_{earlier}_row": pd.array(np.where(nearest >= 0, nearest, None), dtype="Int64"),
        "rms_distance": rms,
    })


def text_leakage_table(earlier: str, texts_earlier: np.ndarray, later: str, texts_later: np.ndarray) -> pd.DataFrame:
    """A row per text of `later`: the first text of `earlier` equal to it once normalised."""
    # Blank texts all normalise to "": the split checks report them, they are no leak.
    first_row = {key: row for row, key in reversed(list(enumerate(map(normalise_text, texts_earlier)))) if key}
    identical = [first_row.get(normalise_text(text), pd.NA) for text in texts_later]
    return pd.DataFrame({
        f"{later}_row": np.arange(len(texts_later)),
        f"identical_{earlier}_row": pd.array(identical, dtype="Int64"),
        "text": texts_later,
    })


def split_expectations(params: DataParams) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    n_features = int(np.prod(params.input_shape))
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1, meta={"check": "split is not empty"}),
        E.ExpectColumnValuesToBeInSet(column="n_features", value_set=[n_features],
                                      meta={"check": f"samples have the declared shape {params.input_shape}"}),
        E.ExpectColumnValuesToBeInSet(column="x_dtype", value_set=["float32"],
                                      meta={"check": "features are float32"}),
        E.ExpectColumnValuesToBeOfType(column="label", type_="int64", meta={"check": "labels are int64"}),
        E.ExpectColumnValuesToBeInSet(column="n_nonfinite", value_set=[0],
                                      meta={"check": "features have no NaN or inf"}),
        E.ExpectColumnValuesToBeBetween(column="x_min", min_value=0.0, max_value=1.0,
                                        meta={"check": "feature values within [0, 1] (minimum)"}),
        E.ExpectColumnValuesToBeBetween(column="x_max", min_value=0.0, max_value=1.0,
                                        meta={"check": "feature values within [0, 1] (maximum)"}),
        E.ExpectColumnValuesToBeInSet(column="label", value_set=list(params.classes),
                                      meta={"check": f"labels from the declared classes {list(params.classes)}"}),
    ]


def text_split_expectations(params: DataParams) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    low, high = params.text_chars
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1, meta={"check": "split is not empty"}),
        E.ExpectColumnValuesToBeInSet(column="n_features", value_set=[params.max_length],
                                      meta={"check": f"token ids have the declared width {params.max_length} "
                                                     "(data.max_length)"}),
        E.ExpectColumnValuesToBeInSet(column="x_dtype", value_set=["int64"], meta={"check": "token ids are int64"}),
        E.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$",
                                            meta={"check": "texts are not empty or whitespace-only"}),
        E.ExpectColumnValuesToBeBetween(column="n_chars", min_value=low, max_value=high,
                                        meta={"check": f"texts have {low} to {high} characters (data.text_chars)"}),
        E.ExpectColumnValuesToBeInSet(column="label", value_set=list(params.classes),
                                      meta={"check": f"labels from the declared classes {list(params.classes)}"}),
    ]


def class_count_expectations() -> list[Any]:
    import great_expectations as gx

    return [gx.expectations.ExpectColumnValuesToBeBetween(
        column=split, min_value=1, meta={"check": "every declared class present", "split": split}) for split in SPLITS]


def leakage_expectations(earlier: str, later: str, params: DataParams) -> list[Any]:
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    identical_row = f"identical_{earlier}_row"
    check = (f"no {later} text equal to a {earlier} text (ignoring case, whitespace and Unicode forms)"
             if params.is_text else f"no {later} sample identical to a {earlier} sample")
    expectations = [E.ExpectColumnValuesToBeNull(column=identical_row, meta={"check": check, "leak": "identical"})]
    if params.near_duplicate_distance > 0 and not params.is_text:  # token ids have no meaningful distance
        # Identical samples are reported above; this one finds the copies that differ a little.
        expectations.append(E.ExpectColumnValuesToBeBetween(
            column="rms_distance", min_value=params.near_duplicate_distance, strict_min=True,
            row_condition=Column(identical_row).is_null(),
            meta={"check": f"no {later} sample a near-duplicate of a {earlier} sample "
                           f"(RMS difference <= {params.near_duplicate_distance}, data.near_duplicate_distance)",
                  "leak": "near_duplicates"}))
    return expectations


def shown(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def quoted(text: str) -> str:
    """A text as a failure message shows it: quoted with whitespace visible, cut to TEXT_SHOWN characters."""
    return repr(text if len(text) <= TEXT_SHOWN else text[: TEXT_SHOWN - 1] + "…")


def describe_failure(table: str, result: Any, params: DataParams) -> str:
    """One plain sentence for a failed expectation: which table, which check, which rows."""
    meta = result.expectation_config.meta
    details = result.result or {}
    if result.expectation_config.type == "expect_table_row_count_to_be_between":
        return f"{table}: split is empty"
    if table == "class_counts":
        split, needed = meta["split"], min_class_size(params.split)
        rows = details["unexpected_index_list"]
        classes, totals = shown([str(row["class"]) for row in rows]), shown([str(row["total"]) for row in rows])
        hint = f"; data.split needs at least {needed} per class" if min(row["total"] for row in rows) < needed else ""
        counts = f"{split} ({totals} in total{hint})"
        missing = (f"class {classes} has 0 samples in {counts}" if len(rows) == 1 else
                   f"classes {classes} have 0 samples in {counts}")
        return f"{split}: {meta['check']}: {missing}"
    if table in LEAKAGE_TABLES:
        earlier, later = table.split("/")
        pairs = [f"{later} row {pair[f'{later}_row']} " + (
                 f"~ {earlier} row {pair[f'{earlier}_row']} (RMS {pair['rms_distance']:.4f})" if "rms_distance" in pair
                 else f"= {earlier} row {pair[f'{earlier}_row']}")
                 + (f" {quoted(pair['text'])}" if "text" in pair else "") for pair in leaked_pairs(table, result)]
        counted = f"{details['unexpected_count']} of {details['element_count']} rows"
        return f"{table}: {meta['check']}: {counted}: {shown(pairs)}"
    if "unexpected_count" not in details:  # a column-wide check, such as the label dtype
        return f"{table}: {meta['check']}: observed {details.get('observed_value')}"
    # Text rows carry their text, quoted after the row number; a check on the text itself then needs no values.
    rows = [str(row["row"]) + (f" {quoted(row['text'])}" if "text" in row else "")
            for row in details.get("partial_unexpected_index_list") or []]
    values = ([] if result.expectation_config.kwargs.get("column") == "text"
              else sorted({str(v) for v in details.get("partial_unexpected_list") or []})[:5])
    return (f"{table}: {meta['check']}: {details['unexpected_count']} of {details['element_count']} rows fail"
            + (f" (rows {', '.join(rows)}{', ...' if details['unexpected_count'] > len(rows) else ''}"
               + (f"; values {', '.join(values)}" if values else "") + ")" if rows else ""))


def leaked_pairs(table: str, result: Any) -> list[dict[str, Any]]:
    """The samples a failed leakage check found, by row in each split (and distance for near-duplicates)."""
    earlier, later = table.split("/")
    pairs = []
    for row in result.result["unexpected_index_list"]:
        pair = {f"{later}_row": int(row[f"{later}_row"])}
        if "rms_distance" in row:
            pair[f"{earlier}_row"] = int(row[f"nearest_{earlier}_row"])
            pair["rms_distance"] = float(row["rms_distance"])
        else:
            pair[f"{earlier}_row"] = int(row[f"identical_{earlier}_row"])
        if "text" in row:
            pair["text"] = row["text"]
        pairs.append(pair)
    return pairs


def validate(prepared_dir: Path, params: DataParams, docs_dir: Path) -> dict:
    """Run the suites over every table; writes Data Docs into `docs_dir`; returns the summary."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    context.add_data_docs_site(site_name="shrinkflow", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    source = context.data_sources.add_pandas("prepared")
    arrays = {s: read_split(prepared_dir, s) for s in SPLITS}
    # (table, frame, suite name, expectations, GX result format)
    if params.is_text:
        schema = read_text_schema(prepared_dir)
        texts = {s: read_texts(prepared_dir, s, *arrays[s]) for s in SPLITS}
        tables = [(s, text_sample_table(*arrays[s], texts[s], schema["pad_id"], params.max_length), "prepared_split",
                   text_split_expectations(params),
                   {"result_format": "SUMMARY", "unexpected_index_column_names": ["row", "text"]}) for s in SPLITS]
    else:
        tables = [(s, sample_table(*arrays[s]), "prepared_split", split_expectations(params),
                   {"result_format": "SUMMARY", "unexpected_index_column_names": ["row"]}) for s in SPLITS]
    class_counts = class_count_table({s: arrays[s][1] for s in SPLITS}, params.classes)
    tables.append(("class_counts", class_counts, "class_counts", class_count_expectations(),
                   {"result_format": "COMPLETE", "unexpected_index_column_names": ["class", "total"]}))
    for earlier, later in SPLIT_PAIRS:
        if params.is_text:
            frame = text_leakage_table(earlier, texts[earlier], later, texts[later])
            index_columns = [f"{later}_row", "text"]
        else:
            frame = leakage_table(earlier, arrays[earlier][0], later, arrays[later][0])
            index_columns = [f"{later}_row", f"nearest_{earlier}_row"]
        tables.append((f"{earlier}/{later}", frame, f"leakage_{earlier}_{later}",
                       leakage_expectations(earlier, later, params),
                       {"result_format": "COMPLETE", "unexpected_index_column_names": index_columns}))

    suites: dict[str, Any] = {}
    checks, failures, leakage = [], [], {}
    for table, frame, suite_name, expectations, result_format in tables:
        if suite_name not in suites:
            suites[suite_name] = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
        name = table.replace("/", "_")
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suites[suite_name]))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=name, validation_definitions=[definition], result_format=result_format))
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        for result in next(iter(run.run_results.values())).results:
            check = result.expectation_config.meta["check"]
            checks.append({"table": table, "check": check, "success": bool(result.success),
                           "unexpected_count": (result.result or {}).get("unexpected_count")})
            if not result.success:
                failures.append(describe_failure(table, result, params))
                if table in LEAKAGE_TABLES:
                    leakage.setdefault(table, {})[result.expectation_config.meta["leak"]] = leaked_pairs(table, result)
    context.build_data_docs()  # once for all tables: rendering is most of the stage's time
    summary = {"success": not failures, "failures": failures, "checks": checks,
               "class_counts": {str(row["class"]): {s: int(row[s]) for s in SPLITS}
                                for row in class_counts.to_dict("records")},
               "leakage": leakage}
    if params.is_text:  # what prepare resolved or cut: worth knowing, no reason to stop (details in schema.json)
        summary["warnings"] = {"conflicting_labels": len(schema["conflicts"]), "duplicates": schema["duplicates"],
                               "truncated": schema["truncated"]}
    return summary


def run_validation(prepared_dir: Path, params: DataParams, result_path: Path, docs_dir: Path) -> dict:
    """Validate and write the JSON result and Data Docs; raise if any check failed."""
    with atomic_path(docs_dir) as tmp_docs:
        summary = validate(prepared_dir, params, tmp_docs)
    write_json(result_path, summary)
    if not summary["success"]:
        raise ValidationFailed(
            f"data validation failed ({len(summary['failures'])} check(s)); "
            f"report: {result_path}, {docs_dir}/index.html\n  - " + "\n  - ".join(summary["failures"]))
    return summary


def require_validated(result_path: Path) -> None:
    """Refuse to train on data whose validation did not pass."""
    if not Path(result_path).is_file() or not read_json(result_path).get("success"):
        raise ValidationFailed(f"{result_path}: data has not passed validation; run the validate stage first")


def run(argv: list[str] | None = None) -> None:
    """The stage as dvc.yaml runs it: paths from the command line, params from params.yaml."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("docs_dir", type=Path)
    args = parser.parse_args(argv)
    summary = run_validation(args.prepared_dir, load_section("data", DataParams), args.result, args.docs_dir)
    print(f"validation passed: {len(summary['checks'])} checks -> {args.result}")
    if "warnings" in summary:
        print(f"warnings (text): {summary['warnings']}")


if __name__ == "__main__":
    run_main(run)
