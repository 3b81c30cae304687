"""Promotion: which candidates may be promoted, and promoting one.

Promoting = push the candidate's whole lineage (raw and prepared data, teacher, every
intermediate model) to the DVC remote, upload a new registry version and move the
`production` alias to it. A candidate that failed its gate, was never gated, or whose
lineage is incomplete is refused whatever the reviewer decided.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tasks.gate import markdown_table, model_cells
from tasks.io import read_json
from tasks.lineage import lineages
from tasks.registry import Registry, candidate_files, now
from tasks.storage import StorageParams, StorageUnavailable, configure_dvc_remote


class PromotionRefused(ValueError):
    """The approved candidate must not reach production."""


def gated_candidates(root: Path) -> dict[str, dict]:
    """Lineage records of every model the gate judged, in evaluation order."""
    verdicts = read_json(root / "reports" / "gate.json")["verdicts"]
    return lineages(root, list(verdicts))


def refusals(record: dict) -> list[str]:
    """Why a candidate cannot be promoted; empty if it can."""
    gate, reasons = record["gate"], []
    if gate is None:
        reasons.append("never gated")
    elif not gate["passed"]:
        reasons.append("failed its gate: " + "; ".join(gate["failures"]))
    return reasons + [f"lineage incomplete: {p}" for p in record["problems"]]


def review_description(records: dict[str, dict], comparison: str, production: dict | None,
                       reference: str = "teacher") -> str:
    """The pause form's markdown: what is in production, what may be promoted and why not, the comparison."""
    columns = {"accuracy": "test accuracy [95% CI]", "change": f"vs {reference}, pts [95% CI] p",
               "size": "size ×", "speed-up": f"speed-up vs {reference} [interval] (same runtime)"}
    rows = []
    for name, record in records.items():
        cells, reasons = model_cells(record["metrics"], reference, record["gate"]), refusals(record)
        rows.append([name, *(cells[key] for key in columns), "yes" if not reasons else "no: " + "; ".join(reasons)])
    lines = ["# Promote a candidate to production", "",
             f"In production now: **{production['candidate']}** (version {production['version']})" if production
             else "Nothing is in production yet.", "",
             markdown_table(["candidate", *columns.values(), "promotable"], rows), "",
             "Choose a candidate, approve or reject, and give your name and a comment.", "", "## Comparison", "",
             comparison]
    return "\n".join(lines)


def push_lineage(root: Path, storage: StorageParams, record: dict) -> dict:
    """`dvc push` the candidate's stage and everything upstream; returns the record with the remote added."""
    url = configure_dvc_remote(root, storage)
    stage = record["stage"]
    for command in (["push", "--with-deps", stage], ["status", "--cloud", "--with-deps", stage]):
        result = subprocess.run([sys.executable, "-m", "dvc", *command], cwd=root, capture_output=True, text=True)
        if result.returncode != 0:
            raise StorageUnavailable(f"dvc {' '.join(command)} to {url} failed: "
                                     f"{(result.stderr or result.stdout).strip()[-2000:]}")
    if "in sync" not in result.stdout:
        raise StorageUnavailable(f"dvc remote {url} is missing data of {stage} after push:\n{result.stdout}")
    return dict(record, remote={"url": url, "pushed_at": now()})


def promote(root: Path, registry: Registry, record: dict, approval: dict) -> dict:
    """Register `record`'s candidate as a new version and move the alias to it; refuses ineligible ones."""
    reasons = refusals(record)
    if reasons:
        raise PromotionRefused(f"{record['candidate']} cannot be promoted: " + "; ".join(reasons))
    if "remote" not in record:
        raise PromotionRefused(f"{record['candidate']}: its lineage was not pushed to the DVC remote")
    same = [v for v in registry.versions() if v["model_sha256"] == record["files"][0]["sha256"]
            and v["git_revision"] == record["code"]["git_revision"]]
    if same:  # the very same model and lineage: production returns to that version, no duplicate
        manifest = same[-1]
        registry.record_review(dict(approval, note=f"same model as version {manifest['version']}"))
    else:
        manifest = registry.register(candidate_files(root, record), record, approval)
    alias = registry.promote(manifest["version"], approval["reviewer"], approval["comment"])
    return {"manifest": manifest, "alias": alias}

