"""Nightly to production without a shell: a run records itself on a run ref (the user's branch, index and working
tree untouched), its lineage is complete against that commit, a review starts only when a candidate can be
promoted, the form offers only those, and an answer through the API promotes the run commit, which reproduces.

Real Prefect server (test harness), real process workers, real git, DVC and registry on the built tiny pipeline;
each pipeline run here reruns only the `gate` stage."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pydantic
import pytest
import yaml
from prefect._internal.pydantic.v2_schema import create_v2_schema
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from flows.cli import submit_review
from flows.pipeline import RUN_ARTIFACT, pipeline
from flows.promote import review_artifact_key, review_form
from tasks.lineage import RUN_REFS, NotRecordable, candidate_lineage, code_state, record_run
from tasks.params import ParamsError, from_dict
from tasks.promote import gated_candidates, preferred, promotable, review_summary
from tasks.registry import RegistryParams, open_registry
from tasks.workspace import write_params
from tests.conftest import api_filter, run, tool_env
from tests.test_promotion import built_pipeline


@pytest.fixture(scope="module")
def prefect_server() -> str:
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def git(repo: Path, *args: str) -> str:
    return run(["git", *args], repo).stdout.strip()


def git_state(repo: Path) -> dict[str, str]:
    """What the user owns: the commit checked out, the branch, the index (every entry's blob)."""
    return {"head": git(repo, "rev-parse", "HEAD"), "branch": git(repo, "symbolic-ref", "HEAD"),
            "index": git(repo, "ls-files", "--stage")}


def run_refs(repo: Path) -> list[str]:
    return git(repo, "for-each-ref", "--format=%(objectname) %(refname)", RUN_REFS).splitlines()


def copy_of_built(tmp_path_factory, name: str, **gate) -> Path:
    """A copy of the built pipeline with the gate settings changed, so that a run reruns `gate` only."""
    repo = tmp_path_factory.mktemp(name) / "repo"
    shutil.copytree(built_pipeline(tmp_path_factory), repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["gate"].update(gate)
    write_params(repo, params)
    return repo


def api_get(path: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.request("GET", f"/{path}").text


def latest_artifact(key: str) -> str:
    return api_filter("artifacts", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"})[0]["data"]


@pytest.fixture(scope="module")
def nightly(prefect_server, tmp_path_factory) -> dict:
    """The flow run once in-process on a copy whose gate changed (uncommitted, as a user's edit would be)."""
    repo = copy_of_built(tmp_path_factory, "nightly", min_size_reduction=2.5)
    before = git_state(repo)
    with contextlib.chdir(repo):
        result = pipeline()
    return {"repo": repo, "result": result, "before": before}


def test_a_run_that_changes_outputs_commits_them_to_a_run_ref_and_leaves_branch_index_and_tree_alone(nightly):
    repo, result, before = nightly["repo"], nightly["result"], nightly["before"]
    revision = result["revision"]
    assert result["ran"] == ["gate"] and result["review"] is None  # in-process: no deployment to start
    [ref] = run_refs(repo)
    assert re.fullmatch(rf"{revision} {RUN_REFS}\d{{8}}T\d{{6}}Z-{revision[:12]}", ref)
    assert git(repo, "rev-parse", f"{revision}^") == before["head"]
    assert set(git(repo, "diff", "--name-only", before["head"], revision).splitlines()) == {
        "dvc.lock", "params.yaml", "reports/comparison.md", "reports/gate.json"}  # what the run and the user changed
    for path in ("dvc.lock", "params.yaml", "reports/gate.json", "reports/comparison.md"):
        assert run(["git", "show", f"{revision}:{path}"], repo).stdout == (repo / path).read_text(), path
    assert git_state(repo) == before  # HEAD, branch and index as they were
    assert git(repo, "diff", "--name-only", revision) == ""  # every tracked file as the run left it, no other
    assert revision in latest_artifact(RUN_ARTIFACT)

    record = candidate_lineage(repo, "pruned", revision)
    assert record["problems"] == [] and (record["code"]["git_revision"], record["code"]["dirty"]) == (revision, False)
    assert candidate_lineage(repo, "pruned")["code"]["git_revision"] == revision  # found without being named
    at_head = candidate_lineage(repo, "pruned", before["head"])["problems"]
    assert f"dvc.lock: not committed at {before['head'][:12]}" in at_head

    with contextlib.chdir(repo):
        again = pipeline()  # nothing changed: nothing runs, no new ref, the same commit
    assert again == {"ran": [], "revision": revision, "review": None} and run_refs(repo) == [ref]


def test_a_workspace_without_git_or_without_a_commit_is_told_why(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(NotRecordable, match=r"plain is not a git repository: `git init` and commit the code"):
        record_run(plain, "run")
    assert code_state(plain, ["dvc.lock"])[1] == [f"{plain} is not a git repository: `git init` and commit the "
                                                  f"code, so that runs can be recorded and promoted"]
    run(["git", "init", "-q"], plain)
    with pytest.raises(NotRecordable, match=r"the git repository has no commit yet: commit the code"):
        record_run(plain, "run")


def test_a_run_in_a_repository_without_a_commit_completes_and_says_it_was_not_recorded(prefect_server,
                                                                                      tmp_path_factory):
    repo = copy_of_built(tmp_path_factory, "no-commit", min_size_reduction=2.5)
    shutil.rmtree(repo / ".git")
    run(["git", "init", "-q"], repo)  # DVC needs a git repository; a new one has no commit
    with contextlib.chdir(repo):
        assert pipeline() == {"ran": ["gate"], "revision": None, "review": None}
    assert latest_artifact(RUN_ARTIFACT) == (
        f"# Run not recorded\n\nThe run is not recorded, so nothing can be promoted from it: {repo}: the git "
        f"repository has no commit yet: commit the code (`git add -A && git commit`), so that runs can be recorded "
        f"on top of it and promoted.")


def test_the_form_offers_only_promotable_candidates_preselects_the_preferred_and_requires_decision_and_reviewer(
        nightly):
    repo, revision = nightly["repo"], nightly["result"]["revision"]
    records = gated_candidates(repo, revision)
    names = promotable(records)
    assert "student" in records and "student" not in names and len(names) >= 2  # student: not from the teacher
    smallest = min(names, key=lambda n: records[n]["metrics"]["file_bytes"])
    fastest = min(names, key=lambda n: records[n]["metrics"]["latency_ms_p50"])
    assert preferred(records, names, "file_bytes") == smallest
    assert preferred(records, names, "latency_ms_p50") == fastest

    form = review_form(names, smallest)
    schema = create_v2_schema("Review", model_base=form)  # what Prefect stores and the UI renders
    fields = schema["properties"]
    assert list(fields) == ["candidate", "decision", "reviewer", "comment"]
    assert (fields["candidate"]["enum"], fields["candidate"]["default"]) == (names, smallest)
    assert fields["decision"]["enum"] == ["approve", "reject"] and "default" not in fields["decision"]
    assert sorted(schema["required"]) == ["decision", "reviewer"] and fields["reviewer"]["minLength"] == 1
    assert [fields[f]["title"] for f in fields] == ["Candidate", "Decision", "Reviewer", "Comment"]
    for bad in ({"candidate": "student", "decision": "approve", "reviewer": "ana"}, {"reviewer": "ana"},
                {"decision": "approve"}, {"decision": "approve", "reviewer": ""}):
        with pytest.raises(pydantic.ValidationError):
            form(**bad)

    summary = review_summary(records, None, smallest, "artifact `shrinkflow-review-x`")
    rows = [line for line in summary.splitlines() if line.startswith("| **")]
    assert [row.split("**")[1] for row in rows] == names and f"**{smallest}** (preferred)" in summary
    pruned = records["pruned"]["metrics"]
    assert (f"| {100 * pruned['accuracy']:.1f}% [{100 * pruned['accuracy_ci95'][0]:.1f}, "
            f"{100 * pruned['accuracy_ci95'][1]:.1f}] | {pruned['vs_teacher']['accuracy_change_points']:+.2f} pts (") \
        in summary
    assert "student" not in summary and summary.endswith(
        "why 1 other candidate(s) cannot be promoted: artifact `shrinkflow-review-x`")
    assert len(summary.splitlines()) == len(names) + 6  # production, table, where the rest is: fits the dialog

    with pytest.raises(ParamsError, match="prefer: file_bytes .* or latency_ms_p50 .*, got 'bytes'"):
        from_dict(RegistryParams, {"prefer": "bytes"}, "registry")


def test_the_cli_answers_the_form_the_run_commit_is_promoted_without_a_shell_commit_and_reproduces(
        nightly, prefect_server, tmp_path):
    repo, revision, before = nightly["repo"], nightly["result"]["revision"], nightly["before"]
    env = dict(tool_env(), PREFECT_API_URL=prefect_server)

    def shrinkflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["shrinkflow", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)

    offered = shrinkflow("promote", "--revision", revision, "--candidate", "student", "--approve", "--reviewer", "ana")
    assert offered.returncode == 2 and "the review form refused the answer 'student' (approve)" in offered.stderr
    cancelled = api_filter("flow_runs", {"flows": {"name": {"any_": ["shrinkflow-promote"]}},
                                         "sort": "EXPECTED_START_TIME_DESC"})[0]
    assert cancelled["state"]["type"] == "CANCELLED"  # not left waiting for an answer
    registry = open_registry(repo)
    assert registry.versions() == [] and registry.claimed_numbers() == []

    approved = shrinkflow("promote", "--revision", revision, "--candidate", "pruned", "--approve", "--reviewer", "ana",
                          "--comment", "nightly run")
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout.splitlines()[-1]) == {"outcome": "promoted", "candidate": "pruned", "version": 1}
    manifest = registry.verify(1)
    stored = json.loads(registry.read(1, "lineage.json"))
    assert (manifest["git_revision"], stored["code"]["git_revision"], stored["problems"]) == (revision, revision, [])
    assert json.loads(registry.read(1, "approval.json"))["git_revision"] == revision
    assert git_state(repo) == before  # promoted without anyone committing

    clone = tmp_path / "clone"
    reproduced = shrinkflow("reproduce", "1", "--into", str(clone))
    assert reproduced.returncode == 0 and "DIFF" not in reproduced.stdout, reproduced.stdout + reproduced.stderr
    assert git(clone, "rev-parse", "HEAD") == revision


def test_the_nightly_deployment_starts_a_review_only_for_promotable_candidates_which_suspends_and_promotes(
        prefect_server, tmp_path_factory):
    repo = copy_of_built(tmp_path_factory, "deployed", min_accuracy=0.999)  # every candidate fails its gate
    home = tmp_path_factory.mktemp("prefect-home")
    env = dict({k: v for k, v in tool_env().items() if not k.startswith("PREFECT_")}, PREFECT_API_URL=prefect_server,
               PREFECT_HOME=str(home), SHRINKFLOW_HOME=str(repo))
    before = git_state(repo)

    def prefect(*args: str) -> None:
        done = subprocess.run(["prefect", "--no-prompt", *args], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"prefect {args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    def flow_run(flow_run_id) -> dict:
        return api_filter("flow_runs", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}})[0]

    def reviews() -> list[dict]:
        deployment = json.loads(api_get("deployments/name/shrinkflow-promote/review"))
        return api_filter("flow_runs", {"deployments": {"id": {"any_": [deployment["id"]]}},
                                        "sort": "EXPECTED_START_TIME_DESC"})

    def nightly_run() -> dict:
        started = run_deployment("shrinkflow-pipeline/nightly", timeout=0)
        prefect("worker", "start", "--pool", "shrinkflow", "--run-once")  # a real worker, as at 02:00
        return flow_run(started.id)

    prefect("work-pool", "create", "shrinkflow", "--type", "process")
    prefect("deploy", "--all")

    failed_gate = nightly_run()
    assert failed_gate["state"]["type"] == "COMPLETED" and reviews() == []  # nothing promotable: no review
    summary = latest_artifact(RUN_ARTIFACT)
    assert "No candidate can be promoted, so no review was started." in summary
    assert re.search(r"- \*\*pruned\*\*: failed its gate: accuracy", summary)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["gate"].update(min_accuracy=0.5, min_size_reduction=2.5)
    write_params(repo, params)
    passed_gate = nightly_run()
    revision = re.search(r"Commit `([0-9a-f]{40})`", latest_artifact(RUN_ARTIFACT)).group(1)
    assert f"{revision} {RUN_REFS}" in "\n".join(run_refs(repo)) and len(run_refs(repo)) == 2  # one per run
    assert run(["git", "show", f"{revision}:params.yaml"], repo).stdout == (repo / "params.yaml").read_text()
    [review] = reviews()
    assert passed_gate["state"]["type"] == "COMPLETED" and review["parameters"] == {"revision": revision}
    assert review["parent_task_run_id"] is None and review["state"]["type"] == "SCHEDULED"

    prefect("worker", "start", "--pool", "shrinkflow", "--run-once")  # returns once the review is suspended
    suspended = flow_run(review["id"])
    assert (suspended["state"]["type"], suspended["state"]["name"]) == ("PAUSED", "Suspended")
    keyset = suspended["state"]["state_details"]["run_input_keyset"]
    records = gated_candidates(repo, revision)
    names = promotable(records)
    best = preferred(records, names, "file_bytes")
    schema = json.loads(api_get(f"flow_runs/{review['id']}/input/{keyset['schema']}"))
    assert schema["properties"]["candidate"]["enum"] == names and "student" not in names
    assert schema["properties"]["candidate"]["default"] == best and sorted(schema["required"]) == ["decision",
                                                                                                     "reviewer"]
    description = json.loads(api_get(f"flow_runs/{review['id']}/input/{keyset['description']}"))
    assert review_artifact_key(review["id"]) in description and "student" not in description
    assert re.search(r"\| student \|.*\| no: lineage incomplete: student does not derive from the teacher",
                     latest_artifact(review_artifact_key(review["id"])))  # the full table says why not

    submit_review({"candidate": best, "decision": "approve", "reviewer": "ana", "comment": "nightly"})
    assert flow_run(review["id"])["state"]["type"] == "SCHEDULED"  # answered: back to a worker
    prefect("worker", "start", "--pool", "shrinkflow", "--run-once")
    assert flow_run(review["id"])["state"]["type"] == "COMPLETED"
    registry = open_registry(repo)
    assert [(v["candidate"], v["git_revision"]) for v in registry.versions()] == [(best, revision)]
    assert registry.alias()["version"] == 1 and git_state(repo) == before
