"""The registry on real S3 APIs on 127.0.0.1 (moto's server and SeaweedFS) and on a local directory."""

from __future__ import annotations

import http.client
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3
from botocore.exceptions import ConnectionClosedError

from tasks.registry import Registry, RegistryError, encode, sha256
from tasks.storage import LocalStore, S3Store, StorageParams, StorageUnavailable, ignored_conditions

ALIAS_KEY = "digits/aliases/production.json"
SERVERS = {"moto": "s3_server", "seaweedfs": "seaweedfs_server"}


def lineage(candidate: str) -> dict:
    return {"candidate": candidate, "code": {"git_revision": "0" * 40}, "problems": []}


def approval(reviewer: str) -> dict:
    return {"decision": "approve", "reviewer": reviewer, "comment": "looks good"}


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def server(backend, request):
    return request.getfixturevalue(SERVERS[backend]) if backend in SERVERS else None


@pytest.fixture
def reopen(backend, server, tmp_path):
    """Opens another client (its own store object) on the same fresh registry, as a second process would."""
    if backend == "local":
        return lambda: Registry(LocalStore(tmp_path / "registry"), "digits")
    storage = StorageParams(**server.storage(server.new_bucket(f"registry-{uuid.uuid4().hex[:12]}")))
    return lambda: Registry(S3Store(storage, "shrinkflow/registry"), "digits")


@pytest.fixture
def registry(reopen) -> Registry:
    return reopen()


def promote_new(registry: Registry, candidate: str, reviewer: str = "ana") -> dict:
    manifest = registry.register({"model.onnx": f"model {candidate}".encode()}, lineage(candidate), approval(reviewer))
    return registry.promote(manifest["version"], reviewer, f"release {candidate}")


def moves(alias: dict) -> list[tuple]:
    return [(move["action"], move["from"], move["version"], move["by"]) for move in alias["log"]]


def before_first_alias_write(registry: Registry, monkeypatch, other_writer) -> None:
    """Another client moves the alias after this one read it and before its write arrives."""
    put, pending = registry.store.put, [other_writer]

    def interleaved_put(key, data, **conditions):
        if key == ALIAS_KEY and pending:
            pending.pop()()
        put(key, data, **conditions)

    monkeypatch.setattr(registry.store, "put", interleaved_put)


def lose_first_alias_response(registry: Registry, monkeypatch, after_landing=lambda: None) -> list:
    """The first alias write reaches the store, but its response is lost and the client sends it again.

    S3: a botocore hook sends the signed PUT to the server for real, then fails the attempt with a
    dropped connection, so botocore's own retry sends it again. Local: the store is called twice.
    Returns what was observed: the attempts (S3) or writes (local) of the alias.
    """
    observed = []
    if isinstance(registry.store, LocalStore):
        put = registry.store.put

        def put_twice(key, data, **conditions):
            if key == ALIAS_KEY and not observed:
                put(key, data, **conditions)
                observed.append("landed")
                after_landing()
                observed.append("retried")
            put(key, data, **conditions)

        monkeypatch.setattr(registry.store, "put", put_twice)
        return observed

    def send_then_drop(request, **kwargs):
        if not request.url.endswith(ALIAS_KEY):
            return None
        observed.append(request.headers["amz-sdk-request"].decode().split(";")[0])  # attempt=1, attempt=2, ...
        if len(observed) > 1:
            return None  # the retry goes out normally
        body = request.body if isinstance(request.body, bytes) else request.body.read()
        response = urllib3.request(request.method, request.url, body=body, headers={
            name: value for name, value in request.headers.items() if name.lower() != "expect"})
        assert response.status == 200, response.data
        after_landing()
        raise ConnectionClosedError(endpoint_url=request.url)

    registry.store.client.meta.events.register_first("before-send.s3.PutObject", send_then_drop)
    return observed


def test_versions_are_immutable_and_verified_then_the_alias_moves_and_rolls_back(registry):
    assert ignored_conditions(registry.store) == []  # the store enforces If-None-Match and If-Match
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
    assert moves(rolled) == [("promote", None, 1, "ana"), ("promote", 1, 2, "bo"), ("rollback", 2, 1, "cy")]
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


def test_a_manifest_naming_files_outside_the_version_is_refused(registry, tmp_path):
    """Manifests are untrusted: a crafted file name must not make the registry read anything else."""
    manifest = registry.register({"model.onnx": b"one"}, lineage("a"), approval("ana"))
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"not part of any version")
    crafted = dict(manifest, files={**manifest["files"], "../../../../../../../..%s" % outside: {"sha256": "0" * 64}})
    registry.store.put("digits/versions/000001/manifest.json", encode(crafted), if_etag=registry.store.get(
        "digits/versions/000001/manifest.json")[1])
    with pytest.raises(RegistryError, match="only plain file names"):
        registry.verify(1)
    with pytest.raises(RegistryError, match="only plain file names"):
        registry.promote(1, "ana", "crafted manifest")
    assert registry.alias() is None


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


def test_a_rollback_whose_response_is_lost_moves_back_exactly_one_version(registry, reopen, backend, monkeypatch):
    for candidate in ("one", "two", "three"):
        promote_new(registry, candidate)
    observed = lose_first_alias_response(registry, monkeypatch)
    rolled = registry.rollback("cy", "p95 regression")
    assert observed == (["landed", "retried"] if backend == "local" else ["attempt=1", "attempt=2"])
    alias = registry.alias()
    assert rolled == alias and (alias["version"], alias["history"]) == (2, [1])  # v3 -> v2, not v1
    assert [move for move in moves(alias) if move[0] == "rollback"] == [("rollback", 3, 2, "cy")]

    registry.promote(3, "ana", "fixed")  # again, and production moves on before the retry: the retry finds
    other = reopen()                    # its own move in the log, neither repeats it nor calls it a conflict
    lose_first_alias_response(registry, monkeypatch, lambda: other.promote(1, "dee", "hotfix"))
    assert registry.rollback("cy", "p95 regression again")["version"] == 1
    assert moves(registry.alias())[-2:] == [("rollback", 3, 2, "cy"), ("promote", 2, 1, "dee")]


def test_a_promotion_whose_response_is_lost_is_not_applied_again_over_a_later_move(registry, reopen, backend,
                                                                                      monkeypatch):
    for candidate in ("one", "two", "three"):
        promote_new(registry, candidate)
    other = reopen()  # promotes version 1 between our write landing and our retry
    observed = lose_first_alias_response(registry, monkeypatch, lambda: other.promote(1, "dee", "hotfix"))
    registry.promote(2, "ana", "back to two")
    assert len(observed) == 2
    alias = registry.alias()
    assert alias["version"] == 1 and moves(alias)[3:] == [("promote", 3, 2, "ana"), ("promote", 2, 1, "dee")]


def test_a_rollback_is_refused_if_production_moved_meanwhile_and_not_repeated_if_made_already(
        registry, reopen, monkeypatch):
    for candidate in ("one", "two", "three"):
        promote_new(registry, candidate)
    other = reopen()
    before_first_alias_write(registry, monkeypatch, lambda: other.promote(1, "dee", "hotfix"))
    with pytest.raises(RegistryError, match="production moved from 3 to 1 since the rollback was requested; "
                                            "not applied"):
        registry.rollback("cy", "p95 regression")
    alias = registry.alias()
    assert alias["version"] == 1 and moves(alias)[-1] == ("promote", 3, 1, "dee")

    before_first_alias_write(registry, monkeypatch, lambda: other.rollback("dee", "hotfix broke login"))
    rolled = registry.rollback("cy", "hotfix broke login")  # the same rollback, someone was faster
    alias = registry.alias()
    assert rolled == alias and alias["version"] == 3 and moves(alias)[-1] == ("rollback", 1, 3, "dee")
    assert [move[0] for move in moves(alias)] == ["promote"] * 4 + ["rollback"]


@pytest.mark.parametrize("backend", ["moto", "seaweedfs"])  # a network store: a local directory has no outage
@pytest.mark.parametrize("lost_write", ["manifest.json", "aliases/production.json"])
def test_a_store_outage_mid_promotion_changes_nothing_and_a_rerun_completes(registry, server, lost_write):
    promote_new(registry, "one")
    before = (registry.versions(), registry.alias())

    def stop_before(params, **kwargs):
        if params["url_path"].endswith(lost_write):
            server.stop()  # the real server goes away just before this write

    events = registry.store.client.meta.events
    events.register("before-call.s3.PutObject", stop_before)
    try:
        with pytest.raises(StorageUnavailable, match=rf"put_object .*{lost_write} failed after 2 attempts"):
            promote_new(registry, "two")
    finally:
        events.unregister("before-call.s3.PutObject", stop_before)
        server.start()
    assert registry.alias() == before[1]
    if lost_write == "manifest.json":  # number 2 is claimed but never became a version
        assert registry.versions() == before[0] and registry.incomplete() == [2]
        rerun = promote_new(registry, "two")
        assert rerun["version"] == 3 and registry.incomplete() == [2]
    else:  # version 2 is complete, but not in production
        assert [v["candidate"] for v in registry.versions()] == ["one", "two"]
        rerun = registry.promote(2, "ana", "release two")
    assert registry.alias() == rerun and registry.verify(rerun["version"])["candidate"] == "two"
    assert moves(rerun) == [("promote", None, 1, "ana"), ("promote", 1, rerun["version"], "ana")]


class ConditionStrippingProxy(BaseHTTPRequestHandler):
    """Forwards every request to the upstream S3 server without If-None-Match / If-Match, like a store that
    accepts conditional writes and ignores them; remembers the (method, path) of every request."""

    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered as boto3 expects
    upstream_port: int
    requests: list

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append((self.command, self.path))
        headers = {name: value for name, value in self.headers.items()
                   if name.lower() not in ("if-none-match", "if-match", "expect", "host")}
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=10)
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def ignoring_store(s3_server):
    """An S3 endpoint on 127.0.0.1 that ignores conditional writes: a proxy in front of the moto server."""
    handler = type("Proxy", (ConditionStrippingProxy,), {"upstream_port": s3_server.port, "requests": []})
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}", handler.requests
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_store_that_ignores_conditional_writes_is_refused_and_only_probed(s3_server, ignoring_store):
    endpoint, requests = ignoring_store
    bucket = s3_server.new_bucket(f"ignoring-{uuid.uuid4().hex[:12]}")
    store = S3Store(StorageParams(**dict(s3_server.storage(bucket), endpoint_url=endpoint)), "shrinkflow/registry")
    assert ignored_conditions(store) == ["If-None-Match", "If-Match"]
    registry = Registry(store, "digits")
    refusal = (rf"s3://{bucket}/shrinkflow/registry \({endpoint}\) ignores conditional writes \(If-None-Match "
               r"and If-Match were not enforced\); .* the registry refuses to write there")
    with pytest.raises(RegistryError, match=refusal):
        registry.register({"model.onnx": b"model"}, lineage("int8"), approval("ana"))
    with pytest.raises(RegistryError, match=refusal):
        registry.promote(1, "ana", "release")
    with pytest.raises(RegistryError, match=refusal):
        registry.rollback("ana", "back")
    with pytest.raises(RegistryError, match=refusal):
        registry.record_review({"decision": "reject", "reviewer": "ana"})
    writes = [path for method, path in requests if method in ("PUT", "POST", "DELETE")]
    assert writes and all(f"/{bucket}/shrinkflow/registry/.conditional-write-probe/" in path for path in writes)
    assert s3_server.client().list_objects_v2(Bucket=bucket)["KeyCount"] == 0  # each probe removed its key


def test_bad_storage_settings_name_the_field():
    from tasks.params import ParamsError, from_dict

    with pytest.raises(ParamsError, match="storage.bucket: required for backend 's3'"):
        from_dict(StorageParams, {"backend": "s3"}, "storage")
    with pytest.raises(ParamsError, match="bucket: a bucket name, not a URL"):
        from_dict(StorageParams, {"backend": "s3", "bucket": "s3://x"}, "storage")
