"""Prefect flow over the DVC stage graph: same stages, same code, same outputs as `dvc repro`.

The flow asks DVC which stages are stale (`dvc status`), runs those and everything
downstream of them as Prefect tasks (independent branches in parallel on the
configured task runner, each stage in its own process as under `dvc repro`), then
records the outputs in dvc.lock with `dvc commit`, so `dvc status` is clean
afterwards and `dvc repro` reruns nothing. Before it asks DVC anything it runs
`shrinkflow check`: a bad params.yaml fails the flow before any stage runs.

A stage is retried only after a transient failure (it exits EXIT_TRANSIENT, or is
killed by a signal); a crash or a rejection would fail the same way again. When a
stage fails, the previous outputs of the stages that could not run after it are
removed, so no stale comparison, gate verdict or candidate passes for this run's.

A run that changed outputs records itself: dvc.lock, params.yaml and the reports are
committed on top of HEAD to a run ref (refs/heads/shrinkflow/runs/...) without touching
the user's branch, index or working tree, data and models are pushed to the DVC remote,
and the candidates' lineages are checked against that commit. If one can be promoted, a
run from a deployment starts the `shrinkflow-promote/review` deployment with the commit;
run in-process, the flow prints the command that starts the review. The
`shrinkflow-run` artifact holds the commit and why each other candidate cannot be promoted.

    python -m flows.pipeline [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.deployments import run_deployment
from prefect.futures import wait
from prefect.runtime import deployment
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows.promote import retry_if_unavailable
from flows.stages import Stage, load_stages, topological_order, upstream, with_downstream
from tasks import check
from tasks.io import EXIT_REJECTED, EXIT_TRANSIENT
from tasks.lineage import NotRecordable, record_run, recorded_revision
from tasks.params import OrchestrationParams, load_section
from tasks.promote import dvc_push, gated_candidates, not_promotable, preferred, promotable
from tasks.registry import RegistryParams
from tasks.storage import StorageParams

CANDIDATES_ARTIFACT = "shrinkflow-candidates"
GATE_ARTIFACT = "shrinkflow-gate"
VALIDATION_ARTIFACT = "shrinkflow-validation"
REMOVED_OUTPUTS_ARTIFACT = "shrinkflow-removed-outputs"
RUN_ARTIFACT = "shrinkflow-run"
REVIEW_DEPLOYMENT = "shrinkflow-promote/review"


class StageFailed(RuntimeError):
    """A stage crashed (a bug, or bad code in a user's architecture); it would crash the same way again."""


class StageTransient(RuntimeError):
    """A stage hit a failure a retry may pass (storage, network) or was killed by a signal."""


class StageRejected(ValueError):
    """A stage rejected its input or params; it would fail the same way again."""


def retry_if_transient(task, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), StageTransient)


@task(retry_condition_fn=retry_if_transient)
def run_stage(name: str, module: str, argv: list[str]) -> None:
    """Run one dvc.yaml stage as its own process, exactly as `dvc repro` runs it.

    A process per stage keeps parallel branches from sharing torch's global RNG
    and thread settings, so outputs are byte-identical to `dvc repro`'s.
    """
    logger = get_run_logger()
    env = dict(os.environ, TQDM_DISABLE="1")  # progress bars are noise in the run log
    process = subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True)
    for line in process.stdout.splitlines():
        logger.info(line)
    if process.returncode == EXIT_REJECTED:
        raise StageRejected(f"stage {name}: {process.stderr.strip().removeprefix('error: ')}")
    if process.returncode == EXIT_TRANSIENT or process.returncode < 0:
        raise StageTransient(f"stage {name} exited with {process.returncode} (transient or killed; retrying):\n"
                             f"{process.stderr[-4000:]}")
    if process.returncode != 0:
        raise StageFailed(f"stage {name} exited with {process.returncode}:\n{process.stderr[-4000:]}")


def stale_stages() -> set[str]:
    """Stages whose deps, params or outs differ from dvc.lock (or that never ran)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        return set(repo.status())


def record_in_dvc_lock(stage_names: list[str]) -> None:
    """`dvc commit`: hash the outputs, store them in the cache and write dvc.lock."""
    subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *stage_names], check=True)


def make_task_runner(params: OrchestrationParams) -> TaskRunner:
    if params.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if params.dask_address:
            return DaskTaskRunner(address=params.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": params.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=params.workers)


def publish_artifacts() -> None:
    """Comparison table and gate verdicts under stable keys, so the UI keeps their history."""
    evaluation = json.loads(Path("reports/evaluation.json").read_text())
    verdicts = json.loads(Path("reports/gate.json").read_text())["verdicts"]
    rows = []
    for name, m in evaluation["models"].items():
        verdict = verdicts.get(name)
        rows.append({
            "model": name, "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
            "parameters": m["parameters"], "nonzero_parameters": m["nonzero_parameters"], "bytes": m["file_bytes"],
            "size_reduction": round(m["size_reduction"], 2), "runtime": m["runtime"],
            "latency_ms_p50": round(m["latency_ms_p50"], 4), "speedup": round(m["speedup"], 2),
            "pareto": ", ".join(cost for cost, front in evaluation["pareto"].items() if name in front),
            "gate": "reference" if verdict is None else "PASS" if verdict["passed"] else "FAIL",
        })
    create_table_artifact(rows, key=CANDIDATES_ARTIFACT, description="Every model against the teacher")
    # comparison.md already lists each verdict and every failure's reason
    create_markdown_artifact(Path("reports/comparison.md").read_text(), key=GATE_ARTIFACT,
                             description="Gate verdicts and reasons")


def publish_validation_failure() -> None:
    result = json.loads(Path("reports/validation.json").read_text())
    create_markdown_artifact("# Data validation failed\n\n" + "\n".join(f"- {f}" for f in result["failures"])
                             + "\n\nGX Data Docs: `reports/data_docs/index.html`",
                             key=VALIDATION_ARTIFACT, description="Failed expectations; nothing was trained")


def remove_stale_outputs(stages: dict[str, Stage], failed: list[str], not_run: list[str]) -> None:
    """Remove the previous outputs of the stages that could not run because `failed` did, and say so."""
    removed = []
    for out in (Path(out) for name in not_run for out in stages[name].outs):
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        else:
            continue
        removed.append(str(out))
    if removed:
        message = (f"{', '.join(failed)} failed, so {', '.join(not_run)} did not run: removed their previous "
                   f"outputs {', '.join(removed)}, which would pass for this run's. `dvc checkout` restores the ones "
                   f"DVC caches.")
        get_run_logger().warning(message)
        create_markdown_artifact(f"# Outputs removed after a failed stage\n\n{message}", key=REMOVED_OUTPUTS_ARTIFACT,
                                 description="Stale outputs removed when a stage failed")


@flow(name="shrinkflow-stages")
def run_stages(names: list[str], retries: int, retry_delay_seconds: float) -> list[str]:
    """Run the given stages in dependency order, in parallel where the graph allows; record them in dvc.lock."""
    stages = load_stages()
    parents = upstream(stages)
    stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=exponential_backoff(retry_delay_seconds))
    futures = {}
    for name in topological_order(stages):
        if name in names:
            waits = [futures[p] for p in parents[name] if p in futures]
            futures[name] = stage_task.with_options(name=name).submit(name, stages[name].module, stages[name].argv,
                                                                      wait_for=waits)
    wait(list(futures.values()))
    completed = [name for name, future in futures.items() if future.state.is_completed()]
    if completed:
        record_in_dvc_lock(completed)
    failed = [name for name, future in futures.items() if future.state.is_failed()]
    not_run = sorted((with_downstream(stages, set(failed)) & set(futures)) - set(failed) - set(completed))
    if not_run:
        remove_stale_outputs(stages, failed, not_run)
    for name, future in futures.items():
        if future.state.is_failed():
            if name == "validate":
                publish_validation_failure()
            future.result()  # raises the stage's own error
    return completed


@task
def push_outputs(root: Path) -> str:
    """Every DVC-tracked file (raw and prepared data, teacher, candidates) to the remote; returns its URL."""
    return dvc_push(root, load_section("storage", StorageParams), [])


def start_review(revision: str) -> str | None:
    """Start the review deployment for `revision` when this run is a deployment's: its worker's checkout is the
    one the review reads. Returns the review's flow run id; None when run in-process."""
    if not deployment.id:
        return None
    # Not a subflow: a subflow cannot be suspended, and the review outlives this run.
    review = run_deployment(REVIEW_DEPLOYMENT, parameters={"revision": revision}, timeout=0, as_subflow=False)
    return str(review.id)


def record_and_review(root: Path, ran: list[str], orchestration: OrchestrationParams) -> dict:
    """Commit the run to a run ref, push its data, check the lineages against that commit, start the review."""
    flow_run_id = str(get_run_context().flow_run.id)
    try:
        run = record_run(root, f"shrinkflow run: {', '.join(ran)}\n\nPrefect flow run {flow_run_id}")
    except NotRecordable as e:
        message = f"The run is not recorded, so nothing can be promoted from it: {e}."
        get_run_logger().warning(message)
        create_markdown_artifact(f"# Run not recorded\n\n{message}", key=RUN_ARTIFACT,
                                 description="The git commit of this run and its candidates")
        return {"revision": None, "review": None}
    revision = run["revision"]
    remote = push_outputs.with_options(
        retries=orchestration.retries, retry_condition_fn=retry_if_unavailable,
        retry_delay_seconds=exponential_backoff(orchestration.retry_delay_seconds))(root)
    records = gated_candidates(root, revision)
    names = promotable(records)
    review = start_review(revision) if names else None
    recorded = (f"Commit `{revision}` on `{run['ref']}`" + ("" if run["new"] else " (recorded before)")
                + f"; data and models pushed to `{remote}`.")
    if not names:
        next_step = "No candidate can be promoted, so no review was started."
    elif review:
        next_step = f"Review started: flow run `{review}` of `{REVIEW_DEPLOYMENT}`; answer its form in the UI."
    else:
        best = preferred(records, names, load_section("registry", RegistryParams).prefer)
        next_step = (f"Start the review with `shrinkflow promote --revision {revision}` (answer in the Prefect UI), "
                     f"or decide here: `shrinkflow promote --revision {revision} --candidate {best} --approve "
                     f"--reviewer YOU --comment WHY`.")
    print(f"recorded: {recorded}\n{next_step}")
    reasons = not_promotable(records)
    parts = ["# Run recorded", recorded, next_step, f"Promotable: {', '.join(f'**{n}**' for n in names) or 'none'}."]
    create_markdown_artifact("\n\n".join(parts + ([f"## Not promotable\n\n{reasons}"] if reasons else [])),
                             key=RUN_ARTIFACT, description="The git commit of this run and its candidates")
    return {"revision": revision, "review": review}


@flow(name="shrinkflow-pipeline", log_prints=True)
def pipeline(force: bool = False) -> dict:
    """Bring every stage up to date (all of them with `force`), record the run and start its review.

    Returns the stages that ran, the commit that records the outputs (`revision`) and the review's flow run id.
    """
    root = Path.cwd()
    check.run(root)  # a bad params.yaml fails the flow here, before any stage runs
    params = load_section("orchestration", OrchestrationParams)
    stages = load_stages()
    stale = stale_stages()
    tracked_data = sorted(name for name in stale if name.endswith(".dvc"))  # `dvc add`-ed raw files
    if tracked_data:
        record_in_dvc_lock(tracked_data)  # as `dvc repro` does before the stages that read them
    names = set(stages) if force else with_downstream(stages, stale - set(tracked_data))
    if not names:
        revision = recorded_revision(root)
        print("all stages are up to date; nothing to run; outputs recorded "
              + (f"at {revision}" if revision else "in no commit"))
        return {"ran": [], "revision": revision, "review": None}
    print(f"running {sorted(names)} on the {params.task_runner} task runner")
    ran = run_stages.with_options(task_runner=make_task_runner(params))(
        sorted(names), params.retries, params.retry_delay_seconds)
    publish_artifacts()
    return {"ran": ran, **record_and_review(root, ran, params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="run every stage, stale or not")
    pipeline(force=parser.parse_args().force)


if __name__ == "__main__":
    main()
