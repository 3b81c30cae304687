"""Compression methods on tiny models: real size reductions, faithful round trips, bounded accuracy loss."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
import torch

from tasks.encodings import encode_state, pack_bits, unpack_bits
from tasks.models import build_model, count_parameters, load_model, save_model
from tasks.params import ParamsError
from tasks.compression.pruning import magnitude_prune, sparsity, structured_prune
from tasks.compression.quantization import OnnxClassifier, export_onnx, quantize_onnx, read_onnx_config
from tasks.train_teacher import train_teacher
from tasks.training import load_split, make_finetune, predict_logits
from tasks.compression.weight_sharing import share_weights
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
    """Bytes the encoding should take: for each Linear/Conv weight a 1-bit survivor mask (if sparse
    enough to pay) and its survivors as float32 or as b-bit codebook indices; other tensors dense."""
    total = 0
    for name, tensor in model.state_dict().items():
        if tensor.dim() < 2:
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


def round_trip(model, config, path):
    save_model(model, path, config)
    return load_model(path)[0]


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


def test_structured_pruning_builds_a_smaller_dense_network(source, test_split, finetune, tmp_path):
    model, config = source
    small, spec = structured_prune(model, config["model"], config["input_shape"], 10, 0.5, finetune=finetune)
    assert spec["channels"] == [c // 2 for c in config["model"]["channels"]]
    assert spec["hidden"] == config["model"]["hidden"] // 2
    assert count_parameters(small) < count_parameters(model) / 3
    assert predict_logits(small, test_split.X).shape == (len(test_split.X), 10)
    reloaded = round_trip(small, dict(config, model=spec), tmp_path / "small.safetensors")
    assert torch.equal(predict_logits(reloaded, test_split.X), predict_logits(small, test_split.X))
    assert accuracy(small, test_split) > accuracy(model, test_split) - 0.05


def test_structured_pruning_without_finetuning_keeps_the_surviving_function(test_split):
    """Removing units with all-zero weights must not change a single output."""
    model = build_model({"arch": "mlp", "hidden": [8, 6]}, [1, 8, 8], 10).eval()
    with torch.no_grad():
        model[1].weight[4:] = 0
        model[1].bias[4:] = 0
        model[3].weight[3:] = 0
        model[3].bias[3:] = 0
    small, spec = structured_prune(model, {"arch": "mlp", "hidden": [8, 6]}, [1, 8, 8], 10, 0.5)
    assert spec["hidden"] == [4, 3]
    assert torch.allclose(predict_logits(small, test_split.X), predict_logits(model, test_split.X), atol=1e-5)


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
    (lambda m: structured_prune(m, {"arch": "my.pkg:net"}, [64], 10, 0.5), "mlp"),
])
def test_bad_settings_are_refused_with_the_field_named(call, message):
    with pytest.raises(ParamsError, match=message):
        call(build_model({"arch": "mlp", "hidden": [8]}, [64], 10))
