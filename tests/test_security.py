"""Model files are untrusted: loading one never imports or runs what it names, and a crafted file is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from tasks.compression.pruning import magnitude_prune
from tasks.models import (
    CONFIG_KEY,
    ModelFileError,
    build_model,
    configured_architectures,
    load_model,
    save_model,
)
from tasks.params import ParamsError

CONFIG = {"model": {"arch": "mlp", "hidden": [16]}, "input_shape": [1, 8, 8], "classes": list(range(10))}
STATE = build_model(CONFIG["model"], CONFIG["input_shape"], 10).state_dict()

EVIL_MODULE = '''
from pathlib import Path
Path({marker!r}).touch()  # importing this module is already code execution


def build(input_shape, n_classes, **options):
    Path({marker!r}).touch()
'''


def crafted(path, config, state=STATE):
    """A safetensors file with the given config in its metadata, as an attacker would write it."""
    save_file(dict(state), str(path), metadata={CONFIG_KEY: json.dumps(config)})
    return path


def tiny_user_arch(input_shape, n_classes, width=4):
    """A user's own architecture, configured in params.yaml as 'tests.test_security:tiny_user_arch'."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, n_classes))


def test_arch_named_by_a_file_is_never_imported_or_called(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    (tmp_path / "evil_arch.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    attacks = {
        # subprocess.run(["touch", marker], 10): the shape becomes the command line
        "run": dict(CONFIG, model={"arch": "subprocess:run"}, input_shape=["touch", str(marker)]),
        "system": dict(CONFIG, model={"arch": "os:system"}),
        "module": dict(CONFIG, model={"arch": "evil_arch:build"}),  # a valid config otherwise
    }
    for name, config in attacks.items():
        with pytest.raises(ModelFileError) as error:
            load_model(crafted(tmp_path / f"{name}.safetensors", config))
        assert f"{name}.safetensors" in str(error.value)
        assert not marker.exists(), name
        if name != "run":  # a valid config otherwise: refused for its architecture alone
            assert "is neither built in nor configured" in str(error.value), name
    assert "architecture 'evil_arch:build' is neither built in nor configured" in str(error.value)
    assert "evil_arch" not in sys.modules


def test_configured_user_architecture_loads(tmp_path, monkeypatch):
    params = {"student": {"model": {"arch": "tests.test_security:tiny_user_arch", "width": 8}}}
    model = build_model(params["student"]["model"], [1, 8, 8], 10)
    path = tmp_path / "user.safetensors"
    save_model(model, path, dict(CONFIG, model=params["student"]["model"]))

    loaded, _ = load_model(path, configured_architectures(params))
    assert loaded[1].out_features == 8
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFileError, match="neither built in nor configured"):
        load_model(path)  # no params.yaml here: only the built-ins are trusted
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    loaded, _ = load_model(path)  # the default: the architectures ./params.yaml configures
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("content, expected", [
    (b"not a model at all", "not a safetensors model file"),
    (b"", "not a safetensors model file"),
])
def test_garbage_is_refused_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=expected) as error:
        load_model(path)
    assert str(path) in str(error.value)


def test_truncated_file_is_refused(tmp_path):
    path = crafted(tmp_path / "whole.safetensors", CONFIG)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="not a safetensors model file"):
        load_model(path)


@pytest.mark.parametrize("metadata, expected", [
    ({}, "no shrinkflow_config metadata"),
    ({CONFIG_KEY: "{not json"}, "is not valid JSON"),
    ({CONFIG_KEY: "[1, 2]"}, "is not a JSON object"),
    ({CONFIG_KEY: json.dumps(dict(CONFIG, input_shape=[1, 0, 8]))}, "input_shape: a list of positive integers"),
    ({CONFIG_KEY: json.dumps(dict(CONFIG, input_shape=[1, 8.5, 8]))}, "input_shape: a list of positive integers"),
    ({CONFIG_KEY: json.dumps(dict(CONFIG, input_shape=[4096, 4096, 4096]))}, "values per sample, more than"),
    ({CONFIG_KEY: json.dumps(dict(CONFIG, classes="0123456789"))}, "classes: a non-empty list"),
    ({CONFIG_KEY: json.dumps(dict(CONFIG, model={"arch": "mlp", "hidden": {"__class__": 1}}))},
     "model.hidden: a JSON scalar or a list of scalars"),
    ({CONFIG_KEY: json.dumps(dict(CONFIG, model={"hidden": [16]}))}, "model: needs a string 'arch'"),
])
def test_config_fields_are_checked(tmp_path, metadata, expected):
    path = tmp_path / "crafted.safetensors"
    save_file(dict(STATE), str(path), metadata=metadata)
    with pytest.raises(ModelFileError, match=expected) as error:
        load_model(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("config, state, expected", [
    (dict(CONFIG, model={"arch": "mlp", "hidden": [1000]}), STATE, "tensor '1.weight' is missing or does not fit"),
    (CONFIG, {**STATE, "extra": torch.zeros(3)}, "tensor 'extra' is not part of architecture 'mlp'"),
    (CONFIG, {k: v for k, v in STATE.items() if k != "3.bias"}, "tensor '3.bias' is missing"),
    (dict(CONFIG, model={"arch": "cnn", "channels": [4]}), STATE, "is not part of architecture 'cnn'"),
])
def test_tensors_must_match_the_architecture(tmp_path, config, state, expected):
    with pytest.raises(ModelFileError, match=expected):
        load_model(crafted(tmp_path / "crafted.safetensors", config, state))


def test_a_file_cannot_untie_tied_weights(tmp_path):
    """The architecture ties its head to the embedding; the file stores that tensor once. A file that brings
    its own copy for the tied name (which loading would silently make win or lose) is refused."""
    spec = {"arch": "tests.user_architectures:transformer"}
    state = {key: tensor.clone() for key, tensor in build_model(spec, [1, 8, 8], 10).state_dict().items()}
    state["head.weight"] = torch.randn_like(state["head.weight"])
    path = crafted(tmp_path / "untied.safetensors", dict(CONFIG, model=spec), state)
    with pytest.raises(ModelFileError, match="tensor 'head.weight' is not part of architecture"):
        load_model(path, configured_architectures({"teacher": {"model": spec}}))


def test_huge_width_is_refused_before_allocating(tmp_path):
    """The architecture is sized on the meta device: a small file claiming a huge layer allocates nothing."""
    path = crafted(tmp_path / "wide.safetensors", dict(CONFIG, model={"arch": "mlp", "hidden": [4_000_000]}))
    probe = f"""
import resource
from tasks.models import load_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_model({str(path)!r})
except Exception as e:
    print(type(e).__name__, e)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    message, grown_kib = result.stdout.strip().rsplit("\n", 1)
    assert message.startswith("ModelFileError") and "refusing to allocate" in message
    assert int(grown_kib) < 64 * 1024  # the layer alone would be 1 GiB of float32


def test_deflate_bomb_in_a_compact_form_is_refused(tmp_path):
    model = magnitude_prune(build_model(CONFIG["model"], CONFIG["input_shape"], 10), 0.9, rounds=1)
    path = tmp_path / "pruned.safetensors"
    save_model(model, path, CONFIG)
    assert load_model(path)[0](torch.zeros(1, 1, 8, 8)).shape == (1, 10)  # the genuine compact file loads
    state = load_file(str(path))
    assert "1.weight::mask~z" in state
    # 16 x 64 weights need a 128-byte mask; this inflates to 64 MiB
    state["1.weight::mask~z"] = torch.frombuffer(bytearray(zlib.compress(bytes(64 << 20), 9)), dtype=torch.uint8)
    with pytest.raises(ModelFileError, match="tensor '1.weight' is missing or does not fit"):
        load_model(crafted(tmp_path / "bomb.safetensors", CONFIG, state))


@pytest.mark.parametrize("arch, expected", [
    ("builtins:print", "model.arch 'builtins:print' returned None, not a torch.nn.Module"),
    ("itertools:repeat", "model.arch 'itertools:repeat' returned repeat([1, 8, 8], 10), not a torch.nn.Module"),
])
def test_params_arch_must_build_a_module(arch, expected):
    with pytest.raises(ParamsError) as error:
        build_model({"arch": arch}, [1, 8, 8], 10)
    assert str(error.value) == expected


@pytest.mark.parametrize("code, stage, message", [
    ({"git_revision": "--upload-pack=touch /tmp/x"}, "compress@pruned", "is not a commit id"),
    ({"git_revision": "0" * 40}, "-x; rm -rf /", "is not a dvc.yaml stage name"),
])
def test_reproduce_refuses_a_registry_record_naming_options_instead_of_a_commit_or_stage(tmp_path, code, stage,
                                                                                         message):
    from tasks.lineage import reproduce

    record = {"code": code, "stage": stage, "stages": {}, "files": [], "teacher": None}
    with pytest.raises(RuntimeError, match=message):
        reproduce(record, str(tmp_path / "repo"), str(tmp_path / "remote"), tmp_path / "clone", None)
    assert not (tmp_path / "clone").exists()  # refused before anything ran
