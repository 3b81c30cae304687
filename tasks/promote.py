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


def gated_candidates(root: Path, revision: str | None = None) -> dict[str, dict]:
    """Lineage records of every model the gate judged (against git `revision`), in evaluation order."""
    verdicts = read_json(root / "reports" / "gate.json")["verdicts"]
    return lineages(root, list(verdicts), revision)


def refusals(record: dict) -> list[str]:
    """Why a candidate cannot be promoted; empty if it can."""
    gate, reasons = record["gate"], []
    if gate is None:
        reasons.append("never gated")
    elif not gate["passed"]:
        reasons.append("failed its gate: " + "; ".join(gate["failures"]))
    return reasons + [f"lineage incomplete: {p}" for p in record["problems"]]


def promotable(records: dict[str, dict]) -> list[str]:
    return [name for name, record in records.items() if not refusals(record)]


def preferred(records: dict[str, dict], names: list[str], metric: str) -> str:
    """The candidate with the smallest `metric` (registry.prefer: file_bytes or latency_ms_p50); first on a tie."""
    return min(names, key=lambda name: records[name]["metrics"][metric])


def not_promotable(records: dict[str, dict]) -> str:
    """Markdown list: each candidate that cannot be promoted, with every reason."""
    return "\n".join(f"- **{name}**: " + "; ".join(refusals(record))
                     for name, record in records.items() if refusals(record))


def review_summary(records: dict[str, dict], production: dict | None, preferred_name: str, details: str,
                   reference: str = "teacher") -> str:
    """The review form's description, short enough for its dialog: the promotable candidates only, and where
    `details` (the artifact with the full comparison and why the others are not promotable) is."""
    rows = []
    for name in promotable(records):
        m = records[name]["metrics"]
        low, high = (100 * bound for bound in m["accuracy_ci95"])
        paired = m["vs_" + reference]
        change = (f"{paired['accuracy_change_points']:+.2f} pts "
                  f"({'significant' if paired['distinguishable'] else 'within noise'})")
        rows.append([f"**{name}**" + (" (preferred)" if name == preferred_name else ""),
                     f"{100 * m['accuracy']:.1f}% [{low:.1f}, {high:.1f}]",
                     change, f"{m['size_reduction']:.1f}×", f"{m['speedup']:.2f}×"])
    others = len(records) - len(rows)
    return "\n".join([
        f"Production: **{production['candidate']}** (version {production['version']})" if production
        else "Nothing is in production yet.", "",
        markdown_table(["candidate", "test accuracy [95% CI]", f"vs {reference}", "smaller", "speed-up"], rows), "",
        f"Full comparison{f' and why {others} other candidate(s) cannot be promoted' if others else ''}: {details}"])


def review_description(records: dict[str, dict], comparison: str, production: dict | None,
                       reference: str = "teacher") -> str:
    """The review's markdown artifact: what is in production, what may be promoted and why not, the comparison."""
    columns = {"accuracy": "test accuracy [95% CI]", "change": f"vs {reference}, pts [95% CI] p",
               "size": "size ×", "speed-up": f"speed-up vs {reference} [interval] (same runtime)"}
    rows = []
    for name, record in records.items():
        cells, reasons = model_cells(record["metrics"], reference, record["gate"]), refusals(record)
        rows.append([name, *(cells[key] for key in columns), "yes" if not reasons else "no: " + "; ".join(reasons)])
    lines = ["# Promote a candidate to production", "",
             f"In production now: **{production['candidate']}** (version {production['version']})" if production
             else "Nothing is in production yet.", "",
             markdown_table(["candidate", *columns.values(), "promotable"], rows), "", "## Comparison", "",
             comparison]
    return "\n".join(lines)


def dvc_push(root: Path, storage: StorageParams, targets: list[str]) -> str:
    """`dvc push` the targets (everything if none) and confirm with `dvc status --cloud`; returns the remote."""
    url = configure_dvc_remote(root, storage)
    for command in (["push", *targets], ["status", "--cloud", *targets]):
        result = subprocess.run([sys.executable, "-m", "dvc", *command], cwd=root, capture_output=True, text=True)
        if result.returncode != 0:
            raise StorageUnavailable(f"dvc {' '.join(command)} to {url} failed: "
                                     f"{(result.stderr or result.stdout).strip()[-2000:]}")
    if "in sync" not in result.stdout:
        raise StorageUnavailable(f"dvc remote {url} is missing data after push ({' '.join(targets) or 'all'}):\n"
                                 f"{result.stdout}")
    return url


def push_lineage(root: Path, storage: StorageParams, record: dict) -> dict:
    """`dvc push` the candidate's stage and everything upstream; returns the record with the remote added."""
    url = dvc_push(root, storage, ["--with-deps", record["stage"]])
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

