"""Compression methods on tiny models: real size reductions, faithful round trips, bounded accuracy loss."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors import safe_open
from torch import nn

from tasks.compression.pruning import magnitude_prune, prunable_weights, sparsity
from tasks.compression.quantization import (
    OnnxClassifier,
    OnnxExportError,
    export_onnx,
    quantize_onnx,
    read_onnx_config,
)
from tasks.compression.weight_sharing import kmeans_1d, share_weights
from tasks.encodings import encode_state, pack_bits, unpack_bits
from tasks.models import (
    build_model,
    configured_architectures,
    load_model,
    save_model,
    tied_aliases,
)
from tasks.params import ParamsError
from tasks.train_teacher import train_teacher
from tasks.training import load_split, make_finetune, predict_logits
from tests.conftest import model_params


@pytest.fixture(scope="module")
def test_split(digits_dir):
    return load_split(digits_dir, "test", list(range(10)))


@pytest.fixture(scope="module")
def source(digits_dir):
    """A small CNN trained well enough (~95 % on digits) that accuracy losses mean something."""
    trained = train_teacher(digits_dir, model_params("teacher", epochs=10, augment_shift=0))
    return trained.model, trained.config


@pytest.fixture(scope="module")
def finetune(digits_dir):
    return make_finetune(digits_dir, model_params("teacher", epochs=3, augment_shift=0, lr=0.003).train)


def accuracy(model, split) -> float:
    return float((predict_logits(model, split.X).argmax(1) == split.y).float().mean())


def payload_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file: without its header (the config JSON is the same for all)."""
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def expected_payload(model, bits: int | None = None) -> int:
    """Bytes the encoding should take: for each prunable weight (a tied one once) a 1-bit survivor mask
    (if sparse enough to pay) and its survivors as float32 or as b-bit codebook indices; other tensors dense."""
    prunable = {id(getattr(module, name)) for module, name in prunable_weights(model)}
    compressed = {name for name, p in model.named_parameters() if id(p) in prunable}
    total = 0
    aliases = tied_aliases(model)
    for name, tensor in model.state_dict().items():
        if name in aliases:
            continue
        if name not in compressed:
            total += tensor.numel() * tensor.element_size()
            continue
        survivors = int((tensor != 0).sum())
        mask = -(-tensor.numel() // 8) if survivors * 4 + tensor.numel() / 8 < tensor.numel() * 4 else 0
        n_values = survivors if mask else tensor.numel()
        total += mask + (-(-n_values * bits // 8) + 4 * 2**bits if bits else 4 * n_values)
    return total


def initializer_bytes(path) -> int:
    """Bytes of weights in an ONNX file (the graph itself is a fixed overhead on a tiny model)."""
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load_model(str(path)).graph.initializer)


def round_trip(model, config, path, architectures=None):
    save_model(model, path, config)
    return load_model(path, architectures)[0]


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_bit_packing_round_trips(bits):
    values = np.random.default_rng(bits).integers(0, 2**bits, size=1001)
    packed = pack_bits(values, bits)
    assert len(packed) == -(-1001 * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, 1001), values)


def test_dense_weights_are_stored_as_is():
    model = build_model({"arch": "mlp", "hidden": [32]}, [64], 10)
    state = model.state_dict()
    assert encode_state(state).keys() == state.keys()


# Per-layer pruning cuts the 72-weight first conv as hard as the rest, so it gets a lower target.
@pytest.mark.parametrize("scope, target", [("global", 0.75), ("layer", 0.5)])
def test_unstructured_pruning_shrinks_the_file_by_its_sparsity(source, test_split, finetune, tmp_path, scope, target):
    model, config = source
    dense = tmp_path / "dense.safetensors"
    save_model(model, dense, config)
    pruned = magnitude_prune(model, target, scope=scope, rounds=2, finetune=finetune)
    assert sparsity(pruned) == pytest.approx(target, abs=0.01)
    path = tmp_path / "pruned.safetensors"
    reloaded = round_trip(pruned, config, path)
    # A 1-bit mask plus the survivors: about 1/32 + (1 - target) of the dense bytes.
    assert payload_bytes(path) <= expected_payload(pruned) * 1.02
    assert payload_bytes(path) < payload_bytes(dense) * (1 / 32 + 1 - target) * 1.2
    assert torch.equal(predict_logits(reloaded, test_split.X), predict_logits(pruned, test_split.X))
    assert accuracy(pruned, test_split) > accuracy(model, test_split) - 0.05


@pytest.mark.parametrize("bits", [2, 4])
def test_weight_sharing_stores_a_codebook_and_packed_indices(source, test_split, finetune, tmp_path, bits):
    model, config = source
    dense = tmp_path / "dense.safetensors"
    save_model(model, dense, config)
    shared = share_weights(model, bits, finetune=finetune)
    for layer in (m for m in shared.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))):
        assert len(torch.unique(layer.weight)) <= 2**bits
    path = tmp_path / "shared.safetensors"
    reloaded = round_trip(shared, config, path)
    # b-bit indices instead of 32-bit floats (biases and norms stay float32).
    assert payload_bytes(path) <= expected_payload(shared, bits) * 1.02
    assert payload_bytes(path) < payload_bytes(dense) * (bits / 32) * 2
    assert torch.equal(predict_logits(reloaded, test_split.X), predict_logits(shared, test_split.X))
    assert accuracy(shared, test_split) > accuracy(model, test_split) - (0.03 if bits == 4 else 0.10)


def test_prune_then_share_composes(source, test_split, tmp_path):
    model, config = source
    pruned = magnitude_prune(model, 0.8)
    shared = share_weights(pruned, 4)
    assert sparsity(shared) >= 0.8  # pruned weights stay pruned
    dense = tmp_path / "dense.safetensors"
    save_model(model, dense, config)
    reloaded = round_trip(shared, config, tmp_path / "both.safetensors")
    assert payload_bytes(tmp_path / "both.safetensors") <= expected_payload(shared, 4) * 1.02
    assert payload_bytes(tmp_path / "both.safetensors") < payload_bytes(dense) / 6
    assert torch.equal(predict_logits(reloaded, test_split.X), predict_logits(shared, test_split.X))


@pytest.mark.parametrize("mode", ["int8_dynamic", "int8_static", "fp16"])
def test_quantized_onnx_model_is_smaller_and_close_to_its_source(source, digits_dir, test_split, tmp_path, mode):
    model, config = source
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32, config)
    onnx_logits = predict_logits(OnnxClassifier(fp32), test_split.X)
    assert torch.allclose(onnx_logits, predict_logits(model, test_split.X), atol=1e-4)

    calibration = load_split(digits_dir, "validation", list(range(10))).X.numpy()
    quantized = tmp_path / f"{mode}.onnx"
    quantize_onnx(fp32, quantized, mode, dict(config, quantization=mode), calibration)
    assert read_onnx_config(quantized)["quantization"] == mode
    expected_ratio = 1.9 if mode == "fp16" else 3  # 4 bytes -> 2 or 1 per weight, plus scales
    assert initializer_bytes(quantized) < initializer_bytes(fp32) / expected_ratio
    agreement = (predict_logits(OnnxClassifier(quantized), test_split.X).argmax(1) == onnx_logits.argmax(1))
    assert float(agreement.float().mean()) > 0.97


@pytest.mark.parametrize("call, message", [
    (lambda m: magnitude_prune(m, 1.0), "sparsity"),
    (lambda m: magnitude_prune(m, -0.1), "sparsity"),
    (lambda m: magnitude_prune(m, 0.5, scope="row"), "scope"),
    (lambda m: share_weights(m, 0), "bits"),
    (lambda m: share_weights(m, 9), "bits"),
])
def test_bad_settings_are_refused_with_the_field_named(call, message):
    with pytest.raises(ParamsError, match=message):
        call(build_model({"arch": "mlp", "hidden": [8]}, [64], 10))


# --- Users' own architectures: attention, tied weights, Embedding, Conv1d ---------------------------------

TRANSFORMER = {"arch": "tests.user_architectures:transformer", "patch": 4}
RESNET = {"arch": "tests.user_architectures:resnet", "width": 4, "blocks": 1}
CONV1D = {"arch": "tests.test_compression:conv1d_net"}
TIED_TOKENS = {"arch": "tests.test_compression:tied_tokens"}
USER_ARCHITECTURES = configured_architectures({"models": [TRANSFORMER, RESNET, CONV1D, TIED_TOKENS]})


def conv1d_net(input_shape, n_classes, channels=8):
    """Reads each image row as a time step of 8 features: a Conv1d over the rows, then a linear head."""
    return nn.Sequential(nn.Flatten(), nn.Unflatten(1, (input_shape[1], input_shape[2])),
                         nn.Conv1d(input_shape[1], channels, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(channels * input_shape[2], n_classes))


class TiedTokens(nn.Module):
    """Pixel intensities as tokens of an Embedding whose weight is also the output projection's: in ONNX one
    initializer read by a Gather and a Gemm."""

    def __init__(self, levels: int, dim: int, n_classes: int):
        super().__init__()
        self.levels = levels
        self.embed = nn.Embedding(levels + 1, dim)
        self.project = nn.Linear(dim, levels + 1)
        self.project.weight = self.embed.weight
        self.head = nn.Linear(levels + 1, n_classes)

    def forward(self, x):
        tokens = (x.flatten(1) * self.levels).round().long().clamp(0, self.levels)
        return self.head(torch.relu(self.project(self.embed(tokens).mean(dim=1))))


def tied_tokens(input_shape, n_classes, levels=16, dim=16):
    return TiedTokens(levels, dim, n_classes)


def user_config(spec):
    return {"model": spec, "input_shape": [1, 8, 8], "classes": list(range(10))}


@pytest.fixture(scope="module")
def transformer(digits_dir):
    """The tests' transformer (MultiheadAttention, head tied to the class-token Embedding), briefly trained."""
    params = dataclasses.replace(model_params("teacher", epochs=6, augment_shift=0, lr=0.003), model=TRANSFORMER)
    trained = train_teacher(digits_dir, params)
    return trained.model, trained.config


def attention_of(model):
    return model.encoder.layers[0].self_attn


def zeros(tensor) -> float:
    return float((tensor == 0).float().mean())


def test_pruning_reaches_attention_embedding_and_conv1d_weights(transformer):
    model, _ = transformer
    pruned = magnitude_prune(model, 0.6, scope="layer")
    attention = attention_of(pruned)
    for weight in (attention.in_proj_weight, attention.out_proj.weight, pruned.class_tokens.weight,
                   pruned.patch_embedding.weight):
        assert zeros(weight) == pytest.approx(0.6, abs=0.01)
    assert pruned.head.weight is pruned.class_tokens.weight  # still one tensor, pruned once
    assert sparsity(pruned) == pytest.approx(0.6, abs=0.01)
    conv = magnitude_prune(build_model(CONV1D, [1, 8, 8], 10), 0.5, scope="layer")[2]
    assert zeros(conv.weight) == pytest.approx(0.5, abs=0.01)
    separate = magnitude_prune(nn.MultiheadAttention(8, 2, kdim=4, vdim=6), 0.5, scope="layer")  # q/k/v_proj_weight
    for weight in (separate.q_proj_weight, separate.k_proj_weight, separate.v_proj_weight, separate.out_proj.weight):
        assert zeros(weight) == pytest.approx(0.5, abs=0.01)


def test_pruned_attention_model_finetunes_and_keeps_its_zeros(transformer, digits_dir, test_split, tmp_path):
    """MultiheadAttention reads out_proj.weight without calling out_proj: the mask must apply anyway."""
    model, config = transformer
    finetune = make_finetune(digits_dir, model_params("teacher", epochs=1, augment_shift=0, lr=0.003).train)
    pruned = magnitude_prune(model, 0.5, rounds=2, finetune=finetune)
    assert sparsity(pruned) == pytest.approx(0.5, abs=0.01)
    assert zeros(attention_of(pruned).out_proj.weight) > 0.2  # fine-tuning kept the mask on every weight
    assert pruned.head.weight is pruned.class_tokens.weight
    reloaded = round_trip(pruned, config, tmp_path / "pruned.safetensors", USER_ARCHITECTURES)
    assert torch.equal(predict_logits(reloaded, test_split.X), predict_logits(pruned, test_split.X))
    assert payload_bytes(tmp_path / "pruned.safetensors") <= expected_payload(pruned) * 1.02


def test_weight_sharing_covers_attention_and_tied_weights(transformer, digits_dir, test_split, tmp_path):
    model, config = transformer
    finetune = make_finetune(digits_dir, model_params("teacher", epochs=1, augment_shift=0, lr=0.003).train)
    shared = share_weights(model, 2, finetune=finetune)
    assert shared.head.weight is shared.class_tokens.weight
    for module, name in prunable_weights(shared):
        assert len(torch.unique(getattr(module, name))) <= 4, (type(module).__name__, name)
    assert len(torch.unique(attention_of(shared).in_proj_weight)) <= 4
    dense = tmp_path / "dense.safetensors"
    save_model(model, dense, config)
    path = tmp_path / "shared.safetensors"
    reloaded = round_trip(shared, config, path, USER_ARCHITECTURES)
    assert payload_bytes(path) <= expected_payload(shared, 2) * 1.02
    assert payload_bytes(path) < payload_bytes(dense) / 4
    assert torch.equal(predict_logits(reloaded, test_split.X), predict_logits(shared, test_split.X))


def test_weight_sharing_skips_a_fully_pruned_layer(digits_dir):
    model = build_model({"arch": "mlp", "hidden": [16, 16]}, [1, 8, 8], 10)
    with torch.no_grad():
        model[3].weight.zero_()
    finetune = make_finetune(digits_dir, model_params("student", epochs=1).train)
    shared = share_weights(model, 2, finetune=finetune)
    assert not shared[3].weight.any()  # still empty, even after fine-tuning
    assert len(torch.unique(shared[1].weight)) <= 4 and len(torch.unique(shared[5].weight)) <= 4


def lloyd_with_a_distance_matrix(values, k, iterations):
    """The textbook k-means on scalars (len(values) x k distances each step), as reference."""
    centroids = torch.linspace(float(values.min()), float(values.max()), k, dtype=torch.float64)
    for _ in range(iterations):
        assignment = (values[:, None] - centroids[None, :]).abs().argmin(dim=1)
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assignment, values)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids, (values[:, None] - centroids[None, :]).abs().argmin(dim=1)


@pytest.mark.parametrize("k, iterations", [(8, 30), (256, 5)])
def test_kmeans_is_lloyds_algorithm(k, iterations):
    values = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    centroids, assignment = kmeans_1d(values, k, iterations)
    reference_centroids, reference_assignment = lloyd_with_a_distance_matrix(values.double(), k, iterations)
    assert torch.allclose(centroids.double(), reference_centroids, atol=1e-6)
    assert torch.equal(assignment, reference_assignment)


def test_kmeans_memory_does_not_grow_with_the_codebook():
    """2M weights at 8 bits: a distance matrix would take 2M x 256 x 4 bytes = 2 GiB."""
    probe = """
import resource, torch
from tasks.compression.weight_sharing import kmeans_1d
values = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kmeans_1d(values, 256, iterations=3)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert int(result.stdout.strip()) < 200 * 1024  # KiB: a few copies of the 8 MB of values


def test_tied_weights_are_stored_once_and_tied_again_on_load(tmp_path):
    model = build_model(TRANSFORMER, [1, 8, 8], 10).eval()
    path = tmp_path / "tied.safetensors"
    save_model(model, path, user_config(TRANSFORMER))
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
    assert "class_tokens.weight" in stored and "head.weight" not in stored
    loaded, _ = load_model(path, USER_ARCHITECTURES)
    assert loaded.head.weight is loaded.class_tokens.weight
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_onnx_export_has_a_dynamic_batch_checked_at_1_and_256(transformer, digits_dir, test_split, tmp_path):
    model, config = transformer
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32, config)
    session = OnnxClassifier(fp32)
    for batch in (1, 256):
        x = test_split.X[:batch]
        assert torch.allclose(session(x), predict_logits(model, x), atol=1e-4)
    calibration = load_split(digits_dir, "validation", list(range(10))).X.numpy()
    reference = session(test_split.X[:256]).argmax(1)
    for mode in ("int8_dynamic", "int8_static"):
        quantized = tmp_path / f"{mode}.onnx"
        quantize_onnx(fp32, quantized, mode, dict(config, quantization=mode), calibration)
        assert initializer_bytes(quantized) < initializer_bytes(fp32) / 2
        logits = OnnxClassifier(quantized)(test_split.X[:256])
        assert logits.shape == (256, 10)
        # The briefly trained transformer's logits are close together; chance agreement would be 0.1.
        assert float((logits.argmax(1) == reference).float().mean()) > 0.5, mode


def test_onnx_export_of_a_residual_cnn_runs_at_any_batch_and_holds_no_local_paths(test_split, tmp_path):
    model = build_model(RESNET, [1, 8, 8], 10).eval()
    export_onnx(model, tmp_path / "resnet.onnx", user_config(RESNET))
    session = OnnxClassifier(tmp_path / "resnet.onnx")
    for batch in (1, 256):
        assert torch.allclose(session(test_split.X[:batch]), predict_logits(model, test_split.X[:batch]), atol=1e-4)
    # The exporter's stack traces name the checkout's files: the bytes would differ between clones.
    assert str(Path(__file__).parent.parent).encode() not in (tmp_path / "resnet.onnx").read_bytes()


@pytest.mark.parametrize("mode", ["int8_dynamic", "int8_static"])
def test_int8_quantization_keeps_an_embedding_tied_to_a_linear_layer_working(digits_dir, test_split, tmp_path, mode):
    """ONNX Runtime's quantizer transposes the Gemm's weight; the Gather of the same initializer must not see it."""
    torch.manual_seed(0)
    model = build_model(TIED_TOKENS, [1, 8, 8], 10).eval()
    fp32, quantized = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(model, fp32, user_config(TIED_TOKENS))
    calibration = load_split(digits_dir, "validation", list(range(10))).X.numpy()
    quantize_onnx(fp32, quantized, mode, dict(user_config(TIED_TOKENS), quantization=mode), calibration)
    reference = predict_logits(model, test_split.X[:256])
    for batch in (1, 256):
        logits = OnnxClassifier(quantized)(test_split.X[:batch])
        assert logits.shape == (batch, 10)
        assert (logits - reference[:batch]).abs().max() < 0.2 * reference.abs().max()  # int8 of an untrained net


class FixedBatch(nn.Module):
    """Reshapes to a constant batch size: no ONNX graph of it can take another batch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x.reshape(2, 64))


def test_onnx_export_refuses_a_model_that_fixes_its_batch(tmp_path):
    path = tmp_path / "fixed.onnx"
    with pytest.raises(OnnxExportError, match="architecture 'mypkg:fixed': cannot export to ONNX with a dynamic "
                                              "batch dimension .*specialized it to be a constant"):
        export_onnx(FixedBatch(), path, user_config({"arch": "mypkg:fixed"}))
    assert not path.exists()
