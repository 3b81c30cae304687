"""`shrinkflow`: checks, lineage, registry, promotion, rollback, reproduction and the production model.

    shrinkflow check
    shrinkflow lineage <candidate | version | production> [--json]
    shrinkflow registry
    shrinkflow promote [--revision COMMIT] [--candidate NAME (--approve | --reject) --reviewer WHO --comment WHY]
                       [--timeout S]
    shrinkflow rollback --reviewer WHO --comment WHY
    shrinkflow reproduce <version | production> [--into DIR] [--repo URL]
    shrinkflow push | pull
    shrinkflow predict INPUT [-o predictions.csv]
    shrinkflow serve [--host 127.0.0.1] [--port 8000]

Storage (local directory or S3) comes from params.yaml:storage; credentials from the AWS chain.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tasks.io import file_sha256, read_json
from tasks.lineage import candidate_lineage, format_lineage, reproduce
from tasks.params import load_section
from tasks.registry import Registry, RegistryError, open_registry
from tasks.storage import StorageParams, configure_dvc_remote, dvc_remote_url


def version_number(registry: Registry, ref: str) -> int | None:
    """`production`, `3` or `v3` as a version number; None if `ref` names no version (a candidate, then)."""
    if ref == "production":
        alias = registry.alias()
        if alias is None:
            raise RegistryError(f"{registry.location}: nothing is in production yet")
        return alias["version"]
    digits = ref.removeprefix("v")
    return int(digits) if digits.isdigit() else None


def show_lineage(root: Path, ref: str, as_json: bool) -> None:
    registry = open_registry(root)
    number = version_number(registry, ref)
    if number is None:
        record, heading = candidate_lineage(root, ref), None
    else:
        record = json.loads(registry.read(number, "lineage.json"))
        approval = json.loads(registry.read(number, "approval.json"))
        alias = registry.alias()
        heading = (f"{registry.model} version {number}" + (" (production)" if alias and alias["version"] == number
                                                           else "")
                   + f": candidate {record['candidate']}, approved by {approval['reviewer']} at "
                   f"{approval['decided_at']} ({approval['comment']!r})\n  remote    {record['remote']['url']}")
    print(json.dumps(record, indent=2) if as_json else format_lineage(record, heading))


def show_registry(root: Path) -> None:
    registry = open_registry(root)
    alias = registry.alias()
    print(f"registry {registry.location}")
    print(f"{'':2}{'version':>7}  {'candidate':<16} {'model sha256':<14} {'bytes':>9}  {'approved by':<12} "
          f"{'git revision':<13} created")
    for v in registry.versions():
        model = next(f for name, f in v["files"].items() if name.startswith("model."))
        mark = "*" if alias and alias["version"] == v["version"] else ""
        print(f"{mark:<2}{v['version']:>7}  {v['candidate']:<16} {v['model_sha256'][:12]:<14} {model['bytes']:>9,}  "
              f"{v['approved_by']:<12} {v['git_revision'][:12]:<13} {v['created_at']}")
    if alias:
        print(f"production -> version {alias['version']} ({alias['candidate']}); earlier: {alias['history']}")
        for move in alias["log"]:
            print(f"  {move['at']}  {move['action']:<8} {move['from']} -> {move['version']}  by {move['by']}: "
                  f"{move['reason']}")
    else:
        print("production -> (none)")
    if registry.incomplete():
        print(f"incomplete uploads (never became versions): {registry.incomplete()}")
    decisions = registry.reviews()
    if decisions:
        print("decisions without a new version (rejected, refused, timed out, already registered):")
    for review in decisions:
        by = f"by {review['reviewer']}: {review['comment']}" if "reviewer" in review else ""
        why = "; ".join(review.get("reasons", [])) or review.get("note", "")
        print(f"  {review['recorded_at']}  {review['decision']:<8} {review.get('candidate', '')} {by}"
              + (f" ({why})" if why else ""))


def run_reproduce(root: Path, ref: str, into: str | None, repo: str | None) -> int:
    registry = open_registry(root)
    number = version_number(registry, ref)
    if number is None:
        raise RegistryError(f"{ref!r} is not a registry version (a number, v<number> or production)")
    manifest = registry.verify(number)
    record = json.loads(registry.read(number, "lineage.json"))
    storage = load_section("storage", StorageParams)
    configured = dvc_remote_url(storage, root)
    if record["remote"]["url"] != configured:  # the record is untrusted: pull only from our own remote
        raise RegistryError(f"version {number} was pushed to {record['remote']['url']}, but params.yaml:storage "
                            f"configures {configured}; refusing to pull from a remote a registry record names")
    workdir = Path(into or tempfile.mkdtemp(prefix=f"shrinkflow-v{number}-"))
    print(f"reproducing {registry.model} version {number} ({record['candidate']}) at git "
          f"{record['code']['git_revision'][:12]} in {workdir}, data from {record['remote']['url']}")
    checks = reproduce(record, repo or str(root), configured, workdir, storage)
    cloned = (workdir / record["files"][0]["path"]).resolve()
    if not cloned.is_relative_to(workdir.resolve()):
        raise RegistryError(f"version {number}: lineage.json names {record['files'][0]['path']!r}, outside the clone")
    checks.append({"what": f"registry model.* against the clone's {cloned.name} (sha256)",
                   "expected": manifest["model_sha256"], "actual": file_sha256(cloned) if cloned.is_file() else "missing"})
    checks[-1]["match"] = checks[-1]["expected"] == checks[-1]["actual"]
    for check in checks:
        print(f"  {'ok  ' if check['match'] else 'DIFF'} {check['what']}: {str(check['actual'])[:16]}"
              + ("" if check["match"] else f" (recorded {str(check['expected'])[:16]})"))
    failed = sum(not c["match"] for c in checks)
    print(f"{len(checks) - failed} of {len(checks)} hashes match" + ("" if not failed else f"; {failed} differ"))
    return 1 if failed else 0


def paused_promotions(client, tag: str | None) -> list[dict]:
    flow_runs = {"state": {"type": {"any_": ["PAUSED"]}}} | ({"tags": {"all_": [tag]}} if tag else {})
    response = client.request("POST", "/flow_runs/filter", json={
        "limit": 10, "offset": 0, "sort": "EXPECTED_START_TIME_DESC",
        "flows": {"name": {"any_": ["shrinkflow-promote"]}}, "flow_runs": flow_runs})
    return response.json()


def wait_for_review_form(tag: str | None = None, wait_seconds: float = 120,
                         running: Callable[[], bool] = lambda: True) -> str | None:
    """The id of the newest promotion flow run (with `tag`, if given) paused for its review; None if the flow
    stopped `running` without pausing (nothing to review)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + wait_seconds
    with get_client(sync_client=True) as client:
        while not (runs := paused_promotions(client, tag)):
            if not running():
                return None
            if time.monotonic() > deadline:
                raise TimeoutError("no paused shrinkflow-promote flow run to review")
            time.sleep(0.5)
    return runs[0]["id"]


def submit_review(review: dict, tag: str | None = None, running: Callable[[], bool] = lambda: True) -> str | None:
    """Answer the paused promotion's form through the Prefect API, exactly as the UI does.

    An answer the form refuses (e.g. a candidate it does not offer) cancels that promotion run: it would
    otherwise wait for an answer until it times out."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    flow_run_id = wait_for_review_form(tag, running=running)
    if flow_run_id is None:
        return None
    with get_client(sync_client=True) as client:
        result = client.request("POST", f"/flow_runs/{flow_run_id}/resume", json={"run_input": review}).json()
        if result.get("status") != "ACCEPT":
            reason = (result.get("details") or {}).get("reason", result)
            client.set_flow_run_state(flow_run_id, Cancelled(message=f"answer refused by the form: {reason}"),
                                      force=True)
            raise ValueError(f"the review form refused the answer {review.get('candidate')!r} "
                             f"({review.get('decision')}): {reason}")
    return flow_run_id


def run_promotion(root: Path, args: argparse.Namespace) -> None:
    import prefect
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.promote import promotion

    if not args.decision:
        if not PREFECT_API_URL.value():
            raise ValueError("no Prefect server to review in (PREFECT_API_URL is not set): start one and set "
                             "it, or decide here with --candidate NAME --approve|--reject --reviewer WHO")
        print(json.dumps(promotion(revision=args.revision, timeout_seconds=args.timeout)))
        return
    gated = read_json(root / "reports" / "gate.json")["verdicts"]
    if args.candidate not in gated:
        raise ValueError(f"--candidate {args.candidate!r}: not a gated candidate; gated: {', '.join(gated)}")
    with get_client(sync_client=True) as client:
        client.hello()  # starts the local API, if one is needed, before two threads share it
    tag = f"cli-review-{uuid.uuid4().hex[:12]}"  # so the answer goes to this run, not another paused one
    review = {"candidate": args.candidate, "decision": args.decision, "reviewer": args.reviewer,
              "comment": args.comment}
    outcome: dict = {}

    def run_flow() -> None:
        with prefect.tags(tag):
            try:
                outcome["result"] = promotion(revision=args.revision, timeout_seconds=args.timeout or 300)
            except Exception as e:  # reported by the main thread
                outcome["error"] = e

    # The flow waits in a thread; this one answers, and stops waiting if the flow ends without a form.
    flow_thread = threading.Thread(target=contextvars.copy_context().run, args=(run_flow,), daemon=True)
    flow_thread.start()
    submit_review(review, tag, running=flow_thread.is_alive)
    flow_thread.join()
    if "error" in outcome:
        raise outcome["error"]
    print(json.dumps(outcome["result"]))


def dvc(root: Path, command: str) -> int:
    url = configure_dvc_remote(root, load_section("storage", StorageParams))
    print(f"dvc {command} with remote {url}")
    return subprocess.run([sys.executable, "-m", "dvc", command], cwd=root).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shrinkflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="check every section of params.yaml and the workspace before a run")
    lineage = commands.add_parser("lineage", help="print a candidate's or a registry version's lineage")
    lineage.add_argument("ref", help="candidate name, version number (3 or v3) or production")
    lineage.add_argument("--json", action="store_true")
    commands.add_parser("registry", help="list versions, the production alias and review decisions")
    promote = commands.add_parser("promote", help="run the promotion flow (pauses for a review)")
    promote.add_argument("--revision", help="the run commit to review (default: the one holding this workspace's "
                                            "dvc.lock and reports)")
    promote.add_argument("--candidate")
    decision = promote.add_mutually_exclusive_group()
    decision.add_argument("--approve", dest="decision", action="store_const", const="approve")
    decision.add_argument("--reject", dest="decision", action="store_const", const="reject")
    promote.add_argument("--reviewer", default="")
    promote.add_argument("--comment", default="")
    promote.add_argument("--timeout", type=int, help="seconds to wait for the review (default: params.yaml)")
    rollback = commands.add_parser("rollback", help="point production back at the previous version")
    rollback.add_argument("--reviewer", required=True)
    rollback.add_argument("--comment", required=True)
    reproduce_cmd = commands.add_parser("reproduce", help="fresh clone at the recorded revision, pull, compare")
    reproduce_cmd.add_argument("ref", help="version number (3 or v3) or production")
    reproduce_cmd.add_argument("--into", help="directory for the clone (default: a new temporary one)")
    reproduce_cmd.add_argument("--repo", help="git URL to clone (default: this repository)")
    commands.add_parser("push", help="dvc push to the remote configured in params.yaml:storage")
    commands.add_parser("pull", help="dvc pull from the remote configured in params.yaml:storage")
    predict_cmd = commands.add_parser("predict", help="classify a file with the production model")
    predict_cmd.add_argument("input", type=Path, help="NPZ (array X), CSV (feature columns) or IDX images file")
    predict_cmd.add_argument("-o", "--output", type=Path, default=Path("predictions.csv"))
    serve_cmd = commands.add_parser("serve", help="answer POST /predict and GET /healthz with the production model")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.command == "promote" and args.decision and not (args.candidate and args.reviewer):
        parser.error("--approve/--reject need --candidate and --reviewer")
    root = Path.cwd()
    try:
        if args.command == "check":
            from tasks import check  # imports torch: only for this command

            check.run(root)
        elif args.command == "lineage":
            show_lineage(root, args.ref, args.json)
        elif args.command == "registry":
            show_registry(root)
        elif args.command == "promote":
            run_promotion(root, args)
        elif args.command == "rollback":
            alias = open_registry(root).rollback(args.reviewer, args.comment)
            print(f"production -> version {alias['version']} ({alias['candidate']})")
        elif args.command == "reproduce":
            return run_reproduce(root, args.ref, args.into, args.repo)
        elif args.command == "predict":
            from tasks.serving import predict

            predict(root, args.input, args.output)
        elif args.command == "serve":
            from tasks.serving import serve

            serve(root, args.host, args.port)
        else:
            return dvc(root, args.command)
    except (RuntimeError, KeyError, OSError, ValueError) as e:  # storage, registry, dvc, bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
