"""The stage graph as `dvc.yaml` declares it: the one definition both runners follow.

`dvc repro` reads dvc.yaml directly; the Prefect flow reads it through here. Each
stage's `cmd` is `python -m tasks.<module> <args>`, so the flow calls the same
`tasks.<module>.run(args)` that the command line does.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    argv: list[str]
    deps: list[str]
    outs: list[str]  # outs, metrics and plots: every file the stage writes


def _paths(entries: list) -> list[str]:
    """DVC lists an entry as a plain path or as {path: options}."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def load_stages(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, Stage]:
    """Stages in file order, each with the Python module and arguments its command runs."""
    spec = yaml.safe_load(Path(dvc_yaml).read_text())
    stages = {}
    for name, stage in spec["stages"].items():
        words = shlex.split(stage["cmd"])
        if words[:2] != ["python", "-m"] or not words[2].startswith("tasks."):
            raise ValueError(f"{dvc_yaml}: stage {name}: cmd must be 'python -m tasks.<module> ...', got {stage['cmd']!r}")
        outs = _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))
        stages[name] = Stage(name, words[2], words[3:], _paths(stage.get("deps")), outs)
    return stages


def upstream(stages: dict[str, Stage]) -> dict[str, list[str]]:
    """For each stage, the stages that write one of its dependencies."""
    def writes(producer: Stage, path: str) -> bool:
        return any(path == out or path.startswith(out.rstrip("/") + "/") for out in producer.outs)

    return {name: [other.name for other in stages.values() if other.name != name
                   and any(writes(other, dep) for dep in stage.deps)]
            for name, stage in stages.items()}


def topological_order(stages: dict[str, Stage]) -> list[str]:
    """Stage names with every stage after the stages it depends on."""
    parents, order, visiting = upstream(stages), [], set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"dvc.yaml: stage {name} depends on itself through {sorted(visiting)}")
        visiting.add(name)
        for parent in parents[name]:
            visit(parent)
        visiting.discard(name)
        order.append(name)

    for name in stages:
        visit(name)
    return order


def with_downstream(stages: dict[str, Stage], names: set[str]) -> set[str]:
    """`names` plus every stage that depends on them, directly or not."""
    parents = upstream(stages)
    selected = set(names)
    for name in topological_order(stages):
        if any(p in selected for p in parents[name]):
            selected.add(name)
    return selected
