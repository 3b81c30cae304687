"""Lineage, DVC remote on S3, and promotion with a human review: real Prefect test server, real S3 API on
127.0.0.1 (moto), real DVC CLI, a pipeline really run by `dvc repro` on digits stored as a DVC-tracked raw file."""

from __future__ import annotations

import contextvars
import json
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness
from sklearn.datasets import load_digits

from flows.cli import submit_review, wait_for_review_form
from flows.promote import promotion
from tasks.io import file_sha256
from tasks.lineage import candidate_lineage, read_lock
from tasks.promote import PromotionRefused, promote, push_lineage
from tasks.registry import open_registry
from tasks.storage import StorageParams, StorageUnavailable
from tasks.workspace import copy_pipeline, write_params
from tests.conftest import S3_CREDENTIALS, api_filter, run, tiny_params


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=shrinkflow-test", "-c", "user.email=test@localhost", "commit", "-q", "-m", message],
        repo)


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def built_pipeline(tmp_path_factory) -> Path:
    """The pipeline run by `dvc repro`, raw data tracked by DVC, everything committed: built once per test session
    (tests/test_nightly.py uses it too). Tests change copies of it, never the build itself."""
    repo, built = tmp_path_factory.getbasetemp() / "built-pipeline", tmp_path_factory.getbasetemp() / "built.done"
    if built.exists():
        return repo
    shutil.rmtree(repo, ignore_errors=True)  # left by a build that failed
    params = tiny_params()
    copy_pipeline(repo, params)
    X, y = load_digits(return_X_y=True)
    np.savez(repo / "data" / "raw" / "digits.npz", X=X.reshape(-1, 8, 8), y=y)
    run(["dvc", "add", "data/raw/digits.npz"], repo)
    params["data"].update(source="npz", path="data/raw/digits.npz")
    write_params(repo, params)
    run(["dvc", "repro"], repo)
    commit(repo, "pipeline run")
    built.touch()
    return repo


@pytest.fixture(scope="module")
def built_repo(tmp_path_factory) -> Path:
    return built_pipeline(tmp_path_factory)


@pytest.fixture
def repo(built_repo, tmp_path, s3_server, monkeypatch) -> Path:
    """A copy of the built repo whose storage is a fresh bucket on the test S3 server."""
    repo = tmp_path / "repo"
    shutil.copytree(built_repo, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["storage"] = s3_server.storage(s3_server.new_bucket(f"shrinkflow-{uuid.uuid4().hex[:12]}"))
    write_params(repo, params)
    commit(repo, "store on S3")
    monkeypatch.chdir(repo)
    return repo


def review_and_run(review: dict | None, timeout_seconds: int = 120) -> dict:
    """Run the promotion flow; a reviewer answers its pause form through the Prefect API, as the UI does."""
    if review:
        context = contextvars.copy_context()  # the reviewer talks to the same test server
        threading.Thread(target=context.run, args=(submit_review, review), daemon=True).start()
    return promotion(timeout_seconds=timeout_seconds)


def shrinkflow(repo: Path, *args: str, check: bool = True):
    return run(["shrinkflow", *args], repo, check=check)


def test_lineage_follows_dvc_lock_from_candidate_to_teacher_and_raw_data(repo):
    record = candidate_lineage(repo, "pruned")
    lock = read_lock(repo)
    assert record["problems"] == [] and record["gate"]["passed"]
    assert list(record["stages"])[0] == "compress@pruned" and list(record["stages"])[-2:] == ["prepare", "pretrained"]
    assert {"distill", "train_teacher", "validate"} <= set(record["stages"])
    teacher_md5 = next(o["md5"] for o in lock["train_teacher"]["outs"] if o["path"] == "models/teacher.safetensors")
    assert record["teacher"]["md5"] == teacher_md5
    assert record["teacher"]["sha256"] == file_sha256(repo / "models" / "teacher.safetensors")
    raw = yaml.safe_load((repo / "data" / "raw" / "digits.npz.dvc").read_text())["outs"][0]["md5"]
    assert record["data"]["raw"]["md5"] == next(d["md5"] for d in lock["prepare"]["deps"] if d["path"] == "data/raw")
    assert record["data"]["prepared"]["md5"] == lock["prepare"]["outs"][0]["md5"]
    assert record["stages"]["compress@pruned"]["params"]["compress.recipes.pruned"]["source"] == "distilled"
    assert [s["method"] for s in record["steps"]] == ["source", "prune"]
    assert record["steps"][0]["sha256"] == file_sha256(repo / "models" / "distilled.safetensors")
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert (record["code"]["git_revision"], record["code"]["dirty"]) == (head, False)
    assert record["code"]["files"]["tasks/compress.py"] == file_sha256(repo / "tasks" / "compress.py")
    printed = shrinkflow(repo, "lineage", "pruned").stdout
    assert teacher_md5[:12] in printed and "lineage   complete" in printed and raw  # raw file is DVC-tracked

    student = candidate_lineage(repo, "student")  # trained from scratch: nothing links it to the teacher
    assert any("does not derive from the teacher" in p for p in student["problems"])


def test_push_then_pull_restores_identical_data_and_models(repo, s3_server):
    shrinkflow(repo, "push")
    bucket = yaml.safe_load((repo / "params.yaml").read_text())["storage"]["bucket"]
    objects = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="shrinkflow/dvc/")
    assert objects["KeyCount"] > 10
    tracked = [p for p in [repo / "data" / "raw" / "digits.npz", *sorted((repo / "data" / "prepared").iterdir()),
                           *sorted((repo / "models").rglob("*"))] if p.is_file()]
    before = {str(p.relative_to(repo)): file_sha256(p) for p in tracked}
    for path in ("models", "data/prepared", "data/raw/digits.npz", ".dvc/cache"):
        target = repo / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shrinkflow(repo, "pull")
    assert {path: file_sha256(repo / path) for path in before} == before
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout


def test_approve_promotes_then_lineage_reproduce_rollback_and_no_credentials_written(
        prefect_server, repo, s3_server, tmp_path):
    result = review_and_run({"candidate": "pruned", "decision": "approve", "reviewer": "ana",
                             "comment": "smallest that passed"})
    assert result == {"outcome": "promoted", "candidate": "pruned", "version": 1}
    registry = open_registry(repo)
    manifest = registry.verify(1)
    assert registry.alias()["version"] == 1 and manifest["approved_by"] == "ana"
    assert manifest["model_sha256"] == file_sha256(repo / "models" / "candidates" / "pruned" / "step1-prune.safetensors")
    stored = json.loads(registry.read(1, "lineage.json"))
    assert stored["remote"]["url"].startswith("s3://") and stored["problems"] == []
    assert json.loads(registry.read(1, "approval.json"))["comment"] == "smallest that passed"

    printed = shrinkflow(repo, "lineage", "production").stdout
    assert "tiny-digits version 1 (production): candidate pruned, approved by ana" in printed
    assert stored["teacher"]["md5"][:12] in printed and "lineage   complete" in printed

    clone = tmp_path / "clone"
    reproduced = shrinkflow(repo, "reproduce", "1", "--into", str(clone))
    assert "hashes match" in reproduced.stdout and "DIFF" not in reproduced.stdout
    assert file_sha256(clone / "models" / "candidates" / "pruned" / "step1-prune.safetensors") == manifest["model_sha256"]
    assert file_sha256(clone / "data" / "raw" / "digits.npz") == file_sha256(repo / "data" / "raw" / "digits.npz")

    result = review_and_run({"candidate": "search", "decision": "approve", "reviewer": "bo", "comment": "smaller"})
    assert result["version"] == 2 and registry.alias()["version"] == 2
    listing = shrinkflow(repo, "registry").stdout
    assert "production -> version 2 (search)" in listing
    shrinkflow(repo, "rollback", "--reviewer", "cy", "--comment", "regression in canary")
    assert registry.alias()["version"] == 1 and [v["version"] for v in registry.versions()] == [1, 2]

    secrets = [S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]]
    written = [p for root in (repo, clone) for p in root.rglob("*") if p.is_file()]
    leaks = [str(p) for p in written if any(s.encode() in p.read_bytes() for s in secrets)]
    bucket = yaml.safe_load((repo / "params.yaml").read_text())["storage"]["bucket"]
    client = s3_server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    leaks += [k for k in keys if any(s.encode() in client.get_object(Bucket=bucket, Key=k)["Body"].read()
                                     for s in secrets)]
    prefect_records = api_filter("logs", {"sort": "TIMESTAMP_ASC"}) + api_filter("artifacts", {"sort": "CREATED_DESC"})
    leaks += [r["id"] for r in prefect_records if any(s in json.dumps(r) for s in secrets)]
    assert len(written) > 100 and len(keys) > 10 and len(prefect_records) > 10 and leaks == []


def test_reject_and_timeout_change_nothing_but_are_recorded(prefect_server, repo):
    result = review_and_run({"candidate": "pruned", "decision": "reject", "reviewer": "ana",
                             "comment": "wait for the bigger eval set"})
    assert result == {"outcome": "rejected", "candidate": "pruned"}
    assert review_and_run(None, timeout_seconds=2) == {"outcome": "timeout"}
    registry = open_registry(repo)
    assert registry.versions() == [] and registry.alias() is None and registry.claimed_numbers() == []
    assert [(r["decision"], r.get("comment")) for r in registry.reviews()] == [
        ("reject", "wait for the bigger eval set"), ("timeout", None)]


def test_an_approval_is_refused_if_the_workspace_changed_and_nothing_is_offered_if_nothing_is_promotable(
        prefect_server, repo):
    registry = open_registry(repo)
    candidate_file = repo / "models" / "candidates" / "search" / "step1-prune.safetensors"
    original = candidate_file.read_bytes()

    def change_then_approve() -> None:
        wait_for_review_form()
        candidate_file.write_bytes(original + b"\0")  # changed after dvc.lock recorded it, during the review
        submit_review({"candidate": "search", "decision": "approve", "reviewer": "ana", "comment": "ok"})

    threading.Thread(target=contextvars.copy_context().run, args=(change_then_approve,), daemon=True).start()
    with pytest.raises(PromotionRefused, match="search cannot be promoted although ana approved it: lineage "
                                               "incomplete: search changed since dvc.lock .*files changed while"):
        promotion(timeout_seconds=120)
    refused_run = api_filter("flow_runs", {"flows": {"name": {"any_": ["shrinkflow-promote"]}},
                                           "sort": "EXPECTED_START_TIME_DESC"})[0]
    assert refused_run["state"]["type"] == "FAILED"
    assert refused_run["state"]["message"].startswith("search cannot be promoted although ana approved it")
    logs = api_filter("logs", {"logs": {"flow_run_id": {"any_": [refused_run["id"]]}}})
    assert logs and not any("Traceback" in log["message"] for log in logs)  # one readable reason, no traceback
    [refusal] = registry.reviews()
    assert (refusal["decision"], refusal["candidate"]) == ("refused", "search")
    candidate_file.write_bytes(original)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["gate"]["min_accuracy"] = 0.999
    write_params(repo, params)
    run(["dvc", "repro", "gate"], repo)
    commit(repo, "stricter gate")
    with pytest.raises(PromotionRefused, match=r"no candidate can be promoted at [0-9a-f]{12}, so there is nothing "
                                               r"to review:\n(- \*\*\w+\*\*: .*\n)*- \*\*pruned\*\*: failed its "
                                               r"gate: accuracy"):
        promotion(timeout_seconds=120)  # no form to wait on
    assert registry.versions() == [] and registry.alias() is None and registry.claimed_numbers() == []
    assert [r["decision"] for r in registry.reviews()] == ["refused"]  # nothing was decided the second time


@pytest.mark.parametrize("lost_write", ["model.safetensors", "manifest.json", "aliases/production.json"])
def test_s3_outage_mid_promotion_fails_after_retries_leaves_production_unchanged_and_a_rerun_completes(
        repo, s3_server, lost_write):
    registry = open_registry(repo)
    storage = StorageParams(**yaml.safe_load((repo / "params.yaml").read_text())["storage"])
    approval = {"decision": "approve", "reviewer": "ana", "comment": "release"}
    promote(repo, registry, push_lineage(repo, storage, candidate_lineage(repo, "pruned")), approval)
    before = (registry.versions(), registry.alias())
    record = push_lineage(repo, storage, candidate_lineage(repo, "search"))
    sends = []

    def stop_before(params, **kwargs):
        if params["url_path"].endswith(lost_write):
            s3_server.stop()  # the real server goes away just before this write
            events.register("before-send.s3.PutObject", lambda **kw: sends.append(1))

    events = registry.store.client.meta.events
    events.register("before-call.s3.PutObject", stop_before)
    try:
        with pytest.raises(StorageUnavailable, match=rf"put_object .*{lost_write} failed after 2 attempts"):
            promote(repo, registry, record, approval)
    finally:
        events.unregister("before-call.s3.PutObject", stop_before)
        s3_server.start()
    assert len(sends) == storage.attempts  # every attempt went out before giving up
    assert registry.alias() == before[1]
    if lost_write == "aliases/production.json":  # the version is complete, but not in production
        assert [v["candidate"] for v in registry.versions()] == ["pruned", "search"]
    else:
        assert registry.versions() == before[0] and registry.incomplete() == [2]
    result = promote(repo, registry, record, approval)
    assert registry.alias()["version"] == result["manifest"]["version"]
    assert registry.verify(result["manifest"]["version"])["candidate"] == "search"
    assert [v["candidate"] for v in registry.versions()] == ["pruned", "search"]  # no duplicate version


def test_s3_down_once_approved_fails_the_flow_after_retries_and_an_approved_rerun_completes(
        prefect_server, repo, s3_server):
    def approve_after_outage() -> None:
        wait_for_review_form()
        s3_server.stop()  # the store goes down between the approval and the upload
        submit_review({"candidate": "pruned", "decision": "approve", "reviewer": "ana", "comment": "ship"})

    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(approve_after_outage,), daemon=True).start()
    try:
        with pytest.raises(StorageUnavailable, match="dvc push .* failed: .*Could not connect to the endpoint"):
            promotion(timeout_seconds=120)
    finally:
        s3_server.start()
    pushes = api_filter("task_runs", {"task_runs": {"name": {"like_": "push_data"}}, "sort": "EXPECTED_START_TIME_DESC"})
    assert pushes[0]["run_count"] == 2  # retried (orchestration.retries: 1) before failing the flow
    registry = open_registry(repo)
    assert registry.versions() == [] and registry.alias() is None and registry.claimed_numbers() == []
    result = review_and_run({"candidate": "pruned", "decision": "approve", "reviewer": "ana", "comment": "again"})
    assert result["version"] == 1 and registry.alias()["version"] == 1
