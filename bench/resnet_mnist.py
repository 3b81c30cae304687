"""Benchmark: a user's ResNet teacher on MNIST through every compression method, beside Torch-Pruning's defaults.

Runs the real `dvc repro` in a scratch copy of the repo (bench/out/resnet_mnist) on the MNIST test set
(6,000 / 1,000 / 3,000, stratified, seeded), with the ResNet of tests/user_architectures.py placed under
architectures/ as a user would. Then prunes the same teacher with Torch-Pruning as its README does
(group L2 importance, output layer ignored, one shot), fine-tunes it on the labels with the same budget
as shrinkflow's compress.finetune, and evaluates both side by side. Prints the figures issue 12 sets
targets for. Nothing here asserts: it reports.

    python bench/resnet_mnist.py [--mnist ../shared/data/mnist] [--out bench/out/resnet_mnist] [--reuse]

--reuse keeps an earlier run's workspace: `dvc repro` reruns only the stages whose params or code changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch_pruning as tp
from mnist_workspace import MNIST_DIR, ROOT, benchmark_params, mnist_workspace, timed

from flows.stages import load_stages, topological_order
from tasks.compress import finetune_recipe
from tasks.compression.quantization import export_onnx
from tasks.compression.shapes import structure
from tasks.evaluate import Candidate, base_candidate, evaluate, recipe_candidate
from tasks.models import build_model, load_model, save_model
from tasks.params import EvaluateParams, from_dict
from tasks.statistics import paired_comparison
from tasks.training import make_finetune
from tasks.workspace import write_params

RESNET = {"arch": "architectures.users:resnet", "width": 16, "blocks": 2}
STRUCTURED = {"slim_50": 0.5, "slim_75": 0.75}


def resnet_params() -> dict:
    """bench/mnist.yaml with the ResNet teacher and recipes covering every method of the registry."""
    params = benchmark_params()
    params["teacher"] = {"model": RESNET,
                         "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 64, "epochs": 24, "seed": 0,
                                   "weight_decay": 0.0, "schedule": "cosine", "augment_shift": 2, "threads": 2}}
    from_teacher = {"source": "teacher", "teacher": "teacher"}
    params["compress"]["recipes"] = {
        **{name: {**from_teacher, "steps": [{"method": "structured_prune", "ratio": ratio}]}
           for name, ratio in STRUCTURED.items()},
        "slim_75_int8": {**from_teacher, "steps": [{"method": "structured_prune", "ratio": 0.75},
                                                   {"method": "quantize", "mode": "int8_static"}]},
        "thin_int8": {**from_teacher, "steps": [{"method": "layer_prune", "keep_every": 2},
                                                {"method": "structured_prune", "ratio": 0.75},
                                                {"method": "quantize", "mode": "int8_static"}]},
        "ptq_int8": {"source": "teacher", "steps": [{"method": "quantize", "mode": "int8_static"}]},
        "qat_int8": {**from_teacher, "steps": [{"method": "qat", "rounds": 3, "max_drop": 0.1}]},
        "tuned_int8": {"source": "teacher", "steps": [{"method": "quantize_tuned", "max_drop": 0.1}]},
        "deep_compression": {**from_teacher, "steps": [{"method": "prune", "sparsity": 0.95, "rounds": 3},
                                                       {"method": "share", "bits": 4}]},
        "distilled_int8": {"source": "distilled", "steps": [{"method": "quantize", "mode": "int8_static"}]},
        "distilled_deep": {"source": "distilled", "teacher": "teacher",
                           "steps": [{"method": "prune", "sparsity": 0.8, "rounds": 3}, {"method": "share", "bits": 4}]},
    }
    # One-shot structured pruning of a batch-norm ResNet starts near chance: 2 epochs of fine-tuning at
    # lr 0.0005 (bench/mnist.yaml's budget for the CNN) recovered only 92-95 % on validation.
    params["compress"]["finetune"] = {"epochs": 5, "lr": 0.003, "schedule": "cosine", "threads": 2}
    params["search"].update(budget=2, space=[[{"method": "structured_prune", "ratio": [0.875, 0.9375]},
                                               {"method": "quantize", "mode": "int8_static"}]])
    return params


def torch_pruning_defaults(model: torch.nn.Module, config: dict, ratio: float, prepared: Path,
                           finetune_overrides: dict, out: Path) -> Path:
    """The teacher pruned as Torch-Pruning's README does, fine-tuned on the labels, saved as a model file."""
    example = torch.zeros(1, *config["input_shape"])
    pruner = tp.pruner.MetaPruner(model, example, tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model.head])
    pruner.step()
    make_finetune(prepared, finetune_recipe(config, finetune_overrides), desc=f"torch-pruning {ratio}")(model)
    with torch.device("meta"):
        recorded = structure(model, build_model(config["model"], config["input_shape"], len(config["classes"])))
    path = out / f"torch_pruning_{int(100 * ratio)}.safetensors"
    save_model(model.eval(), path, {**config, **recorded})
    return path


def side_by_side(workspace: Path, params: dict) -> dict:
    """shrinkflow's structured candidates and Torch-Pruning's defaults, evaluated in one run."""
    prepared = workspace / "data" / "prepared"
    out = workspace / "models" / "torch_pruning"
    out.mkdir(exist_ok=True)
    candidates: dict[str, Candidate] = {}
    with tempfile.TemporaryDirectory() as scratch:
        candidates["teacher"] = base_candidate(workspace / "models" / "teacher.safetensors", Path(scratch))
        for name, ratio in STRUCTURED.items():
            candidates[name] = recipe_candidate(workspace / "models" / "candidates" / name)
            teacher, config = load_model(workspace / "models" / "teacher.safetensors")
            path = torch_pruning_defaults(teacher, config, ratio, prepared, params["compress"]["finetune"], out)
            model, config = load_model(path)
            onnx_path = Path(scratch) / f"{path.stem}.onnx"
            export_onnx(model, onnx_path, config)
            candidates[f"tp_{name.split('_')[1]}"] = Candidate(path, onnx_path, "teacher", model, config,
                                                                onnx_is_artifact=False)
        evaluate_params = from_dict(EvaluateParams, params["evaluate"], "evaluate")
        summary, predictions = evaluate(prepared, candidates, evaluate_params)
    truth = predictions["actual"]
    for name in STRUCTURED:
        tp_name = f"tp_{name.split('_')[1]}"
        summary["models"][name]["vs_torch_pruning"] = paired_comparison(predictions[tp_name] == truth,
                                                                        predictions[name] == truth)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=MNIST_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "resnet_mnist")
    parser.add_argument("--reuse", action="store_true", help="keep the workspace of an earlier run")
    args = parser.parse_args()

    params = resnet_params()
    if args.reuse:
        workspace = args.out
        write_params(workspace, params)
    else:
        workspace = mnist_workspace(args.out, args.mnist, params)
        (workspace / "architectures").mkdir(exist_ok=True)
        (workspace / "architectures" / "users.py").write_text((ROOT / "tests" / "user_architectures.py").read_text())
    timed(["shrinkflow", "check"], workspace)
    stages = topological_order(load_stages(workspace / "dvc.yaml"))
    stage_times = {stage: timed(["dvc", "repro", "--single-item", stage], workspace) for stage in stages}
    # Model files name architectures.users:resnet, trusted through the workspace's params.yaml.
    os.chdir(workspace)
    sys.path.insert(0, str(workspace))
    structured = side_by_side(workspace, params)
    evaluation = json.loads((workspace / "reports" / "evaluation.json").read_text())
    verdicts = json.loads((workspace / "reports" / "gate.json").read_text())["verdicts"]
    report(evaluation, verdicts, structured, stage_times)


def report(evaluation: dict, verdicts: dict, structured: dict, stage_times: dict[str, float]) -> None:
    models = evaluation["models"]
    teacher = models["teacher"]
    best_runtime = evaluation["reference_runtime"]

    def drop(m: dict) -> float:
        return 100 * (teacher["accuracy"] - m["accuracy"])

    print("\n== Stage wall times (dvc repro --single-item, seconds) ==")
    for stage, seconds in stage_times.items():
        print(f"{stage:>26}: {seconds:7.1f}")
    print(f"\nteacher (ResNet, {teacher['parameters']:,} parameters): test accuracy {100 * teacher['accuracy']:.2f}% "
          f"(target >= 99.3%), train_teacher stage {stage_times['train_teacher']:.0f} s in this run (target <= 300 s; "
          f"a no-op when --reuse kept it); "
          f"fastest runtime {best_runtime}: p50 {teacher['runtimes'][best_runtime]['latency_ms_p50']:.3f} ms")

    print("\n== Every candidate (test split; speed-up vs the teacher on its fastest runtime) ==")
    print("candidate | gate | drop, pts [95% CI] | bytes | size x | runtime | p50 ms | speed-up | batch-256 /s")
    for name, m in models.items():
        if name == "teacher":
            continue
        low, high = m["vs_teacher"]["ci95_points"]
        print(f"{name} | {'pass' if verdicts[name]['passed'] else 'FAIL'} | {drop(m):+.2f} [{-high:+.2f}, {-low:+.2f}] | "
              f"{m['file_bytes']:,} | {m['size_reduction']:.1f} | {m['runtime']} | {m['latency_ms_p50']:.3f} | "
              f"{m['speedup']:.1f} | {m['throughput_per_s']:,.0f}")
    passing = {n: m for n, m in models.items() if n != "teacher" and verdicts[n]["passed"] and drop(m) <= 0.5}
    for key, label, goal in (("speedup", "speed", 10), ("size_reduction", "size", 50)):
        if passing:
            name, m = max(passing.items(), key=lambda item: item[1][key])
            print(f"best gated candidate by {label} with drop <= 0.5: {name}, {m[key]:.1f}x (goal >= {goal}x)")
        else:
            print(f"best gated candidate by {label}: none passed the gate within 0.5 points")

    print("\n== Structured pruning, side by side with Torch-Pruning's defaults (one evaluation run) ==")
    print("model | parameters | accuracy | ORT p50 ms | vs Torch-Pruning, pts [95% CI], p")
    side = structured["models"]
    for name in STRUCTURED:
        for row in (name, f"tp_{name.split('_')[1]}"):
            m = side[row]
            versus = m.get("vs_torch_pruning")
            comparison = (f"{versus['accuracy_change_points']:+.2f} [{versus['ci95_points'][0]:+.2f}, "
                          f"{versus['ci95_points'][1]:+.2f}], p={versus['p_value']:.2f}") if versus else ""
            print(f"{row} | {m['parameters']:,} | {100 * m['accuracy']:.2f}% | "
                  f"{m['runtimes']['onnxruntime']['latency_ms_p50']:.3f} | {comparison}")

    print("\n== Quantization-aware training against post-training int8 (same teacher) ==")
    ptq, qat = models["ptq_int8"], models["qat_int8"]
    print(f"PTQ drop {drop(ptq):+.2f} pts, QAT drop {drop(qat):+.2f} pts (goal: QAT <= half of PTQ's); QAT "
          f"{qat['speedup_vs_source']:.2f}x the speed of the fp32 teacher on {qat['runtime']} (goal >= 1)")
    print(f"tuned int8 drop {drop(models['tuned_int8']):+.2f} pts")
    print(f"\n== Batch-{evaluation['throughput_batch']} throughput of the int8 candidates, ONNX Runtime, "
          f"{evaluation['threads']} thread(s) ==")
    fp32 = teacher["runtimes"]["onnxruntime"]["throughput_per_s"]
    print(f"teacher fp32: {fp32:,.0f} samples/s")
    for name, m in models.items():
        if "int8" in name:
            print(f"{name}: {m['runtimes']['onnxruntime']['throughput_per_s']:,.0f} samples/s "
                  f"({m['runtimes']['onnxruntime']['throughput_per_s'] / fp32:.2f}x the fp32 teacher)")


if __name__ == "__main__":
    main()
