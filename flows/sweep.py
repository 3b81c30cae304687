"""Prefect flow: hyper-parameter search for the teacher, trials in parallel on the task runner.

Each trial is the real `train_teacher` stage run with `teacher.train` overridden
(grid or random over `sweep.space` in params.yaml). Every trial is recorded in
`reports/sweep.json` and a table artifact; the best by validation accuracy is
written back into params.yaml and its weights become `models/teacher.safetensors`,
recorded in dvc.lock — training is deterministic, so they are exactly what
`train_teacher` would produce with those params.

    python -m flows.sweep
"""

from __future__ import annotations

import itertools
import math
import random
import shutil
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.futures import wait
from prefect.tasks import exponential_backoff
from ruamel.yaml import YAML

from flows.pipeline import make_task_runner, record_in_dvc_lock, run_stage, run_stages, stale_stages
from flows.stages import ancestors, load_stages
from tasks.io import read_json, write_json
from tasks.params import PARAMS_FILE, ModelParams, OrchestrationParams, SweepParams, from_dict, load_section

SWEEP_DIR = Path("sweeps")
SWEEP_ARTIFACT = "shrinkflow-teacher-sweep"


def trial_settings(params: SweepParams) -> list[dict[str, Any]]:
    """The `teacher.train` overrides of every trial."""
    if params.method == "grid":
        names = list(params.space)
        return [dict(zip(names, values)) for values in itertools.product(*params.space.values())]
    rng = random.Random(params.seed)

    def draw(spec: Any) -> Any:
        if isinstance(spec, list):
            return rng.choice(spec)
        if spec.get("log"):
            return math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
        return rng.uniform(spec["min"], spec["max"])

    return [{name: draw(spec) for name, spec in params.space.items()} for _ in range(params.trials)]


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: keeps the comments and layout of params.yaml
    yaml.preserve_quotes = True
    return yaml


def write_trial_params(path: Path, overrides: dict[str, Any]) -> None:
    params = _yaml().load(PARAMS_FILE)
    params["teacher"]["train"].update(overrides)
    from_dict(ModelParams, params["teacher"], f"{path}:teacher")  # reject bad values before training
    path.parent.mkdir(parents=True, exist_ok=True)
    _yaml().dump(params, path)


def adopt_best(best: dict[str, Any], outputs: list[str]) -> None:
    """Write the best overrides into params.yaml and its outputs where train_teacher writes them."""
    params = _yaml().load(PARAMS_FILE)
    params["teacher"]["train"].update(best["overrides"])
    _yaml().dump(params, PARAMS_FILE)
    for target, source in zip(outputs, best["outputs"]):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    record_in_dvc_lock(["train_teacher"])


@flow(name="shrinkflow-sweep-trials")
def run_trials(module: str, trial_argvs: list[list[str]], retries: int, retry_delay_seconds: float) -> None:
    """Every trial as its own train_teacher process, in parallel on the flow's task runner; retried, like
    every stage, only after a transient failure."""
    trial_task = run_stage.with_options(retries=retries, retry_delay_seconds=exponential_backoff(retry_delay_seconds))
    futures = [trial_task.with_options(name=f"trial-{number:03d}").submit(f"trial-{number:03d}", module, argv)
               for number, argv in enumerate(trial_argvs)]
    wait(futures)
    for future in futures:
        future.result()


@flow(name="shrinkflow-teacher-sweep", log_prints=True)
def sweep() -> dict[str, Any]:
    """Train every trial, record them all, adopt the best by validation accuracy."""
    params = load_section("sweep", SweepParams)
    orchestration = load_section("orchestration", OrchestrationParams)
    stages = load_stages()
    prerequisites = sorted(ancestors(stages, "train_teacher") & stale_stages())  # its data (and pretrained model)
    if prerequisites:
        run_stages(prerequisites, orchestration.retries, orchestration.retry_delay_seconds)
    teacher = stages["train_teacher"]
    # train_teacher's arguments: prepared data, validation result, then model, curves, metrics.
    inputs, outputs = teacher.argv[:2], teacher.argv[2:5]
    settings = trial_settings(params)
    shutil.rmtree(SWEEP_DIR, ignore_errors=True)
    trials = []
    for number, overrides in enumerate(settings):
        directory = SWEEP_DIR / f"trial-{number:03d}"
        write_trial_params(directory / "params.yaml", overrides)
        trial_outputs = [str(directory / Path(out).name) for out in outputs]
        trials.append({"trial": number, "overrides": overrides, "outputs": trial_outputs})
    print(f"{len(trials)} trials over {sorted(params.space)} on the {orchestration.task_runner} task runner")

    run_trials.with_options(task_runner=make_task_runner(orchestration))(
        teacher.module, [[*inputs, *t["outputs"], "--params", str(Path(t["outputs"][0]).parent / "params.yaml")]
                         for t in trials], orchestration.retries, orchestration.retry_delay_seconds)
    for t in trials:
        t["val_accuracy"] = read_json(t["outputs"][2])["val_accuracy"]
    best = max(trials, key=lambda t: t["val_accuracy"])  # first of equals: the earliest trial
    write_json("reports/sweep.json", {"method": params.method, "space": params.space, "trials": trials,
                                      "best": best["trial"]})
    create_table_artifact([{"trial": t["trial"], **t["overrides"], "val_accuracy": round(t["val_accuracy"], 4),
                            "best": t is best} for t in trials],
                          key=SWEEP_ARTIFACT, description="Teacher sweep: every trial, best marked")
    adopt_best(best, outputs)
    print(f"best: trial {best['trial']} {best['overrides']} val accuracy {best['val_accuracy']:.4f}; "
          f"written to {PARAMS_FILE} teacher.train")
    return best


if __name__ == "__main__":
    sweep()
