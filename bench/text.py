"""Benchmark: all-MiniLM-L6-v2 fine-tuned on WordNet noun supersenses, compressed, beside a TF-IDF baseline.

Writes a fixed seeded subset of ../shared/data/wordnet-supersenses/nouns.csv.gz into a scratch copy of the
repo (bench/out/text): one row per distinct text (case and whitespace normalised, as prepare groups them)
with its majority label, then 15,000 rows stratified by label, which prepare splits 8,000 / 2,000 / 5,000.
Runs the real `dvc repro` there, stage by stage, with the params in bench/text.yaml; then fits a TF-IDF +
logistic regression baseline on the same prepared splits, and compares scratch training with distillation
over several seeds, twice: the small student (the train_student and distill stages), and the DistilBERT-style
student of recipe distil2 (two teacher layers, distilled) against the same shape from random initialisation with
the same fine-tuning recipe. Prints the figures issue 13 sets targets for. Nothing here asserts: it reports.

    python bench/text.py [--seeds 3] [--out bench/out/text] [--reuse] [--smoke]

--reuse keeps an earlier run's workspace: `dvc repro` reruns only the stages whose params or code changed.
--seeds 0 skips the scratch-vs-distilled seeds, the slowest part (seed 0 reuses the pipeline's own models).
--smoke runs it all on a tiny configuration (4 classes, 240 rows, max_length 16, 1 epoch, a tiny student,
1 seed) in bench/out/text_smoke: it checks the script, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import torch
from mnist_workspace import ROOT, benchmark_params, timed
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_union
from torch import nn

from flows.stages import load_stages, topological_order
from tasks.compress import CompressParams, compress, finetune_recipe, parse_recipe
from tasks.compression.quantization import INPUT, OUTPUT, OnnxClassifier
from tasks.evaluate import measure_speeds, runner, speedup
from tasks.io import read_json
from tasks.models import load_model, read_config
from tasks.params import DistillParams, EvaluateParams, ModelParams, from_dict
from tasks.prepare import SPLITS
from tasks.statistics import paired_comparison
from tasks.text import normalise_text
from tasks.training import Split, load_split, predict_logits, train_model
from tasks.workspace import copy_pipeline, write_params

NOUNS = ROOT.parent / "shared" / "data" / "wordnet-supersenses" / "nouns.csv.gz"
ROWS = 15_000
SMOKE_CLASSES = ["animal", "artifact", "food", "person"]
SMOKE_ROWS = 240
C_VALUES = (1.0, 3.0, 10.0, 30.0)  # the baseline's inverse regularisation, picked on validation
LAYERS_RECIPE = "distil2"  # its first step keeps teacher layers; the seeds compare it with random initialisation


def write_subset(source: Path, target: Path, classes: list[str], rows: int, seed: int) -> dict[str, int]:
    """One row per distinct normalised text with its majority label, then a stratified sample of `rows`
    of those labelled with `classes`, written as text,label."""
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    frame["key"] = frame["text"].map(normalise_text)
    votes = frame.groupby(["key", "label"]).size().rename("votes").reset_index()
    # ties go to the first label in sorted order, as prepare's grouping breaks them
    majority = votes.sort_values(["votes", "label"], ascending=[False, True]).drop_duplicates("key")
    distinct = frame.drop_duplicates("key")[["key", "text"]].merge(majority[["key", "label"]], on="key")
    chosen = distinct[distinct["label"].isin(classes)]
    sample, _ = train_test_split(chosen, train_size=rows, stratify=chosen["label"], random_state=seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    sample.sort_index()[["text", "label"]].to_csv(target, index=False)
    return {"rows": len(frame), "distinct": len(distinct), "sampled": len(sample)}


def smoke_params(params: dict) -> dict:
    """The same pipeline on a tiny configuration, minutes long."""
    params["data"].update(classes=SMOKE_CLASSES, max_length=16)
    tiny = {"epochs": 1, "batch_size": 16}
    params["teacher"]["train"].update(tiny)
    params["student"] = {"model": {"arch": "hf_bert", "hidden_size": 32, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "intermediate_size": 64},
                         "train": {**params["student"]["train"], **tiny}}
    params["evaluate"].update(rounds=3, warmup=2, latency_repeats=10, throughput_batch=16, throughput_repeats=1)
    for recipe in params["compress"]["recipes"].values():
        if "finetune" in recipe:
            recipe["finetune"]["epochs"] = 1
    return params


def tfidf_baseline(prepared: Path) -> dict:
    """Word 1-2-grams and char_wb 2-5-grams (sublinear tf) into a logistic regression, C picked on validation."""
    texts = {s: np.load(prepared / f"text_{s}.npy") for s in SPLITS}
    labels = {s: np.load(prepared / f"y_{s}.npy") for s in SPLITS}
    features = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True))
    X = {"train": features.fit_transform(texts["train"])}
    X.update({s: features.transform(texts[s]) for s in ("validation", "test")})
    fits = {C: LogisticRegression(C=C, max_iter=2000).fit(X["train"], labels["train"]) for C in C_VALUES}
    best = max(C_VALUES, key=lambda C: fits[C].score(X["validation"], labels["validation"]))
    predicted = fits[best].predict(X["test"])
    return {"C": best, "accuracy": float(np.mean(predicted == labels["test"])),
            "macro_f1": float(f1_score(labels["test"], predicted, average="macro")),
            "correct": predicted == labels["test"]}


def test_scores(model: nn.Module, test: Split) -> tuple[float, float]:
    """Accuracy and macro-F1 on the test split, as the evaluate stage computes them."""
    predicted = predict_logits(model, test.X, pad_id=test.pad_id).argmax(1).numpy()
    truth = test.y.numpy()
    return float(np.mean(predicted == truth)), float(f1_score(truth, predicted, average="macro"))


def seed_runs(workspace: Path, params: dict, seeds: int) -> dict[int, dict[str, tuple[float, float]]]:
    """Test accuracy and macro-F1 of the scratch and the distilled student per seed, trained as the
    train_student and distill stages do; the pipeline's own seed reuses its models."""
    prepared = workspace / "data" / "prepared"
    test = load_split(prepared, "test", read_json(prepared / "schema.json")["classes"])
    distill = from_dict(DistillParams, params["distill"], "distill")
    runs = {}
    for seed in range(seeds):
        if seed == params["student"]["train"]["seed"]:
            models = {role: load_model(workspace / "models" / f"{role}.safetensors")[0]
                      for role in ("student", "distilled")}
        else:
            student = from_dict(ModelParams, {**params["student"],
                                              "train": {**params["student"]["train"], "seed": seed}}, "student")
            models = {"student": train_model(prepared, student, role="student").model,
                      "distilled": train_model(prepared, student, role="distilled",
                                               teacher_path=workspace / "models" / "teacher.safetensors",
                                               distill=distill).model}
        runs[seed] = {role: test_scores(model, test) for role, model in models.items()}
    return runs


def layer_seed_runs(workspace: Path, params: dict, seeds: int) -> dict[int, dict[str, tuple[float, float]]]:
    """Per seed: recipe LAYERS_RECIPE's first step (teacher layers kept, distilled; fp32) against a model of the
    same shape from random initialisation trained on the labels with the same fine-tuning recipe and seed."""
    prepared = workspace / "data" / "prepared"
    test = load_split(prepared, "test", read_json(prepared / "schema.json")["classes"])
    teacher_path = workspace / "models" / "teacher.safetensors"
    teacher_config = read_config(teacher_path)
    compress_params = from_dict(CompressParams, params["compress"], "compress")
    distill = from_dict(DistillParams, params["distill"], "distill")
    raw = params["compress"]["recipes"][LAYERS_RECIPE]
    kept = workspace / "models" / "candidates" / LAYERS_RECIPE / "step1-layer_prune.safetensors"  # the pipeline's
    runs = {}
    for seed in range(seeds):
        overrides = {**compress_params.finetune, **raw.get("finetune", {}), "seed": seed}
        if seed == teacher_config["train"]["seed"] and kept.exists():
            distilled = load_model(kept)[0]
        else:
            out = workspace / "seeds" / f"{LAYERS_RECIPE}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            recipe = parse_recipe(LAYERS_RECIPE, {**raw, "finetune": overrides, "steps": raw["steps"][:1]})
            chain = compress(recipe, prepared, teacher_path, teacher_path, out, compress_params, distill)
            distilled = load_model(chain[-1].file)[0]
        shape = {**teacher_config["model"], "num_hidden_layers": len(distilled.bert.encoder.layer)}
        train = dataclasses.asdict(finetune_recipe(teacher_config, overrides))
        scratch = train_model(prepared, from_dict(ModelParams, {"model": shape, "train": train}, "student"),
                              role="student").model
        runs[seed] = {"student": test_scores(scratch, test), "distilled": test_scores(distilled, test)}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, help="student seeds 0..N-1 for scratch vs distilled (default 3; smoke 1)")
    parser.add_argument("--out", type=Path, help="workspace (default bench/out/text, smoke bench/out/text_smoke)")
    parser.add_argument("--reuse", action="store_true", help="keep the workspace of an earlier run")
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration, to check the script quickly")
    args = parser.parse_args()

    params = benchmark_params("text.yaml")
    if args.smoke:
        params = smoke_params(params)
    workspace = args.out or ROOT / "bench" / "out" / ("text_smoke" if args.smoke else "text")
    seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 3)
    if args.reuse:
        write_params(workspace, params)
    else:
        shutil.rmtree(workspace, ignore_errors=True)
        copy_pipeline(workspace, params)
    # Rewritten on --reuse too: the same bytes, so DVC sees no change.
    subset = write_subset(NOUNS, workspace / params["data"]["path"], params["data"]["classes"],
                          SMOKE_ROWS if args.smoke else ROWS, params["data"]["seed"])
    timed(["shrinkflow", "check"], workspace)
    stages = topological_order(load_stages(workspace / "dvc.yaml"))
    teacher_file = workspace / "models" / "teacher.safetensors"
    before = teacher_file.stat().st_mtime_ns if teacher_file.exists() else None
    stage_times = {stage: timed(["dvc", "repro", "--single-item", stage], workspace) for stage in stages}
    teacher_trained = teacher_file.stat().st_mtime_ns != before  # --reuse may keep it: then its time is no figure

    os.chdir(workspace)  # stages resolve models/pretrained and params.yaml from the workspace
    prepared = workspace / "data" / "prepared"
    baseline = tfidf_baseline(prepared)
    comparisons = {"the small student (train_student and distill stages)": seed_runs(workspace, params, seeds)}
    if LAYERS_RECIPE in params["compress"]["recipes"]:
        comparisons[f"{LAYERS_RECIPE}'s layers (teacher layers, distilled) against the same shape from random "
                    f"initialisation"] = layer_seed_runs(workspace, params, seeds)
    report(subset, read_json(prepared / "schema.json"), read_json(workspace / "reports" / "evaluation.json"),
           pd.read_csv(workspace / "reports" / "predictions.csv", dtype=str), stage_times, teacher_trained,
           baseline, comparisons, params["compress"]["recipes"], read_config(teacher_file)["model"])


def int8_matmul_speedup(width: int, inner: int, layers: int, tokens: int, threads: int) -> float:
    """fp32 / dynamic-int8 batch-1 p50 on ONNX Runtime of the teacher's MLP matrix products alone (`layers`
    times width -> inner -> width, `tokens` rows), timed as evaluate times models: int8's best case on this
    CPU, since the rest of a transformer (attention scores, softmax, normalisation, GELU) stays fp32."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], INPUT
    for i in range(layers):
        for name, shape in ((f"up{i}", (width, inner)), (f"down{i}", (inner, width))):
            weights.append(numpy_helper.from_array(rng.normal(0, 0.05, shape).astype(np.float32), name))
            output = OUTPUT if (i, name[0]) == (layers - 1, "d") else f"{name}_out"
            nodes.append(helper.make_node("MatMul", [previous, name], [output]))
            previous = output
    rows = ["batch", tokens, width]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, rows)],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, rows)], weights)
    X = torch.from_numpy(rng.normal(size=(100, tokens, width)).astype(np.float32))
    params = EvaluateParams(threads=threads, rounds=3, latency_repeats=100, throughput_batch=1,
                            throughput_repeats=1, device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        fp32, int8 = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), fp32)
        quant_pre_process(str(fp32), str(fp32))  # as the pipeline's int8 does
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        speeds = measure_speeds({path: runner(OnnxClassifier(path, threads)) for path in (fp32, int8)}, X, params)
    return speedup(speeds[fp32], speeds[int8])[0]


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def table(header: list[str], rows: list[list[str]]) -> None:
    print(f"| {' | '.join(header)} |")
    print(f"|{'|'.join('---' for _ in header)}|")
    for row in rows:
        print(f"| {' | '.join(row)} |")


def drop_text(comparison: dict) -> str:
    """Points below the reference with the 95 % interval of the paired drop (the change's, negated)."""
    low, high = comparison["ci95_points"]
    return f"{-comparison['accuracy_change_points']:+.2f} [{-high:+.2f}, {-low:+.2f}]"


def mean_sd(values: list[float], scale: float = 100, digits: int = 2) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def gap_closed(teacher: float, scratch: float, distilled: float) -> float:
    """The fraction of the scratch student's accuracy gap to the teacher that distillation closes."""
    return (distilled - scratch) / (teacher - scratch) if teacher > scratch else float("nan")


def report(subset: dict, schema: dict, evaluation: dict, predictions: pd.DataFrame, stage_times: dict[str, float],
           teacher_trained: bool, baseline: dict, comparisons: dict[str, dict], recipes: dict[str, dict],
           shape: dict) -> None:
    """`shape`: the teacher's model config (its BERT sizes)."""
    models = evaluation["models"]
    teacher = models["teacher"]
    fastest = evaluation["reference_runtime"]
    sizes = schema["sizes"]

    print(f"\n## Data\n\n{NOUNS.name}: {subset['rows']:,} rows, {subset['distinct']:,} distinct texts; "
          f"{subset['sampled']:,} sampled over {len(schema['classes'])} classes, split "
          f"{' / '.join(f'{sizes[s]:,}' for s in SPLITS)} (train / validation / test), max_length "
          f"{schema['max_length']}, texts cut: {sum(schema['truncated'].values())}")

    print("\n## Stage wall times (dvc repro --single-item)\n")
    table(["stage", "seconds"], [[stage, f"{seconds:.1f}"] for stage, seconds in stage_times.items()])
    teacher_seconds = stage_times["train_teacher"]
    if teacher_trained:
        print(f"\nteacher fine-tune (train_teacher stage): {teacher_seconds / 60:.1f} min "
              f"(target <= 15 min: {met(teacher_seconds <= 15 * 60)})")
    else:
        print("\nteacher fine-tune: not measured, --reuse kept the earlier run's teacher")

    print("\n## Teacher and TF-IDF baseline (test split)\n")
    versus = paired_comparison(predictions["teacher"] == predictions["actual"], baseline["correct"])
    table(["model", "accuracy", "macro-F1", "drop vs teacher, pts [95% CI]"], [
        [f"teacher (all-MiniLM-L6-v2, {teacher['parameters']:,} parameters)", f"{100 * teacher['accuracy']:.2f}%",
         f"{teacher['macro_f1']:.4f}", ""],
        [f"TF-IDF + logistic regression (C={baseline['C']:g}, picked on validation)",
         f"{100 * baseline['accuracy']:.2f}%", f"{baseline['macro_f1']:.4f}", drop_text(versus)]])

    print(f"\n## Every candidate against the teacher (speed-up vs the teacher on its fastest runtime, {fastest}; "
          f"{evaluation['threads']} thread, throughput at batch {evaluation['throughput_batch']})\n")
    rows = [["teacher", "", teacher["runtime"], f"{100 * teacher['accuracy']:.2f}%", f"{teacher['macro_f1']:.4f}", "",
             f"{teacher['file_bytes']:,}", "1.0", f"{teacher['latency_ms_p50']:.2f}",
             f"{teacher['latency_ms_p95']:.2f}", f"{teacher['speedup']:.2f}", f"{teacher['throughput_per_s']:,.0f}"]]
    for name, m in models.items():
        if name != "teacher":
            rows.append([name, m["source"] or "", m["runtime"], f"{100 * m['accuracy']:.2f}%", f"{m['macro_f1']:.4f}",
                         drop_text(m["vs_teacher"]), f"{m['file_bytes']:,}", f"{m['size_reduction']:.1f}",
                         f"{m['latency_ms_p50']:.2f}", f"{m['latency_ms_p95']:.2f}", f"{m['speedup']:.2f}",
                         f"{m['throughput_per_s']:,.0f}"])
    table(["model", "source", "runtime", "accuracy", "macro-F1", "drop, pts [95% CI]", "bytes", "size x",
           "p50 ms", "p95 ms", "speed-up", "samples/s"], rows)

    print("\n## Targets\n")
    int8 = models["int8_teacher"]
    int8_drop = 100 * (teacher["accuracy"] - int8["accuracy"])
    int8_speedup = int8["speedup_by_runtime"]["onnxruntime"]
    print(f"- int8 teacher: drop {drop_text(int8['vs_teacher'])} pts (target <= 1: {met(int8_drop <= 1)}); "
          f"{int8_speedup:.2f}x the fp32 teacher's p50 on ONNX Runtime (target >= 2x: {met(int8_speedup >= 2)})")
    fp32 = teacher["runtimes"]["onnxruntime"]
    ceiling = {tokens: int8_matmul_speedup(shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
                                           int(tokens), evaluation["threads"])
               for tokens in (fp32["tokens_short"], fp32["tokens_long"])}
    print(f"  (whole model: {fp32['latency_ms_p50_short'] / int8['latency_ms_p50_short']:.2f}x on the short half "
          f"of the texts, {fp32['latency_ms_p50_long'] / int8['latency_ms_p50_long']:.2f}x on the longest tenth; "
          "int8's best case on this CPU, the teacher's MLP matrix products alone: "
          + ", ".join(f"{speed:.2f}x at {tokens:.0f} tokens" for tokens, speed in ceiling.items()) + ")")

    def goals(m: dict) -> tuple[bool, bool, bool]:
        return m["accuracy"] >= 0.97 * teacher["accuracy"], m["size_reduction"] >= 10, m["speedup"] >= 5

    # the distilled stage, what is made from it, and recipes fine-tuned by distillation from the teacher
    distilled = {n: m for n, m in models.items() if n == "distilled" or m["source"] == "distilled"
                 or recipes.get(n, {}).get("teacher")}
    name, best = max(distilled.items(), key=lambda item: (sum(goals(item[1])), item[1]["accuracy"]))
    retained, smaller, faster = goals(best)
    print(f"- best distilled candidate, {name} (most targets met, then accuracy): retains "
          f"{100 * best['accuracy'] / teacher['accuracy']:.1f}% of the teacher's accuracy (target >= 97%: "
          f"{met(retained)}), {best['size_reduction']:.1f}x smaller (target >= 10x: {met(smaller)}), p50 "
          f"{best['speedup']:.2f}x faster on {best['runtime']} (target >= 5x: {met(faster)})")

    for title, runs in comparisons.items():
        if runs:
            seed_table(title, teacher["accuracy"], runs)


def seed_table(title: str, teacher_accuracy: float, runs: dict) -> None:
    print(f"\n## Distillation against scratch training: {title}, {len(runs)} seed(s) (test split)\n")
    rows, closed = [], []
    for seed, run in runs.items():
        (scratch, scratch_f1), (distill, distill_f1) = run["student"], run["distilled"]
        closed.append(gap_closed(teacher_accuracy, scratch, distill))
        rows.append([str(seed), f"{100 * scratch:.2f}%", f"{scratch_f1:.4f}", f"{100 * distill:.2f}%",
                     f"{distill_f1:.4f}", f"{100 * closed[-1]:.0f}%"])
    column = {key: [run[role][i] for run in runs.values()]
              for key, role, i in (("scratch", "student", 0), ("scratch_f1", "student", 1),
                                   ("distilled", "distilled", 0), ("distilled_f1", "distilled", 1))}
    rows.append(["mean ± sd", f"{mean_sd(column['scratch'])}%", mean_sd(column["scratch_f1"], 1, 4),
                 f"{mean_sd(column['distilled'])}%", mean_sd(column["distilled_f1"], 1, 4),
                 f"{mean_sd(closed, digits=0)}%"])
    table(["seed", "scratch accuracy", "scratch macro-F1", "distilled accuracy", "distilled macro-F1",
           "gap to teacher closed"], rows)
    scratch = statistics.mean(column["scratch"])
    closed_mean = gap_closed(teacher_accuracy, scratch, statistics.mean(column["distilled"]))
    print(f"\nof the mean scratch-to-teacher gap ({100 * (teacher_accuracy - scratch):.2f} pts), distillation "
          f"closes {100 * closed_mean:.0f}% (target >= 50%: {met(closed_mean >= 0.5)})")

if __name__ == "__main__":
    main()
