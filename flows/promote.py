"""Prefect flow: a person approves (or rejects) a gated candidate, then it is promoted.

The flow lists every gated candidate with its lineage, pauses with a form (which
candidate, approve or reject, reviewer, comment; the comparison table as its
description) and waits. Approve: the candidate's lineage is pushed to the DVC
remote, a new registry version is uploaded and the `production` alias moves to it.
Reject or no answer before the time-out: nothing changes; the decision is recorded.
Ineligible candidates (gate failed, lineage incomplete) are refused even if approved.

    python -m flows.promote          (or `shrinkflow promote`)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.tasks import exponential_backoff

from tasks.params import OrchestrationParams, load_section
from tasks.lineage import candidate_lineage
from tasks.promote import PromotionRefused, gated_candidates, promote, push_lineage, refusals, review_description
from tasks.registry import RegistryParams, now, open_registry
from tasks.storage import StorageParams, StorageUnavailable

PROMOTION_ARTIFACT = "shrinkflow-promotion"


class Review(RunInput):
    candidate: str
    decision: Literal["approve", "reject"] = "reject"
    reviewer: str = pydantic.Field(min_length=1)
    comment: str = ""


def review_form(candidates: list[str]) -> type[Review]:
    """The form with the candidate as a drop-down of the gated ones (ineligible ones are refused later)."""
    return pydantic.create_model("Review", __base__=Review, candidate=(Literal[tuple(candidates)], candidates[0]))


def retry_if_unavailable(task, task_run, state) -> bool:
    """Retry storage outages only; a refusal or a corrupt registry fails the same way again."""
    try:
        state.result()
    except StorageUnavailable:
        return True
    except Exception:
        return False
    return False


@task
def collect_candidates(root: Path) -> dict[str, dict]:
    return gated_candidates(root)


@task
def current_lineage(root: Path, candidate: str) -> dict:
    return candidate_lineage(root, candidate)


@task
def push_data(root: Path, record: dict) -> dict:
    return push_lineage(root, load_section("storage", StorageParams), record)


@task
def register(root: Path, record: dict, approval: dict) -> dict:
    return promote(root, open_registry(root), record, approval)


@task
def record_decision(root: Path, decision: dict) -> None:
    open_registry(root).record_review(decision)


def publish(outcome: str, detail: str) -> None:
    create_markdown_artifact(f"# {outcome}\n\n{detail}", key=PROMOTION_ARTIFACT, description="Promotion decision")


@flow(name="shrinkflow-promote", log_prints=True)
def promotion(timeout_seconds: int | None = None) -> dict:
    """Ask for a review of the gated candidates and promote the approved one."""
    root = Path.cwd()
    registry_params = load_section("registry", RegistryParams)
    orchestration = load_section("orchestration", OrchestrationParams)
    storage_task = {"retries": orchestration.retries, "retry_condition_fn": retry_if_unavailable,
                    "retry_delay_seconds": exponential_backoff(orchestration.retry_delay_seconds)}
    record_decision_task = record_decision.with_options(**storage_task)
    records = collect_candidates(root)
    if not records:
        raise PromotionRefused("reports/gate.json judged no candidate; run the pipeline first")
    production = open_registry(root).alias()
    eligible = [name for name, record in records.items() if not refusals(record)]
    description = review_description(records, (root / "reports" / "comparison.md").read_text(), production)
    form = review_form(eligible + [n for n in records if n not in eligible])
    flow_run_id = str(get_run_context().flow_run.id)
    print(f"waiting for a review of {len(records)} candidates ({len(eligible)} promotable) in the Prefect UI")
    try:
        review = pause_flow_run(wait_for_input=form.with_initial_data(description=description),
                                timeout=timeout_seconds or registry_params.review_timeout_seconds,
                                poll_interval=registry_params.review_poll_seconds)
    except FlowPauseTimeout:
        record_decision_task(root, {"decision": "timeout", "flow_run_id": flow_run_id, "decided_at": now()})
        publish("No decision", "The review timed out; nothing changed.")
        return {"outcome": "timeout"}
    decision = {"decision": review.decision, "candidate": review.candidate, "reviewer": review.reviewer,
                "comment": review.comment, "flow_run_id": flow_run_id, "decided_at": now()}
    if review.decision == "reject":
        record_decision_task(root, decision)
        publish(f"Rejected {review.candidate}", f"by {review.reviewer}: {review.comment}\n\nNothing changed.")
        return {"outcome": "rejected", "candidate": review.candidate}
    record = current_lineage(root, review.candidate)  # the workspace may have changed during the review
    reviewed = records[review.candidate]
    reasons = refusals(record) + [f"{what} changed while the review was open; start a new review"
                                  for what in ("stages", "files", "gate") if record[what] != reviewed[what]]
    if reasons:
        record_decision_task(root, dict(decision, decision="refused", reasons=reasons))
        publish(f"Refused {review.candidate}", "\n".join(f"- {r}" for r in reasons))
        raise PromotionRefused(f"{review.candidate} cannot be promoted although {review.reviewer} approved it: "
                               + "; ".join(reasons))
    record = push_data.with_options(**storage_task)(root, record)
    result = register.with_options(**storage_task)(root, record, decision)
    version = result["manifest"]["version"]
    get_run_logger().info("promoted %s as %s version %d", review.candidate, registry_params.model_name, version)
    publish(f"Promoted {review.candidate} as version {version}",
            f"approved by {review.reviewer}: {review.comment}\n\nalias `production` -> version {version}")
    return {"outcome": "promoted", "candidate": review.candidate, "version": version}


if __name__ == "__main__":
    promotion()
