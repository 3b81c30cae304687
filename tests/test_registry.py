"""The registry on a real S3 API (moto's server on 127.0.0.1) and on a local directory."""

from __future__ import annotations

import threading
import uuid

import pytest

from tasks.registry import Registry, RegistryError, sha256
from tasks.storage import LocalStore, S3Store, StorageParams


def lineage(candidate: str) -> dict:
    return {"candidate": candidate, "code": {"git_revision": "0" * 40}, "problems": []}


def approval(reviewer: str) -> dict:
    return {"decision": "approve", "reviewer": reviewer, "comment": "looks good"}


@pytest.fixture(params=["s3", "local"])
def registry(request, tmp_path) -> Registry:
    if request.param == "local":
        return Registry(LocalStore(tmp_path / "registry"), "digits")
    server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket(f"registry-{uuid.uuid4().hex[:12]}")
    return Registry(S3Store(StorageParams(**server.storage(bucket)), "shrinkflow/registry"), "digits")


def test_versions_are_immutable_and_verified_then_the_alias_moves_and_rolls_back(registry):
    first = registry.register({"model.onnx": b"model one"}, lineage("int8"), approval("ana"))
    assert registry.alias() is None  # registering alone changes nothing in production
    registry.promote(first["version"], "ana", "first release")
    second = registry.register({"model.safetensors": b"model two", "runtime.onnx": b"graph"}, lineage("pruned"),
                               approval("bo"))
    alias = registry.promote(second["version"], "bo", "smaller")
    assert [v["version"] for v in registry.versions()] == [1, 2]
    assert (alias["version"], alias["history"]) == (2, [1])
    assert registry.read(2, "model.safetensors") == b"model two"
    assert second["files"]["model.safetensors"]["sha256"] == sha256(b"model two")
    assert second["approved_by"] == "bo" and registry.verify(2)["candidate"] == "pruned"

    rolled = registry.rollback("cy", "latency regression")
    assert (rolled["version"], rolled["history"]) == (1, [])
    assert [(m["action"], m["from"], m["version"], m["by"]) for m in rolled["log"]] == [
        ("promote", None, 1, "ana"), ("promote", 1, 2, "bo"), ("rollback", 2, 1, "cy")]
    assert [v["version"] for v in registry.versions()] == [1, 2]  # nothing deleted
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("cy", "again")


def test_a_version_is_never_overwritten_and_a_missing_one_is_never_promoted(registry):
    registry.register({"model.onnx": b"one"}, lineage("a"), approval("ana"))
    with pytest.raises(RegistryError, match="version 7 does not exist"):
        registry.promote(7, "ana", "typo")
    key = "digits/versions/000001/model.onnx"
    with pytest.raises(Exception, match="exists or changed"):
        registry.store.put(key, b"tampered", if_absent=True)
    assert registry.read(1, "model.onnx") == b"one"


def test_racing_promotions_keep_every_version_and_a_valid_alias(registry):
    errors, start = [], threading.Barrier(4)

    def promote(i: int) -> None:
        try:
            start.wait()  # all four read the same next number, then race for it
            manifest = registry.register({"model.onnx": f"model {i}".encode()}, lineage(f"c{i}"), approval(f"r{i}"))
            registry.promote(manifest["version"], f"r{i}", "race")
        except Exception as e:  # collected: a thread's exception would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=promote, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    versions = registry.versions()
    assert sorted(v["version"] for v in versions) == [1, 2, 3, 4]
    assert sorted(v["candidate"] for v in versions) == ["c0", "c1", "c2", "c3"]
    alias = registry.alias()
    assert alias["version"] in {1, 2, 3, 4} and registry.verify(alias["version"])
    assert len(alias["log"]) == 4 and sorted(alias["history"] + [alias["version"]]) == [1, 2, 3, 4]


def test_bad_storage_settings_name_the_field():
    from tasks.params import ParamsError, from_dict

    with pytest.raises(ParamsError, match="storage.bucket: required for backend 's3'"):
        from_dict(StorageParams, {"backend": "s3"}, "storage")
    with pytest.raises(ParamsError, match="bucket: a bucket name, not a URL"):
        from_dict(StorageParams, {"backend": "s3", "bucket": "s3://x"}, "storage")
