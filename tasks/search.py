"""Stage `search`: accuracy-aware search over recipe variants, within a trial budget.

`search.space` holds recipe templates in which any step setting may be a list of
choices (sparsity levels, bit widths, student widths, quantization modes). Every
variant is a trial: the recipe is applied to the source model and measured on the
validation split — which nothing else uses (static int8 calibrates on training
samples) — so the test split stays untouched for the final evaluation. When there are
more variants than `budget`, a seeded sample of `budget` of them runs. A trial is within
tolerance when the upper confidence bound (level 1 - alpha, Tango score) of its paired
validation drop against the teacher is below `max_accuracy_drop`, the gate's test on the
validation split. All trials are recorded; the answer is the best trial by the objective
(smallest file or lowest latency) among those within tolerance — not the first one that
passes. Trials sharing their first steps reuse them. The winner is written like a
recipe's output (models/candidates/search), so evaluate and gate judge it on the test
split like every other candidate; the gate reports how much worse it did there than on
validation (the optimism of picking the best of many on one split).
"""

from __future__ import annotations

import argparse
import itertools
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.compress import (
    BASE_MODELS,
    CompressParams,
    compress,
    load_recipes,
    parse_recipe,
    write_lineage,
)
from tasks.compression.methods import NotApplicable, dry_run
from tasks.compression.quantization import OnnxClassifier, read_onnx_config
from tasks.evaluate import measure_speed
from tasks.io import read_json, run_main, write_json
from tasks.models import build_model, load_model
from tasks.params import (
    PARAMS_FILE,
    DataParams,
    DistillParams,
    EvaluateParams,
    ParamsError,
    _require,
    from_dict,
    load_section,
)
from tasks.statistics import drop_upper_bound
from tasks.training import model_split, predict_logits
from tasks.validate import require_validated

OBJECTIVES = ("file_bytes", "latency_ms_p50")
TRIAL_SPEED = EvaluateParams(threads=1, warmup=10, latency_repeats=100, throughput_batch=64, throughput_repeats=2,
                             rounds=1)  # a rough latency for the objective; the gate times the winner properly


@dataclass(frozen=True)
class SearchParams:
    source: str = "teacher"  # the base model every trial starts from
    teacher: str = "teacher"  # distils fine-tuning and distill steps; "" for labels only
    max_accuracy_drop: float = 0.5  # points below the teacher on validation, shown at confidence 1 - alpha
    alpha: float = 0.05  # one-sided level of each trial's upper bound of the validation drop
    objective: str = "file_bytes"  # file_bytes (smallest file) | latency_ms_p50 (fastest)
    budget: int = 20  # trials at most
    seed: int = 0  # which variants run when there are more than `budget`
    space: list[list[dict[str, Any]]] = field(default_factory=list)  # recipe templates

    def __post_init__(self) -> None:
        _require(self.source in BASE_MODELS, f"source: must be one of {list(BASE_MODELS)}, got {self.source!r}")
        _require(self.objective in OBJECTIVES, f"objective: must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        _require(self.budget >= 1, f"budget: must be at least 1, got {self.budget}")
        _require(0 <= self.max_accuracy_drop <= 100,
                 f"max_accuracy_drop: must be in [0, 100] (percentage points), got {self.max_accuracy_drop}")
        _require(0 < self.alpha < 0.5, f"alpha: must be in (0, 0.5), got {self.alpha}")
        _require(bool(self.space), "space: at least one recipe template")


def expand(template: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Every combination of the choices (list-valued settings) in a recipe template."""
    choices = [(i, key, values) for i, step in enumerate(template) for key, values in step.items()
               if isinstance(values, list)]
    variants = []
    for combination in itertools.product(*(values for _, _, values in choices)):
        steps = [dict(step) for step in template]
        for (i, key, _), value in zip(choices, combination):
            steps[i][key] = value
        variants.append(steps)
    return variants


def plan_trials(params: SearchParams) -> list[list[dict[str, Any]]]:
    """All variants, checked before anything trains; a seeded sample of `budget` if there are more."""
    variants = [v for template in params.space for v in expand(template)]
    for i, steps in enumerate(variants):
        parse_recipe(f"trial{i}", {"source": params.source, "teacher": params.teacher, "steps": steps}, "search.space")
    if len(variants) > params.budget:
        chosen = sorted(random.Random(params.seed).sample(range(len(variants)), params.budget))
        variants = [variants[i] for i in chosen]
    return variants


def applicable(trials: list[list[dict[str, Any]]], params: SearchParams, source_path: Path
               ) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """The trials whose every step applies to the source model's architecture (a dry run, no training), and
    the others, each with the reason: one template that cannot apply never stops the rest."""
    model, config = load_model(source_path)
    runnable, skipped, memo = [], [], {}
    for index, steps in enumerate(trials):
        recipe = parse_recipe(f"trial{index}", {"source": params.source, "teacher": params.teacher, "steps": steps},
                              "search.space")
        try:
            dry_run(recipe.steps, model, config, config["input_shape"], len(config["classes"]),
                    f"search.space.trial{index}", memo)
            runnable.append(steps)
        except NotApplicable as e:
            print(f"skipped: {e}")
            skipped.append({"steps": steps, "reason": str(e)})
    if not runnable:
        raise NotApplicable("search.space: no variant applies to the source model:\n"
                            + "\n".join(f"  - {s['reason']}" for s in skipped))
    return runnable, skipped


def validation_metrics(final: Path, prepared_dir: Path, classes: list) -> dict[str, Any]:
    """Which validation samples the model gets right, its file size and its batch-1 latency."""
    model, config = (OnnxClassifier(final), read_onnx_config(final)) if final.suffix == ".onnx" else load_model(final)
    validation = model_split(prepared_dir, "validation", classes, config)
    correct = (predict_logits(model, validation.X, pad_id=validation.pad_id).argmax(1) == validation.y).numpy()
    return {"correct": correct, "file_bytes": final.stat().st_size,
            "latency_ms_p50": measure_speed(model, validation.X, TRIAL_SPEED, validation.pad_id)["latency_ms_p50"]}


def paired_drop(reference_correct: np.ndarray, correct: np.ndarray, alpha: float) -> dict[str, Any]:
    """The validation drop against the reference (points) and its one-sided upper confidence bound."""
    n = len(correct)
    lost, gained = int(np.sum(reference_correct & ~correct)), int(np.sum(~reference_correct & correct))
    return {"val_accuracy": float(correct.mean()), "lost": lost, "gained": gained,
            "accuracy_drop_points": 100 * (lost - gained) / n,
            "drop_upper_bound_points": 100 * drop_upper_bound(lost, gained, n, alpha)}


def search(prepared_dir: Path, models_dir: Path, out_dir: Path, params: SearchParams,
           compress_params: CompressParams, distill_params: DistillParams) -> dict[str, Any]:
    """Run every planned trial; copy the winner's files and lineage to `out_dir`; return the record."""
    trials, skipped = applicable(plan_trials(params), params, models_dir / f"{params.source}.safetensors")
    teacher_path = models_dir / "teacher.safetensors"
    classes = read_json(prepared_dir / "schema.json")["classes"]
    reference = validation_metrics(teacher_path, prepared_dir, classes)["correct"]
    started = time.perf_counter()
    records, memo = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, steps in enumerate(trials):
            recipe = parse_recipe("search", {"source": params.source, "teacher": params.teacher, "steps": steps})
            trial_dir = Path(scratch) / f"trial{index}"
            trial_dir.mkdir()
            start = time.perf_counter()
            chain = compress(recipe, prepared_dir, models_dir / f"{params.source}.safetensors", teacher_path,
                             trial_dir, compress_params, distill_params, memo=memo)
            write_lineage(trial_dir, recipe, chain, teacher_path if params.teacher else None)
            metrics = validation_metrics(Path(chain[-1].file), prepared_dir, classes)
            drop = paired_drop(reference, metrics["correct"], params.alpha)
            records.append({"trial": index, "steps": steps, **drop, "file_bytes": metrics["file_bytes"],
                            "latency_ms_p50": metrics["latency_ms_p50"],
                            "within_tolerance": drop["drop_upper_bound_points"] < params.max_accuracy_drop,
                            "seconds": time.perf_counter() - start})
            print(f"trial {index}: {' > '.join(s['method'] for s in steps)} {steps} -> val accuracy "
                  f"{drop['val_accuracy']:.4f} (drop {drop['accuracy_drop_points']:+.2f}, at most "
                  f"{drop['drop_upper_bound_points']:.2f}), {metrics['file_bytes']:,} bytes, "
                  f"p50 {metrics['latency_ms_p50']:.3f} ms")
        passing = [r for r in records if r["within_tolerance"]]
        # Nothing within tolerance: the closest trial becomes the candidate, and the gate will say why it fails.
        best = (min(passing, key=lambda r: r[params.objective]) if passing
                else min(records, key=lambda r: r["drop_upper_bound_points"]))
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(Path(scratch) / f"trial{best['trial']}", out_dir)
    return {"objective": params.objective, "max_accuracy_drop": params.max_accuracy_drop, "alpha": params.alpha,
            "validation_samples": len(reference), "teacher_val_accuracy": float(reference.mean()), "trials": records,
            "skipped": skipped,
            "best": best["trial"], "found": bool(passing),
            "selected": {"trial": best["trial"], "validation_drop_points": best["accuracy_drop_points"],
                         "validation_drop_upper_bound_points": best["drop_upper_bound_points"]},
            "seconds": time.perf_counter() - started}


def check_recipes(params: dict[str, Any]) -> list[str]:
    """Each recipe of compress.recipes and each variant of search.space, dry-run (no training, a batch of two
    zeros) on the architecture it starts from as params.yaml configures it: one problem per step that
    cannot apply, naming the recipe, the step and the reason. Sections that do not parse are skipped: their
    parsers report them. Imports users' architectures, as the stages do."""
    try:
        data = from_dict(DataParams, params["data"], "data")
    except (ParamsError, KeyError, TypeError):
        return []
    chains = []
    try:
        chains += [(f"compress.recipes.{name}", recipe.source, recipe.steps)
                   for name, recipe in load_recipes(from_dict(CompressParams, params.get("compress"), "compress")).items()]
    except ParamsError:
        pass
    try:
        search_params = from_dict(SearchParams, params.get("search"), "search")
        chains += [(f"search.space.trial{i}", search_params.source,
                    parse_recipe(f"trial{i}", {"source": search_params.source, "teacher": search_params.teacher,
                                               "steps": steps}, "search.space").steps)
                   for i, steps in enumerate(v for template in search_params.space for v in expand(template))]
    except ParamsError:
        pass
    sections = {"teacher": "teacher", "student": "student", "distilled": "student"}
    problems, models, memos = [], {}, {}
    for where, source, steps in chains:
        section = params.get(sections[source]) or {}
        if source not in models:
            try:
                models[source] = build_model(section["model"], data.sample_shape, len(data.classes))
            except Exception:  # noqa: BLE001 -- one that does not build is reported by the architecture checks
                models[source] = None
        if models[source] is None:
            continue
        config = {"model": section["model"], "train": section.get("train", {}), "input_shape": data.sample_shape,
                  "classes": data.classes, "modality": "text" if data.is_text else "image"}
        try:
            dry_run(steps, models[source], config, data.sample_shape, len(data.classes), where,
                    memos.setdefault(source, {}))
        except NotApplicable as e:
            problems.append(str(e))
    return problems


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("validation_result", type=Path)
    parser.add_argument("models_dir", type=Path, help="holds teacher/student/distilled .safetensors")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("record_out", type=Path)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    require_validated(args.validation_result)
    params = load_section("search", SearchParams, args.params)
    plan_trials(params)  # bad templates fail here, before anything trains
    record = search(args.prepared_dir, args.models_dir, args.out_dir, params,
                    load_section("compress", CompressParams, args.params), load_section("distill", DistillParams, args.params))
    write_json(args.record_out, record)
    best = record["trials"][record["best"]]
    print(f"search: {len(record['trials'])} trials in {record['seconds']:.0f} s; best by {params.objective}: trial "
          f"{best['trial']} {best['steps']} (validation drop {best['accuracy_drop_points']:.2f}, at most "
          f"{best['drop_upper_bound_points']:.2f} at α={params.alpha}: {'within' if record['found'] else 'NOT within'} "
          f"{params.max_accuracy_drop} points) -> {args.out_dir}")


if __name__ == "__main__":
    run_main(run)
