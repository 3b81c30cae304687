"""Stage `validate`: a Great Expectations suite over the prepared data.

GX validates tables, so each split becomes a table with one row per sample and
the per-sample facts the checks need (label, feature count, min/max, count of
NaN/inf, dtype). A second table holds the distinct sample hashes of train and
test, so "no sample in both" is a uniqueness check.

Writes the result as JSON and GX Data Docs (HTML) in every case; on failure it
raises `ValidationFailed` listing each failed check, so no training starts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.io import atomic_path, read_json, read_split, run_main, write_json
from tasks.params import DataParams, load_section
from tasks.prepare import SPLITS

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


class ValidationFailed(ValueError):
    """The prepared data broke one or more expectations."""


def sample_table(X: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    flat = X.reshape(len(X), -1)
    finite = np.where(np.isfinite(flat), flat, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: reported by n_nonfinite
        x_min, x_max = np.nanmin(finite, axis=1), np.nanmax(finite, axis=1)
    return pd.DataFrame({
        "label": y,
        "n_features": np.full(len(X), flat.shape[1]),
        "n_nonfinite": (~np.isfinite(flat)).sum(axis=1),
        "x_min": x_min,
        "x_max": x_max,
        "x_dtype": str(X.dtype),
    })


def sample_hashes(X: np.ndarray) -> set[str]:
    return {hashlib.sha1(row.tobytes()).hexdigest() for row in X.reshape(len(X), -1)}


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
        E.ExpectColumnDistinctValuesToContainSet(column="label", value_set=list(params.classes),
                                                 meta={"check": "every declared class present"}),
    ]


def describe_failure(table: str, result: Any) -> str:
    """One plain sentence for a failed expectation: which table, which check, how many rows."""
    check = result.expectation_config.meta["check"]
    details = result.result or {}
    if "unexpected_count" in details:
        examples = sorted({str(v) for v in details.get("partial_unexpected_list") or []})[:5]
        return (f"{table}: {check}: {details['unexpected_count']} of {details.get('element_count')} rows fail"
                + (f" (e.g. {', '.join(examples)})" if examples else ""))
    if "partial_missing_list" in details:
        return f"{table}: {check}: class(es) {sorted(details['partial_missing_list'])} missing"
    return f"{table}: {check}: observed {details.get('observed_value')}"


def validate(prepared_dir: Path, params: DataParams, docs_dir: Path) -> dict:
    """Run the suite over every split; writes Data Docs into `docs_dir`; returns the summary."""
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
    tables = {s: sample_table(*arrays[s]) for s in SPLITS}
    train_hashes, test_hashes = sample_hashes(arrays["train"][0]), sample_hashes(arrays["test"][0])
    tables["train_test_overlap"] = pd.DataFrame({"sample_hash": sorted(train_hashes) + sorted(test_hashes)})

    split_suite = context.suites.add(gx.ExpectationSuite(name="prepared_split", expectations=split_expectations(params)))
    overlap_suite = context.suites.add(gx.ExpectationSuite(name="train_test_overlap", expectations=[
        gx.expectations.ExpectColumnValuesToBeUnique(
            column="sample_hash", meta={"check": "no identical sample in both train and test"}),
    ]))
    checks, failures = [], []
    for table, frame in tables.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = overlap_suite if table == "train_test_overlap" else split_suite
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=table, validation_definitions=[definition], result_format="SUMMARY",
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")]))
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        for result in next(iter(run.run_results.values())).results:
            checks.append({"table": table, "check": result.expectation_config.meta["check"],
                           "success": bool(result.success),
                           "unexpected_count": (result.result or {}).get("unexpected_count")})
            if not result.success:
                failures.append(describe_failure(table, result))
    # Overlap is counted per pair of equal hashes; report samples, not rows.
    return {"success": not failures, "failures": failures, "checks": checks,
            "overlapping_samples": len(train_hashes & test_hashes)}


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


if __name__ == "__main__":
    run_main(run)
