"""Compression of users' own architectures (tests/user_architectures.py): a ResNet with batch norm and a
projection shortcut, and a transformer with a tied output head. Structured pruning through Torch-Pruning's
dependency graph, saved and loaded from the file alone, exported to ONNX; recipes that cannot apply to an
architecture are refused by a dry run before anything trains, and the search skips them. Structured pruning
takes fewer multiply-accumulates, and the real `dvc repro` completes every stage with them as teacher and student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
import yaml
from torch import nn

from tasks import compress as compress_stage
from tasks.compress import CompressParams, compress, parse_recipe
from tasks.compression.methods import NotApplicable
from tasks.compression.quantization import OnnxClassifier, export_onnx
from tasks.compression.structured import structured_prune
from tasks.models import (
    ModelFileError,
    build_model,
    count_parameters,
    load_model,
    read_config,
    save_model,
)
from tasks.params import DistillParams, ModelParams, from_dict
from tasks.search import SearchParams, check_recipes, search
from tasks.train_teacher import train_teacher
from tasks.training import load_split, predict_logits
from tasks.workspace import write_params
from tests.conftest import RECIPE, run, tiny_params

RESNET = {"arch": "tests.user_architectures:resnet", "width": 8, "blocks": 2}
TRANSFORMER = {"arch": "tests.user_architectures:transformer", "dim": 16, "heads": 2, "layers": 2, "mlp": 32}
HARD_WIRED = {"arch": "tests.test_any_model:hard_wired"}
TRAINING = {RESNET["arch"]: {"epochs": 3}, TRANSFORMER["arch"]: {"epochs": 12, "lr": 0.005, "augment_shift": 0}}
FINETUNE = {"epochs": 4, "augment_shift": 0, "lr": 0.003, "schedule": "constant"}


class HardWired(nn.Module):
    """A user's model whose forward hard-codes a width (8 channels): no structured pruning can keep it running."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8 * 64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).reshape(-1, 8 * 64))


def hard_wired(input_shape: list[int], n_classes: int) -> nn.Module:
    return HardWired(n_classes)


@pytest.fixture(autouse=True)
def params_configuring_the_architectures(tmp_path, monkeypatch):
    """A workspace whose params.yaml configures the users' architectures, so model files naming them load."""
    params = tiny_params()
    params["teacher"]["model"] = RESNET
    params["student"]["model"] = TRANSFORMER
    params["compress"]["recipes"] = {"odd": {"source": "teacher", "steps": [
        {"method": "distill", "model": HARD_WIRED}, {"method": "structured_prune", "ratio": 0.5}], "teacher": "teacher"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return params


def trained(digits_dir, directory, spec, **train):
    """A user-architecture model trained briefly on digits, saved as a pipeline model file."""
    path = directory / f"{spec['arch'].rpartition(':')[2]}.safetensors"
    result = train_teacher(digits_dir, from_dict(ModelParams, {"model": spec, "train": dict(RECIPE, **train)},
                                                 "teacher"))
    save_model(result.model, path, result.config)
    return path


@pytest.fixture(scope="module")
def teachers(digits_dir, tmp_path_factory) -> dict[str, object]:
    """Each user architecture trained briefly on digits: the teacher (and source) of the recipes."""
    directory = tmp_path_factory.mktemp("user_teachers")
    return {spec["arch"]: trained(digits_dir, directory, spec, **TRAINING[spec["arch"]]) for spec in (RESNET, TRANSFORMER)}


def accuracy(model, split) -> float:
    return float((predict_logits(model, split.X).argmax(1) == split.y).float().mean())


@pytest.mark.parametrize("spec", [RESNET, TRANSFORMER], ids=["resnet", "transformer"])
def test_structured_pruning_shrinks_any_graph_and_the_file_alone_rebuilds_it(digits_dir, teachers, tmp_path, spec):
    source = teachers[spec["arch"]]
    recipe = parse_recipe("slim", {"source": "teacher", "steps": [{"method": "structured_prune", "ratio": 0.5}]})
    params = CompressParams(finetune=FINETUNE, recipes={}, calibration_samples=32)
    (tmp_path / "out").mkdir()
    chain = compress(recipe, digits_dir, source, None, tmp_path / "out", params, DistillParams())

    original, _ = load_model(source)
    pruned, config = load_model(chain[-1].file)  # from the file alone: its config records the pruned shapes
    assert count_parameters(pruned) < 0.45 * count_parameters(original)
    assert config["model"] == spec and config["pruned_shapes"]
    schema = json.loads((digits_dir / "schema.json").read_text())
    test = load_split(digits_dir, "test", schema["classes"])
    assert accuracy(pruned, test) > 0.5  # ten classes: chance is 0.1
    if spec is RESNET:  # each residual add sees equal widths on both sides
        for block in pruned.blocks:
            shortcut = block.shortcut[0].out_channels if isinstance(block.shortcut, nn.Sequential) else \
                block.conv1.in_channels
            assert block.conv2.out_channels == block.bn2.num_features == shortcut < 2 * spec["width"]
    else:  # the head is still the class embedding, every layer at the pruned width, heads kept
        assert pruned.head.weight is pruned.class_tokens.weight
        width = pruned.class_tokens.embedding_dim
        assert width < spec["dim"] and pruned.position.shape[-1] == width
        for layer in pruned.encoder.layers:
            attention = layer.self_attn
            assert attention.num_heads == spec["heads"] and attention.embed_dim == width
            assert attention.in_proj_weight.shape == (3 * width, width) and layer.linear1.out_features < spec["mlp"]

    # ONNX Runtime runs the exported graph at batch 256 with the model's own outputs.
    runtime = OnnxClassifier(tmp_path / "out" / "runtime.onnx")
    batch = test.X[:256]
    assert torch.allclose(runtime(batch), predict_logits(pruned, batch), atol=1e-4)


@pytest.mark.parametrize("spec", [RESNET, TRANSFORMER], ids=["resnet", "transformer"])
def test_chained_recipe_with_layer_pruning_recovers_by_distillation(digits_dir, teachers, tmp_path, spec):
    teacher = teachers[spec["arch"]]
    recipe = parse_recipe("chain", {"source": "teacher", "teacher": "teacher", "steps": [
        {"method": "layer_prune"}, {"method": "structured_prune", "ratio": 0.5}, {"method": "prune", "sparsity": 0.5,
                                                                                "rounds": 1},
        {"method": "share", "bits": 4}, {"method": "quantize", "mode": "int8_dynamic"}]})
    params = CompressParams(finetune=dict(FINETUNE, epochs=2), recipes={}, calibration_samples=32)
    chain = compress(recipe, digits_dir, teacher, teacher, tmp_path, params, DistillParams())

    assert [link.method for link in chain] == ["source", "layer_prune", "structured_prune", "prune", "share", "quantize"]
    thinned, config = load_model(chain[1].file)
    if spec is RESNET:  # of the two width-keeping blocks of stage 1 one stays; the projection block stays
        assert len(thinned.blocks) == 3 and config["removed_layers"] == [["blocks.1"]]
    else:
        assert len(thinned.encoder.layers) == 1 and config["removed_layers"] == [["encoder.layers.1"]]
    for link in chain[2:5]:  # each later step loads from its file alone, one layer fewer and narrower
        model, config = load_model(link.file)
        assert config["removed_layers"] == load_model(chain[1].file)[1]["removed_layers"]
        assert count_parameters(model) < 0.45 * chain[0].parameters
    schema = json.loads((digits_dir / "schema.json").read_text())
    test = load_split(digits_dir, "test", schema["classes"])
    final = OnnxClassifier(chain[-1].file)  # int8 in ONNX Runtime, at batch 256
    assert float((final(test.X[:256]).argmax(1) == test.y[:256]).float().mean()) > 0.3  # chance is 0.1


@pytest.mark.parametrize("spec", [RESNET, TRANSFORMER], ids=["resnet", "transformer"])
def test_pruned_model_saves_and_loads_with_the_same_outputs(tmp_path, spec):
    torch.manual_seed(0)
    model = build_model(spec, [1, 8, 8], 10)
    small, recorded = structured_prune(model, 0.5, lambda: build_model(spec, [1, 8, 8], 10), torch.zeros(2, 1, 8, 8))
    config = {"model": spec, "input_shape": [1, 8, 8], "classes": list(range(10)), **recorded}
    save_model(small, tmp_path / "small.safetensors", config)
    loaded, _ = load_model(tmp_path / "small.safetensors")
    x = torch.rand(256, 1, 8, 8)
    assert count_parameters(loaded) == count_parameters(small) < count_parameters(model)
    assert torch.equal(loaded(x), small(x))


def attention_layers(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.num_heads, m.head_dim) for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


@pytest.mark.parametrize("ratio, heads, expected", [(0.0, 0.5, (2, 4)), (0.5, 0.5, (2, 2)), (0.0, 0.9, (1, 4))])
def test_structured_pruning_removes_whole_attention_heads(tmp_path, ratio, heads, expected):
    """Four heads of width 4: `heads` removes whole ones (the same in both layers, which share the residual
    stream), `ratio` then narrows those left. The file records the head counts; it loads and exports."""
    spec = dict(TRANSFORMER, heads=4)
    torch.manual_seed(0)
    model = build_model(spec, [1, 8, 8], 10)
    assert attention_layers(model) == [(4, 4)] * 2
    small, recorded = structured_prune(model, ratio, lambda: build_model(spec, [1, 8, 8], 10),
                                       torch.zeros(2, 1, 8, 8), heads=heads)
    assert attention_layers(small) == [expected] * 2
    assert recorded["attention_heads"] == {f"encoder.layers.{i}.self_attn": expected[0] for i in range(2)}
    config = {"model": spec, "input_shape": [1, 8, 8], "classes": list(range(10)), **recorded}
    save_model(small, tmp_path / "small.safetensors", config)
    loaded, _ = load_model(tmp_path / "small.safetensors")
    x = torch.rand(64, 1, 8, 8)
    assert attention_layers(loaded) == [expected] * 2 and torch.equal(loaded(x), small(x))
    export_onnx(loaded, tmp_path / "small.onnx", config)
    assert torch.allclose(OnnxClassifier(tmp_path / "small.onnx")(x), small(x), atol=1e-4)


@pytest.mark.parametrize("structure, message", [
    ({"pruned_shapes": {"head.weight": [10, 4000]}},
     r"pruned_shapes.head.weight: \[10, 4000\] is not a shape of 2 sizes from 1 up to the architecture's \[10, 16\]"),
    ({"pruned_shapes": {"os.system": [1]}}, r"pruned_shapes: 'os.system' is not a tensor of the architecture"),
    ({"pruned_shapes": [1, 2]}, r"pruned_shapes: a mapping of tensor name to shape"),
    ({"removed_layers": [["blocks.9"]]}, r"removed_layers: 'blocks.9' is not a block of a Sequential or ModuleList"),
    ({"removed_layers": [["head"]]}, r"removed_layers: 'head' is not a block"),
    ({"removed_layers": [["blocks.0", "blocks.1", "blocks.2", "blocks.3"]]}, r"would remove every block of 'blocks'"),
])
def test_recorded_structure_from_an_untrusted_file_is_checked(tmp_path, structure, message):
    config = {"model": RESNET, "input_shape": [1, 8, 8], "classes": list(range(10)), **structure}
    save_model(build_model(RESNET, [1, 8, 8], 10), tmp_path / "crafted.safetensors", config)
    with pytest.raises(ModelFileError, match=message):
        load_model(tmp_path / "crafted.safetensors")


@pytest.mark.parametrize("heads, message", [
    ({"encoder.layers.0.self_attn": 8}, r"attention_heads.encoder.layers.0.self_attn: 8 is not a head count from 1 "
                                        r"up to the architecture's 2"),
    ({"encoder.layers.0.self_attn": 0}, r"is not a head count"),
    ({"head": 1}, r"attention_heads: 'head' is not a MultiheadAttention of the architecture"),
    ({"encoder.layers.0.self_attn": True}, r"is not a head count"),
    ([1], r"attention_heads: a mapping of attention layer name to head count"),
])
def test_recorded_head_counts_from_an_untrusted_file_are_checked(tmp_path, heads, message):
    config = {"model": TRANSFORMER, "input_shape": [1, 8, 8], "classes": list(range(10)), "attention_heads": heads}
    save_model(build_model(TRANSFORMER, [1, 8, 8], 10), tmp_path / "crafted.safetensors", config)
    with pytest.raises(ModelFileError, match=message):
        load_model(tmp_path / "crafted.safetensors")


def test_recipe_that_cannot_apply_is_refused_before_training_naming_recipe_and_reason(
        digits_dir, tmp_path, params_configuring_the_architectures):
    params = params_configuring_the_architectures
    params["student"]["model"] = {"arch": "mlp", "hidden": [16]}  # the search's source: a quick ONNX export
    problems = check_recipes(params)
    assert len(problems) == 1
    assert problems[0].startswith("compress.recipes.odd.steps[1]: structured_prune ratio=0.5 heads=0.0 cannot apply to "
                                  "architecture 'tests.test_any_model:hard_wired': ")
    assert "no longer runs" in problems[0]
    params["compress"]["recipes"]["odd"]["steps"][0]["model"] = {"arch": "mlp", "hidden": [16]}
    assert check_recipes(params) == []

    # The stage dry-runs its recipe on the source model: it stops before training and writes nothing.
    source = trained(digits_dir, tmp_path, HARD_WIRED, epochs=1)
    params["teacher"]["model"] = HARD_WIRED
    params["compress"]["recipes"]["odd"] = {"source": "teacher", "steps": [{"method": "structured_prune", "ratio": 0.5}]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"success": True, "failures": []}))
    with pytest.raises(NotApplicable, match=r"compress.recipes.odd.steps\[0\]: structured_prune ratio=0.5 heads=0.0 "
                                            r"cannot apply to architecture 'tests.test_any_model:hard_wired'"):
        compress_stage.run(["odd", str(digits_dir), str(validation), str(source), str(source),
                            str(tmp_path / "candidates" / "odd")])
    assert not (tmp_path / "candidates").exists()


def test_search_skips_a_template_that_cannot_apply_and_runs_the_rest(digits_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    trained(digits_dir, tmp_path, HARD_WIRED, epochs=1).rename(models / "teacher.safetensors")
    space = [[{"method": "structured_prune", "ratio": [0.5]}], [{"method": "prune", "sparsity": [0.3], "rounds": 1}]]
    params = SearchParams(source="teacher", teacher="", max_accuracy_drop=50.0, budget=4, space=space)
    compress_params = CompressParams(finetune={"epochs": 1, "augment_shift": 0}, recipes={}, calibration_samples=32)
    record = search(digits_dir, models, tmp_path / "search", params, compress_params, DistillParams())
    assert [t["steps"] for t in record["trials"]] == [[{"method": "prune", "sparsity": 0.3, "rounds": 1}]]
    assert [s["steps"] for s in record["skipped"]] == [[{"method": "structured_prune", "ratio": 0.5}]]
    assert "structured_prune ratio=0.5 heads=0.0 cannot apply to architecture 'tests.test_any_model:hard_wired'" in \
        record["skipped"][0]["reason"]
    assert json.loads((tmp_path / "search" / "lineage.json").read_text())["chain"][1]["method"] == "prune"


def macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass, attention projections included (Torch-Pruning's op counter)."""
    operations, _ = tp.utils.count_ops_and_params(model, example)
    return int(operations)


@pytest.mark.parametrize("spec", [RESNET, TRANSFORMER], ids=["resnet", "transformer"])
def test_structured_pruning_takes_fewer_multiply_accumulates(spec):
    torch.manual_seed(0)
    model = build_model(spec, [1, 8, 8], 10).eval()
    example = torch.zeros(1, 1, 8, 8)
    small, _ = structured_prune(model, 0.5, lambda: build_model(spec, [1, 8, 8], 10), torch.zeros(2, 1, 8, 8))
    # Half the channels of each group: roughly a quarter of the MACs where both sides of a layer shrink.
    assert macs(small, example) < 0.5 * macs(model, example)


USER_ARCHITECTURES_MODULE = "architectures/users.py"  # tests/user_architectures.py, placed as a user would


def test_dvc_repro_with_user_architectures_completes_every_stage(repo_copy):
    """The transformer is the teacher, the ResNet the student and distillation target: every method runs on
    both through the real stages (one repro for both keeps the test short)."""
    (repo_copy / USER_ARCHITECTURES_MODULE).write_text(Path(__file__).with_name("user_architectures.py").read_text())
    params = tiny_params()
    params["teacher"] = {"model": dict(TRANSFORMER, arch="architectures.users:transformer"),
                         "train": dict(RECIPE, epochs=8, lr=0.005, augment_shift=0)}
    params["student"]["model"] = dict(RESNET, arch="architectures.users:resnet", width=4)
    params["compress"]["finetune"] = dict(FINETUNE, epochs=1)
    params["compress"]["recipes"] = {
        "slim": {"source": "teacher", "teacher": "teacher", "steps": [{"method": "structured_prune", "ratio": 0.5}]},
        "chain": {"source": "teacher", "teacher": "teacher", "steps": [
            {"method": "layer_prune"}, {"method": "structured_prune", "ratio": 0.5, "heads": 0.5},
            {"method": "prune", "sparsity": 0.5, "rounds": 1}, {"method": "share", "bits": 4},
            {"method": "quantize", "mode": "int8_dynamic"}]},
    }
    # The search structurally prunes the distilled ResNet.
    params["search"].update(source="distilled", teacher="teacher", budget=1,
                            space=[[{"method": "structured_prune", "ratio": [0.5]}]])
    write_params(repo_copy, params)

    assert run(["shrinkflow", "check"], repo_copy).stdout.strip() == "params.yaml: 13 sections valid"
    run(["dvc", "repro"], repo_copy)

    # Every stage ran and is recorded: nothing is stale.
    assert run(["dvc", "status"], repo_copy).stdout.strip() == "Data and pipelines are up to date."
    stages = yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]
    assert {"train_teacher", "train_student", "distill", "compress@slim", "compress@chain",
            "search", "evaluate", "gate"} <= set(stages)
    evaluation = json.loads((repo_copy / "reports" / "evaluation.json").read_text())
    verdicts = json.loads((repo_copy / "reports" / "gate.json").read_text())["verdicts"]
    candidates = ["student", "distilled", "slim", "chain", "search"]
    models = evaluation["models"]
    assert sorted(models) == sorted(["teacher", *candidates]) and sorted(verdicts) == sorted(candidates)
    for candidate in candidates:
        assert 0.1 < models[candidate]["accuracy"] <= 1.0  # ten classes: chance is 0.1
        assert verdicts[candidate]["accuracy_drop_test"]
    for slim, source in (("slim", "teacher"), ("search", "distilled")):  # half the channels: under half the weights
        assert models[slim]["parameters"] < 0.5 * models[source]["parameters"], slim
        assert models[slim]["runtime"] == "pytorch" and set(models[slim]["runtimes"]) == {"pytorch", "onnxruntime"}
        assert all(speed["latency_ms_p50"] > 0 for speed in models[slim]["runtimes"].values())
    assert models["chain"]["runtime"] == "onnxruntime" and models["chain"]["parameters"] < models["slim"]["parameters"]
    lineage = json.loads((repo_copy / "models" / "candidates" / "chain" / "lineage.json").read_text())
    assert [link["method"] for link in lineage["chain"]] == ["source", "layer_prune", "structured_prune", "prune",
                                                             "share", "quantize"]
    # One of the two layers and one of its two heads are left; the file records both.
    structured = read_config(repo_copy / "models" / "candidates" / "chain" / "step2-structured_prune.safetensors")
    assert structured["removed_layers"] == [["encoder.layers.1"]]
    assert structured["attention_heads"] == {"encoder.layers.0.self_attn": 1}
