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
from prefect.futures import wait
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows.stages import Stage, load_stages, topological_order, upstream, with_downstream
from tasks import check
from tasks.io import EXIT_REJECTED, EXIT_TRANSIENT
from tasks.params import OrchestrationParams, load_section

CANDIDATES_ARTIFACT = "shrinkflow-candidates"
GATE_ARTIFACT = "shrinkflow-gate"
VALIDATION_ARTIFACT = "shrinkflow-validation"
REMOVED_OUTPUTS_ARTIFACT = "shrinkflow-removed-outputs"


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
    create_markdown_artifact(Path("reports/comparison.md").read_text() + "\n" + "\n".join(
        f"- **{name}**: " + ("passed" if v["passed"] else "failed: " + "; ".join(v["failures"]))
        for name, v in verdicts.items()), key=GATE_ARTIFACT, description="Gate verdicts and reasons")


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


@flow(name="shrinkflow-pipeline", log_prints=True)
def pipeline(force: bool = False) -> list[str]:
    """Bring every stage up to date (all of them with `force`); returns the stages that ran."""
    check.run(Path.cwd())  # a bad params.yaml fails the flow here, before any stage runs
    params = load_section("orchestration", OrchestrationParams)
    stages = load_stages()
    stale = stale_stages()
    tracked_data = sorted(name for name in stale if name.endswith(".dvc"))  # `dvc add`-ed raw files
    if tracked_data:
        record_in_dvc_lock(tracked_data)  # as `dvc repro` does before the stages that read them
    names = set(stages) if force else with_downstream(stages, stale - set(tracked_data))
    if not names:
        print("all stages are up to date; nothing to run")
        return []
    print(f"running {sorted(names)} on the {params.task_runner} task runner")
    ran = run_stages.with_options(task_runner=make_task_runner(params))(
        sorted(names), params.retries, params.retry_delay_seconds)
    publish_artifacts()
    return ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="run every stage, stale or not")
    pipeline(force=parser.parse_args().force)


if __name__ == "__main__":
    main()
