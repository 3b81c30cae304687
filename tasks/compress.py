"""Stage `compress@<recipe>`: an ordered chain of compression steps applied to a base model.

A recipe (`compress.recipes.<name>` in params.yaml) names a source model (teacher,
student or distilled) and its steps, e.g. distill → prune 90 % → share 4 bits, or
structured prune → int8. Every step writes its own model file, whose config records
the parent file's hash and the step that made it, and the stage writes lineage.json
for the whole chain. The final model is exported to ONNX when it is a PyTorch model,
so both runtimes can be measured. Recipes are checked completely before any training: their
settings when params are parsed, and whether each method applies to the architecture by a dry run on
the source model (tasks/compression/methods.py defines the methods).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tasks.compression.methods import METHODS, Step, StepContext, dry_run, parse_step
from tasks.compression.pruning import sparsity
from tasks.compression.quantization import export_onnx
from tasks.io import file_sha256, read_json, run_main, write_json
from tasks.models import count_parameters, load_model, read_config, save_model
from tasks.params import (
    PARAMS_FILE,
    DistillParams,
    ParamsError,
    TrainParams,
    _require,
    from_dict,
    load_section,
)
from tasks.training import load_split, make_finetune, train_model
from tasks.validate import require_validated

BASE_MODELS = ("teacher", "student", "distilled")
# A recipe's name becomes a DVC stage name, a command-line argument and a directory under models/candidates.
RECIPE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# The calibration subset only has to be reproducible: a fixed seed, so the same data gives the same int8 file.
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    teacher: str  # "" when no step and no fine-tuning uses a teacher
    steps: list[Step]
    finetune: dict[str, Any] = field(default_factory=dict)  # this recipe's overrides over compress.finetune


@dataclass(frozen=True)
class CompressParams:
    finetune: dict[str, Any]  # overrides of the source model's own training recipe for fine-tuning
    recipes: dict[str, dict[str, Any]]
    calibration_samples: int = 256  # training samples that calibrate static int8 (validation is kept for selection)

    def __post_init__(self) -> None:
        bad = [name for name in self.recipes if not RECIPE_NAME.fullmatch(name)]
        _require(not bad, f"recipes: names {bad} not allowed; a recipe name is 1-64 of a-z, 0-9, '_' and '-', "
                          f"starting with a letter or digit")
        _require(self.calibration_samples >= 1, f"calibration_samples: must be at least 1, got {self.calibration_samples}")


def parse_recipe(name: str, raw: Any, where: str = "compress.recipes") -> Recipe:
    """A recipe checked end to end: every problem is reported before anything trains."""
    where = f"{where}.{name}"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping with source and steps, got {raw!r}")
    unknown = set(raw) - {"source", "teacher", "steps", "finetune"}
    if unknown:
        raise ParamsError(f"{where}: unknown keys {sorted(unknown)} (allowed: source, teacher, steps, finetune)")
    finetune = raw.get("finetune", {})
    if not isinstance(finetune, dict):
        raise ParamsError(f"{where}.finetune: a mapping of training overrides, got {finetune!r}")
    from_dict(TrainParams, {**dataclasses.asdict(TrainParams()), **finetune}, f"{where}.finetune")
    source, teacher = raw.get("source"), raw.get("teacher", "")
    if source not in BASE_MODELS:
        raise ParamsError(f"{where}.source: must be one of {list(BASE_MODELS)}, got {source!r}")
    if teacher not in ("", "teacher"):
        raise ParamsError(f"{where}.teacher: must be 'teacher' or empty, got {teacher!r}")
    raw_steps = raw.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ParamsError(f"{where}.steps: a non-empty list of steps, got {raw_steps!r}")
    steps = [parse_step(s, f"{where}.steps[{i}]") for i, s in enumerate(raw_steps)]
    for i, step in enumerate(steps):
        if METHODS[step.method].needs_teacher and not teacher:
            raise ParamsError(f"{where}.steps[{i}]: {step.method} needs a teacher; set {where}.teacher: teacher")
        if METHODS[step.method].write_onnx is not None and i != len(steps) - 1:
            raise ParamsError(f"{where}.steps[{i}]: {step.method} must be the last step "
                              f"(its ONNX Runtime model cannot be fine-tuned further)")
    return Recipe(name, source, teacher, steps, finetune)


def load_recipes(params: CompressParams) -> dict[str, Recipe]:
    reserved = [name for name in params.recipes if name in ("search", *BASE_MODELS)]
    if reserved:
        raise ParamsError(f"compress.recipes: {reserved} reserved (the search's candidate and the base models); "
                          f"rename the recipe")
    return {name: parse_recipe(name, raw) for name, raw in params.recipes.items()}


@dataclass
class Link:
    """One model in a recipe's chain: the source, or the output of a step."""

    file: str
    sha256: str
    method: str
    settings: dict[str, Any]
    parameters: int
    nonzero_parameters: int


def nonzero_parameters(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def finetune_recipe(config: dict[str, Any], overrides: dict[str, Any]) -> TrainParams:
    """The parent's own training recipe (recorded in its file) with the fine-tuning overrides."""
    base = from_dict(TrainParams, config["train"], "model config train")
    return from_dict(TrainParams, {**dataclasses.asdict(base), **overrides}, "compress.finetune")


def compress(
    recipe: Recipe,
    prepared_dir: Path,
    source_path: Path,
    teacher_path: Path | None,
    out_dir: Path,
    params: CompressParams,
    distill_params: DistillParams,
    memo: dict[str, tuple[nn.Module, dict[str, Any], Link]] | None = None,
) -> list[Link]:
    """Apply the recipe's steps in order; each output lands in `out_dir` and is the next step's parent.

    `memo` (used by the search) keeps each chain prefix's result, so recipes that share
    their first steps compute them once.
    """
    model, config = load_model(source_path)
    chain = [Link(str(source_path), file_sha256(source_path), "source", {"model": recipe.source},
                  count_parameters(model), nonzero_parameters(model))]
    teacher = teacher_path if recipe.teacher else None
    teacher_sha256 = file_sha256(teacher) if teacher else None
    schema = read_json(prepared_dir / "schema.json")

    for index, step in enumerate(recipe.steps, start=1):
        parent = chain[-1]
        prefix = json.dumps([chain[0].sha256, recipe.teacher, recipe.finetune,
                             [dataclasses.asdict(s) for s in recipe.steps[:index]]], sort_keys=True)
        if memo is not None and prefix in memo:
            model, config, link = memo[prefix]
            model = copy.deepcopy(model)
            shutil.copy2(link.file, out_dir / Path(link.file).name)
            chain.append(dataclasses.replace(link, file=str(out_dir / Path(link.file).name)))
            continue
        method = METHODS[step.method]
        finetune, finetune_params = None, None
        if method.finetunes:
            finetune_params = finetune_recipe(config, {**params.finetune, **recipe.finetune})
            finetune = make_finetune(prepared_dir, finetune_params, desc=f"{recipe.name}:{step.method}",
                                     teacher_path=teacher, distill=distill_params if teacher else None)
        step_config = copy.deepcopy(config)
        step_config.update(role=f"{recipe.name}/step{index}",
                           compression={"recipe": recipe.name, "step": index, "method": step.method,
                                        "settings": step.settings, "parent_sha256": parent.sha256,
                                        "parent_file": Path(parent.file).name,
                                        "finetune": finetune_params and dataclasses.asdict(finetune_params)})
        if method.finetunes or method.needs_teacher:  # the file says how it was last trained, and from which teacher
            step_config["distill"] = dataclasses.asdict(distill_params) if teacher else None
            if teacher:
                step_config["lineage"] = {**step_config["lineage"], "teacher_sha256": teacher_sha256}
        context = StepContext(step_config, schema["input_shape"], len(schema["classes"]), finetune=finetune,
                              train=functools.partial(train_model, prepared_dir, role=step_config["role"],
                                                      teacher_path=teacher, distill=distill_params))
        if method.reads_train:
            context.train_inputs = load_split(prepared_dir, "train", schema["classes"]).X.numpy()
        if method.write_onnx is not None:  # int8 calibrates on the train split; qat and tuning select on validation
            context.calibration = calibration_data(prepared_dir, schema["classes"], params.calibration_samples)
            context.validation = load_split(prepared_dir, "validation", schema["classes"])
        start = time.perf_counter()
        onnx_output = method.write_onnx is not None
        model = method.run(model, step.options, context)
        path = out_dir / f"step{index}-{step.method}.{'onnx' if onnx_output else 'safetensors'}"
        step_config.update(parameters=count_parameters(model), nonzero_parameters=nonzero_parameters(model))
        if onnx_output:
            method.write_onnx(model, step.options, context, path)
        else:
            save_model(model, path, step_config)
        config = step_config
        chain.append(Link(str(path), file_sha256(path), step.method, step.settings, count_parameters(model),
                          nonzero_parameters(model)))
        if memo is not None:
            memo[prefix] = (copy.deepcopy(model), config, chain[-1])
        print(f"{recipe.name}: step {index} {step.describe()} -> {path.name} in {time.perf_counter() - start:.1f} s "
              f"({chain[-1].nonzero_parameters:,} non-zero of {chain[-1].parameters:,} parameters"
              + (f", sparsity {sparsity(model):.3f})" if not onnx_output else ")"))
    if not chain[-1].file.endswith(".onnx"):
        export_onnx(load_model(chain[-1].file)[0], out_dir / "runtime.onnx", config)
    return chain


def check_applies(recipe: Recipe, source_path: Path, where: str = "compress.recipes") -> None:
    """Dry-run the recipe on its source model (no training): NotApplicable, naming the step and the reason,
    when a method cannot apply to the architecture."""
    model, config = load_model(source_path)
    dry_run(recipe.steps, model, config, config["input_shape"], len(config["classes"]), f"{where}.{recipe.name}")


def calibration_data(prepared_dir: Path, classes: list, samples: int) -> np.ndarray:
    """A seeded subset of the TRAIN split for static int8: the validation split stays unseen, for the search's selection."""
    train = load_split(prepared_dir, "train", classes).X.numpy()
    chosen = np.random.default_rng(CALIBRATION_SEED).choice(len(train), size=min(samples, len(train)), replace=False)
    return train[np.sort(chosen)]


def write_lineage(out_dir: Path, recipe: Recipe, chain: list[Link], teacher_path: Path | None) -> None:
    write_json(out_dir / "lineage.json", {
        "recipe": recipe.name,
        "source": recipe.source,
        "teacher": {"file": str(teacher_path), "sha256": file_sha256(teacher_path)} if recipe.teacher else None,
        "chain": [{**dataclasses.asdict(link), "file": link.file if i == 0 else Path(link.file).name}
                  for i, link in enumerate(chain)],
        "final": Path(chain[-1].file).name,
        "runtime_onnx": "runtime.onnx" if (out_dir / "runtime.onnx").exists() else Path(chain[-1].file).name,
    })


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("validation_result", type=Path)
    parser.add_argument("source", type=Path)
    parser.add_argument("teacher", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    require_validated(args.validation_result)
    params = load_section("compress", CompressParams, args.params)
    if args.recipe not in params.recipes:
        raise ParamsError(f"{args.params}: compress.recipes has no recipe {args.recipe!r}")
    recipe = load_recipes(params)[args.recipe]  # every recipe checked: a typo elsewhere fails every branch early
    distill_params = load_section("distill", DistillParams, args.params)
    finetune_recipe(read_config(args.source), params.finetune)  # bad overrides fail before any work
    check_applies(recipe, args.source)
    # Build in a scratch directory and swap it in whole: a failed run leaves no half-written candidate.
    scratch = args.out_dir.with_name(args.out_dir.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        chain = compress(recipe, args.prepared_dir, args.source, args.teacher, scratch, params, distill_params)
        write_lineage(scratch, recipe, chain, args.teacher if recipe.teacher else None)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    shutil.rmtree(args.out_dir, ignore_errors=True)
    scratch.rename(args.out_dir)


if __name__ == "__main__":
    run_main(run)
