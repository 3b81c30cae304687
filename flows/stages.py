"""The stage graph as `dvc.yaml` declares it: the one definition both runners follow.

`dvc repro` reads dvc.yaml directly; the Prefect flow reads it through here, resolved
by DVC itself (so `foreach` stages such as compress@<recipe> expand from params.yaml
exactly as `dvc repro` expands them). Each stage's `cmd` is
`python -m tasks.<module> <args>`, so the flow runs the same code the command line does.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    argv: list[str]
    deps: list[str]
    outs: list[str]  # outs, metrics and plots: every file the stage writes


def load_stages(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, Stage]:
    """Stages in file order, each with the Python module and arguments its command runs."""
    from dvc.dvcfile import load_file
    from dvc.repo import Repo

    dvc_yaml = Path(dvc_yaml).resolve()
    stages = {}
    with Repo(str(dvc_yaml.parent)) as repo:
        for stage in load_file(repo, str(dvc_yaml)).stages.values():
            words = shlex.split(stage.cmd)
            if words[:2] != ["python", "-m"] or not words[2].startswith("tasks."):
                raise ValueError(f"{dvc_yaml}: stage {stage.name}: cmd must be 'python -m tasks.<module> ...', "
                                 f"got {stage.cmd!r}")
            stages[stage.name] = Stage(stage.name, words[2], words[3:], [str(d.def_path) for d in stage.deps],
                                       [str(o.def_path) for o in stage.outs])
    return stages


def upstream(stages: dict[str, Stage]) -> dict[str, list[str]]:
    """For each stage, the stages that write one of its dependencies (or something inside a dependency directory)."""
    def within(path: str, directory: str) -> bool:
        return path == directory or path.startswith(directory.rstrip("/") + "/")

    def writes(producer: Stage, path: str) -> bool:
        return any(within(path, out) or within(out, path) for out in producer.outs)

    return {name: [other.name for other in stages.values() if other.name != name
                   and any(writes(other, dep) for dep in stage.deps)]
            for name, stage in stages.items()}


def ancestors(stages: dict[str, Stage], name: str) -> set[str]:
    """Every stage whose outputs `name` needs, directly or through others."""
    parents, found = upstream(stages), set()
    pending = list(parents[name])
    while pending:
        stage = pending.pop()
        if stage not in found:
            found.add(stage)
            pending += parents[stage]
    return found


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
