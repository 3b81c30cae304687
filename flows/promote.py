"""Prefect flow: a person approves (or rejects) a promotable candidate, then it is promoted.

The flow builds the lineage of every gated candidate against one git revision — the run
commit the pipeline recorded (by default the commit that holds the workspace's dvc.lock and
reports) — and waits for a review: a form offering only the promotable candidates (the best
by `registry.prefer` preselected), approve or reject, reviewer and an optional comment. Its
description is a short summary; the full comparison, and why the other candidates cannot be
promoted, are in the `shrinkflow-review-<flow run id>` artifact.

Run from a deployment, the flow suspends: the worker is free while the review is open, and the
answer reschedules the run, which starts again, finds the answer and goes on (the reviewed
lineage is a persisted task result). Run in-process (CLI, tests), it pauses in place.
Approve: the lineage is re-checked against the same revision, pushed to the DVC remote, a new
registry version is uploaded and the `production` alias moves to it. Reject, or no answer
before the time-out: nothing changes; the decision is recorded. An approval the re-check
refuses is recorded too, and the run ends Failed with the reason as its message.

    python -m flows.promote [--revision COMMIT]     (or `shrinkflow promote`)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import pydantic
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.settings import PREFECT_UI_URL
from prefect.states import Failed, State
from prefect.tasks import exponential_backoff

from tasks.lineage import candidate_lineage, is_commit_id
from tasks.params import OrchestrationParams, load_section
from tasks.promote import (PromotionRefused, gated_candidates, not_promotable, preferred, promotable, promote,
                           push_lineage, refusals, review_description, review_summary)
from tasks.registry import RegistryParams, now, open_registry
from tasks.storage import StorageParams, StorageUnavailable

PROMOTION_ARTIFACT = "shrinkflow-promotion"
REVIEW_KEY = "review"  # the suspend's key: the resumed run finds its answer under it


class Review(RunInput):  # the review form: no decision preselected, the reviewer must be named
    candidate: str = pydantic.Field(title="Candidate")
    decision: Literal["approve", "reject"] = pydantic.Field(title="Decision")
    reviewer: str = pydantic.Field(min_length=1, title="Reviewer")
    comment: str = pydantic.Field("", title="Comment")


def review_form(candidates: list[str], preferred_name: str) -> type[Review]:
    """The form with the candidate as a drop-down of the promotable ones, `preferred_name` preselected."""
    return pydantic.create_model("Review", __base__=Review, candidate=(
        Literal[tuple(candidates)], pydantic.Field(preferred_name, title="Candidate")))


def review_artifact_key(flow_run_id: str) -> str:
    return f"shrinkflow-review-{flow_run_id}"


def artifact_reference(key: str) -> str:
    """How the form names the review artifact: a link when the UI's address is known, its key always."""
    ui = PREFECT_UI_URL.value()
    return f"[artifact `{key}`]({ui}/artifacts/key/{key})" if ui else f"artifact `{key}` (Artifacts in the Prefect UI)"


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
def collect_candidates(root: Path, revision: str | None) -> dict[str, dict]:
    return gated_candidates(root, revision)


@task
def current_lineage(root: Path, candidate: str, revision: str | None) -> dict:
    return candidate_lineage(root, candidate, revision)


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


def refused(message: str) -> State:
    """End the run Failed with `message` and no traceback; a caller of the flow gets PromotionRefused."""
    get_run_logger().error(message)
    return Failed(message=message, data=PromotionRefused(message))


def wait_for_review(form: type[Review], timeout_seconds: int, poll_seconds: float) -> Review:
    """Suspend when running from a deployment (frees the worker), else pause in place."""
    if get_run_context().flow_run.deployment_id:
        return suspend_flow_run(wait_for_input=form, timeout=timeout_seconds, key=REVIEW_KEY)
    return pause_flow_run(wait_for_input=form, timeout=timeout_seconds, poll_interval=poll_seconds)


@flow(name="shrinkflow-promote", log_prints=True)
def promotion(revision: str | None = None, timeout_seconds: int | None = None) -> dict | State:
    """Ask for a review of the promotable candidates at git `revision` and promote the approved one."""
    root = Path.cwd()
    if revision is not None and not is_commit_id(revision):
        raise ValueError(f"revision: {revision!r} is not a commit id (40 lower-case hexadecimal digits)")
    registry_params = load_section("registry", RegistryParams)
    orchestration = load_section("orchestration", OrchestrationParams)
    storage_task = {"retries": orchestration.retries, "retry_condition_fn": retry_if_unavailable,
                    "retry_delay_seconds": exponential_backoff(orchestration.retry_delay_seconds)}
    record_decision_task = record_decision.with_options(**storage_task)
    flow_run = get_run_context().flow_run
    # A suspended run starts again when answered: it must find the lineage the reviewer saw, not a new one.
    records = collect_candidates.with_options(persist_result=flow_run.deployment_id is not None)(root, revision)
    if not records:
        return refused("reports/gate.json judged no candidate; run the pipeline first")
    revision = next(iter(records.values()))["code"]["git_revision"]  # the commit the lineages were checked at
    production = open_registry(root).alias()
    key = review_artifact_key(str(flow_run.id))
    resumed = flow_run.empirical_policy.resuming  # a suspended run started again: it published all this before
    if not resumed:
        create_markdown_artifact(review_description(records, (root / "reports" / "comparison.md").read_text(),
                                                    production), key=key,
                                 description="The candidates under review: comparison and why some cannot be promoted")
    names = promotable(records)
    if not names:
        return refused(f"no candidate can be promoted{f' at {revision[:12]}' if revision else ''}, so there is "
                       f"nothing to review:\n{not_promotable(records)}")
    best = preferred(records, names, registry_params.prefer)
    form = review_form(names, best).with_initial_data(
        description=review_summary(records, production, best, artifact_reference(key)))
    if not resumed:
        print(f"waiting for a review of {len(names)} promotable candidate(s) at {revision[:12]} in the Prefect UI "
              f"({len(records) - len(names)} not promotable: see artifact {key})")
    try:
        review = wait_for_review(form, timeout_seconds or registry_params.review_timeout_seconds,
                                 registry_params.review_poll_seconds)
    except FlowPauseTimeout:
        record_decision_task(root, {"decision": "timeout", "flow_run_id": str(flow_run.id), "git_revision": revision,
                                    "decided_at": now()})
        publish("No decision", "The review timed out; nothing changed.")
        return {"outcome": "timeout"}
    decision = {"decision": review.decision, "candidate": review.candidate, "reviewer": review.reviewer,
                "comment": review.comment, "flow_run_id": str(flow_run.id), "git_revision": revision,
                "decided_at": now()}
    if review.decision == "reject":
        record_decision_task(root, decision)
        publish(f"Rejected {review.candidate}", f"by {review.reviewer}: {review.comment}\n\nNothing changed.")
        return {"outcome": "rejected", "candidate": review.candidate}
    record = current_lineage(root, review.candidate, revision)  # the workspace may have changed during the review
    reviewed = records[review.candidate]
    reasons = refusals(record) + [f"{what} changed while the review was open; start a new review"
                                  for what in ("stages", "files", "gate") if record[what] != reviewed[what]]
    if reasons:
        record_decision_task(root, dict(decision, decision="refused", reasons=reasons))
        publish(f"Refused {review.candidate}", "\n".join(f"- {r}" for r in reasons))
        return refused(f"{review.candidate} cannot be promoted although {review.reviewer} approved it: "
                       + "; ".join(reasons))
    record = push_data.with_options(**storage_task)(root, record)
    result = register.with_options(**storage_task)(root, record, decision)
    version = result["manifest"]["version"]
    get_run_logger().info("promoted %s as %s version %d", review.candidate, registry_params.model_name, version)
    publish(f"Promoted {review.candidate} as version {version}",
            f"approved by {review.reviewer}: {review.comment}\n\nalias `production` -> version {version} "
            f"(git {revision[:12]})")
    return {"outcome": "promoted", "candidate": review.candidate, "version": version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", help="the run commit to review (default: the one holding this workspace's "
                                           "dvc.lock and reports)")
    promotion(revision=parser.parse_args().revision)


if __name__ == "__main__":
    main()
