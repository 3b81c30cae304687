"""Code dependencies of each stage, derived from what its module imports.

A stage runs `python -m tasks.<module>` (dvc.yaml); its outputs depend on that module, on
every repository module it imports, directly or not (imports inside functions too), on the
packages' `__init__.py` files, and, for stages that build or load models (they import
tasks.models), on the users' own architecture modules that params.yaml names with
`arch: module:function`. dvc.yaml must declare all of them, or an edit leaves `dvc status`
clean; `missing_code_deps` lists what it misses. The scan is static (the AST of each file):
nothing is imported, so it is fast and needs neither torch nor the users' modules.

    python -m tasks.codedeps     # every stage's code dependencies, the undeclared ones marked
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

MODELS_MODULE = "tasks.models"  # a stage importing it builds or loads models, so runs the architectures' code
ARCHITECTURES_DIR = "architectures"  # where users' own architecture modules belong (a dep of every model stage)


@dataclass(frozen=True)
class CodeDep:
    file: str  # repository-relative, with forward slashes
    why: str  # how the stage comes to run it, e.g. "imports tasks/models.py via tasks/training.py"


@dataclass(frozen=True)
class MissingDep:
    stage: str
    dep: CodeDep

    def __str__(self) -> str:
        outside = self.dep.why.startswith("builds") and not self.dep.file.startswith(f"{ARCHITECTURES_DIR}/")
        hint = f" (put your architecture modules under {ARCHITECTURES_DIR}/)" if outside else ""
        return f"dvc.yaml: stage {self.stage} {self.dep.why}, which is not among its deps{hint}"


def module_file(root: Path, module: str) -> Path | None:
    """The file inside `root` that `import module` runs from the repository root (stages run there), if any."""
    if not module or not all(part.isidentifier() for part in module.split(".")):
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def repo_path(root: Path, module: str) -> str | None:
    path = module_file(root, module)
    return path.relative_to(root).as_posix() if path else None


def with_parents(module: str) -> list[str]:
    """`a.b.c` -> a, a.b, a.b.c: importing a module first runs its packages' __init__."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file names (submodules included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from .x import y` inside package `package`
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            # `from package import name`: name may be a submodule; module_file() decides
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def import_closure(root: Path, module: str) -> dict[str, str | None]:
    """Repository files run by importing `module`: file -> the file whose import reached it (None: the start)."""
    found: dict[str, str | None] = {}
    pending = deque((name, None) for name in with_parents(module))
    while pending:  # breadth first: each file is reached from its nearest importer
        name, importer = pending.popleft()
        file = repo_path(root, name)
        if file is None or file in found:
            continue  # None: a name inside a module, or not in the repository (site-packages, stdlib)
        found[file] = importer
        for imported in imported_modules(root / file, name):
            pending.extend((parent, file) for parent in with_parents(imported))
    return found


def arch_references(values: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(params location, "module:function") for every user architecture anywhere in the params (built-ins have
    no colon); a list of model specs, as in search.space, is a choice among them."""
    if isinstance(values, dict):
        for key, value in values.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "arch" and isinstance(value, str) and ":" in value:
                yield here, value
            else:
                yield from arch_references(value, here)
    elif isinstance(values, list):
        for i, value in enumerate(values):
            yield from arch_references(value, f"{where}[{i}]")


def arch_module(arch: str) -> str:
    return arch.partition(":")[0]


def stage_code_deps(root: Path, module: str, archs: list[tuple[str, str]]) -> list[CodeDep]:
    """The repository files a stage running `python -m <module>` depends on."""
    start = repo_path(root, module)
    if start is None:
        raise FileNotFoundError(f"{root}: no file for module {module}, which a stage's cmd in dvc.yaml runs")
    deps = {}
    for file, importer in import_closure(root, module).items():
        via = f" via {importer}" if importer not in (None, start) else ""
        deps[file] = CodeDep(file, f"runs {file}" if file == start else f"imports {file}{via}")
    if repo_path(root, MODELS_MODULE) in deps:
        for where, arch in archs:
            used, arch_file = f"builds models with {arch} (params.yaml {where})", repo_path(root, arch_module(arch))
            for file in import_closure(root, arch_module(arch)):
                deps.setdefault(file, CodeDep(file, f"{used} from {file}" if file == arch_file
                                              else f"{used}, which imports {file}"))
    return sorted(deps.values(), key=lambda d: d.file)


def covered(file: str, declared: list[str]) -> bool:
    """A declared dep covers itself and, as a directory, every file inside it."""
    path = PurePosixPath(file)
    return any(path == (dep := PurePosixPath(d)) or dep in path.parents for d in declared)


def code_deps(root: Path) -> dict[str, tuple[list[str], list[CodeDep]]]:
    """For each dvc.yaml stage: (its declared deps, the code it depends on)."""
    from flows.stages import load_stages

    root = Path(root).resolve()
    archs = list(arch_references(yaml.safe_load((root / "params.yaml").read_text()) or {}))
    return {name: (stage.deps, stage_code_deps(root, stage.module, archs))
            for name, stage in load_stages(root / "dvc.yaml").items()}


def undeclared(stages: dict[str, tuple[list[str], list[CodeDep]]]) -> list[MissingDep]:
    return [MissingDep(name, dep) for name, (declared, deps) in stages.items()
            for dep in deps if not covered(dep.file, declared)]


def unused(stages: dict[str, tuple[list[str], list[CodeDep]]]) -> list[str]:
    """Declared repository modules a stage does not run: each edit of them would rerun it for nothing."""
    return [f"dvc.yaml: stage {name} declares {dep}, which it does not import (remove it)"
            for name, (declared, deps) in stages.items() for dep in declared
            if dep.endswith(".py") and dep not in {d.file for d in deps}]


def missing_code_deps(root: Path) -> list[str]:
    """One message per (stage, file) the stage runs but dvc.yaml does not declare among its deps, and per
    declared module it does not run: the code deps are exactly what the stage imports."""
    stages = code_deps(root)
    return [str(missing) for missing in undeclared(stages)] + unused(stages)


def external_architectures(root: Path, archs: list[tuple[str, str]]) -> dict[str, dict]:
    """Architectures from installed packages, not files of the repository: their distributions and versions."""
    outside = {arch: arch_module(arch) for _, arch in archs if repo_path(Path(root), arch_module(arch)) is None}
    if not outside:
        return {}
    installed = importlib.metadata.packages_distributions()  # reads every installed package's metadata
    return {arch: {"module": module,
                   "distributions": {name: importlib.metadata.version(name)
                                     for name in sorted(set(installed.get(module.split(".")[0], [])))}}
            for arch, module in outside.items()}


def main() -> None:
    """Print each stage's code dependencies; exit 1 if dvc.yaml misses any."""
    stages = code_deps(Path.cwd())
    for name, (declared, deps) in stages.items():
        print(f"{name}:")
        for dep in deps:
            print(f"  - {dep.file}" + ("" if covered(dep.file, declared) else f"    # MISSING: {dep.why}"))
    problems = [str(item) for item in undeclared(stages)] + unused(stages)
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
