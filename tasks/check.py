"""`shrinkflow check`: every section of params.yaml and the workspace, checked before anything runs.

A stage reads only its own section, so without this a typo in `distill` is found after the
teacher has trained, and a bad `teacher.train` only after `dvc repro` has deleted
models/teacher.safetensors to rerun its stage. `make run` and the Prefect flow run this
check first; it reports every problem at once, each naming the file and the field.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from tasks.compress import CompressParams, load_recipes
from tasks.gate import GateParams
from tasks.models import build_model, configured_model_specs
from tasks.params import (PARAMS_FILE, DataParams, DistillParams, EvaluateParams, ModelParams, OrchestrationParams,
                          ParamsError, PretrainedParams, SweepParams, from_dict)
from tasks.pretrained import package_model
from tasks.registry import RegistryParams
from tasks.search import SearchParams, check_recipes, plan_trials
from tasks.serving import ServeParams
from tasks.storage import StorageParams
from tasks.training import pretrained_spec


class WorkspaceInvalid(ValueError):
    """params.yaml or the workspace has problems: nothing may run until they are fixed."""


def parser(cls: type, then: Callable[[Any], Any] = lambda parsed: None) -> Callable[[Any, str], Any]:
    """Parse a section as `cls` (naming `where` in errors), then run `then` on the result."""
    def check(values: Any, where: str) -> Any:
        parsed = from_dict(cls, values, where)
        then(parsed)
        return parsed
    return check


SECTIONS: dict[str, Callable[[Any, str], Any]] = {
    "data": parser(DataParams),
    "pretrained": parser(PretrainedParams),
    "teacher": parser(ModelParams),
    "student": parser(ModelParams),
    "distill": parser(DistillParams),
    "compress": parser(CompressParams, load_recipes),
    "search": parser(SearchParams, plan_trials),
    "evaluate": parser(EvaluateParams),
    "gate": parser(GateParams),
    "orchestration": parser(OrchestrationParams),
    "storage": parser(StorageParams),
    "registry": parser(RegistryParams),
    "sweep": parser(SweepParams),
    "serve": parser(ServeParams),
}
OPTIONAL_SECTIONS = {"serve"}  # its defaults apply when it is absent


def located(error: Exception, section: str) -> str:
    """The error as a problem naming params.yaml and the section (the parsers name the field)."""
    message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    if message.startswith(str(PARAMS_FILE)):
        return message
    return f"{PARAMS_FILE}:{message}" if message.startswith(section) else f"{PARAMS_FILE}:{section}: {message}"


def build_problems(specs: list[tuple[str, dict[str, Any]]], input_shape: list[int], n_classes: int) -> list[str]:
    """Each model spec resolves and builds a torch.nn.Module, on the meta device (no memory, no weights)."""
    problems = []
    for where, spec in specs:
        try:
            with torch.device("meta"):
                build_model(spec, input_shape, n_classes)
        except Exception as e:  # a user's builder may fail in any way: that is the finding, not a crash
            problems.append(f"{PARAMS_FILE}:{where}: {type(e).__name__}: {e}")
    return problems


def architecture_problems(params: dict[str, Any], specs: list[tuple[str, dict[str, Any]]], input_shape: list[int],
                          n_classes: int) -> list[str]:
    """Every model spec builds, and every recipe and search variant can apply to the model it starts from."""
    problems = build_problems(specs, input_shape, n_classes)
    return problems + [f"{PARAMS_FILE}:{problem}" for problem in check_recipes(params)]


def user_architecture_problems(root: Path, params: dict[str, Any], specs: list[tuple[str, dict[str, Any]]],
                               input_shape: list[int], n_classes: int) -> list[str]:
    """architecture_problems when users' `module:function` architectures are configured, in a fresh interpreter
    in `root`: imported exactly as a stage imports them, whatever this process has imported before."""
    request = json.dumps({"params": params, "specs": specs, "input_shape": input_shape, "n_classes": n_classes})
    process = subprocess.run([sys.executable, "-m", "tasks.check", request], cwd=root, capture_output=True, text=True)
    if process.returncode != 0:
        return [f"{PARAMS_FILE}: checking the architectures {[s['arch'] for _, s in specs]} crashed:\n"
                f"{process.stderr[-2000:]}"]
    return json.loads(process.stdout.splitlines()[-1])  # the last line: a builder may print


def with_pretrained_specs(params: dict[str, Any], pretrained: PretrainedParams | None) -> dict[str, Any]:
    """params with each `{pretrained: true}` model spec expanded as training will expand it, from the
    configured pretrained model's config.json (read as data), so it can be built and dry-run."""
    specs = [spec for _, spec in configured_model_specs(params) if spec.get("pretrained")]
    if not specs:
        return params
    if pretrained is None or not pretrained.configured:
        raise ParamsError("model.pretrained: set, but params.yaml:pretrained names no package or path")
    source = package_model(pretrained)[1] if pretrained.package else Path(pretrained.path)
    hf_config = json.loads((source / "config.json").read_text())
    expanded = copy.deepcopy(params)
    for _, spec in configured_model_specs(expanded):
        if spec.get("pretrained"):
            replacement = pretrained_spec(spec, hf_config)
            spec.clear()
            spec.update(replacement)
    return expanded


def check_workspace(root: Path) -> list[str]:
    """Every problem with params.yaml (each section parsed and checked as its stage will) and the workspace."""
    from tasks.codedeps import missing_code_deps

    try:
        params = yaml.safe_load((root / PARAMS_FILE).read_text())
    except (OSError, yaml.YAMLError) as e:
        return [f"{PARAMS_FILE}: cannot be read ({e})"]
    if not isinstance(params, dict):
        return [f"{PARAMS_FILE}: expected a mapping of sections, got {params!r:.80}"]
    problems = []
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        problems.append(f"{PARAMS_FILE}: unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    parsed = {}
    for section, check in SECTIONS.items():
        if section not in params:
            if section not in OPTIONAL_SECTIONS:
                problems.append(f"{PARAMS_FILE}: section '{section}' is missing")
            continue
        try:
            parsed[section] = check(params[section], f"{PARAMS_FILE}:{section}")
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # malformed YAML shapes fail beyond ParamsError
            problems.append(located(e, section))

    if "data" in parsed:  # models are built for the data's input shape and classes
        shape, n_classes = parsed["data"].sample_shape, len(parsed["data"].classes)
        try:
            params = with_pretrained_specs(params, parsed.get("pretrained"))
        except (ValueError, OSError) as e:
            problems.append(f"{PARAMS_FILE}: {e}")
        specs = list(configured_model_specs(params))
        encoderless = [where for where, spec in specs if spec["arch"] != "hf_bert"]
        for setting in ("hidden_weight", "attention_weight"):
            if "distill" in parsed and getattr(parsed["distill"], setting) and encoderless:
                problems.append(f"{PARAMS_FILE}:distill.{setting}: distilling from inside the layers needs BERT "
                                f"encoders (hf_bert) on both sides; not hf_bert: {encoderless}")
        if any(":" in spec["arch"] for _, spec in specs):
            problems += user_architecture_problems(root, params, specs, shape, n_classes)
        else:
            problems += architecture_problems(params, specs, shape, n_classes)

    for partial in sorted((root / "models" / "candidates").glob("*.partial")):
        problems.append(f"{partial.relative_to(root)}: left by an interrupted compress@{partial.name[:-8]} run; "
                        f"delete it (DVC would hash it into evaluate's models/candidates dependency)")
    problems += missing_code_deps(root)
    return problems


def run(root: Path) -> None:
    """Print a summary, or raise WorkspaceInvalid listing every problem."""
    problems = check_workspace(root)
    if problems:
        raise WorkspaceInvalid(f"shrinkflow check found {len(problems)} problem(s):\n"
                               + "\n".join(f"  - {p}" for p in problems))
    print(f"{PARAMS_FILE}: {len(yaml.safe_load((root / PARAMS_FILE).read_text()))} sections valid")


if __name__ == "__main__":  # the fresh interpreter of user_architecture_problems
    request = json.loads(sys.argv[1])
    print(json.dumps(architecture_problems(request["params"], request["specs"], request["input_shape"],
                                           request["n_classes"])))
