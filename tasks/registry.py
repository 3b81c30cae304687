"""Model registry on an object store (S3 through boto3, or a local directory).

Layout, one prefix per model name:

    <model>/versions/000003/claim.json     first write, conditional: number 3 is taken
    <model>/versions/000003/model.<ext>    the deployable file (+ runtime.onnx when it runs on ONNX Runtime)
    <model>/versions/000003/lineage.json   the candidate's lineage record
    <model>/versions/000003/approval.json  who approved it, when, why
    <model>/versions/000003/manifest.json  last write: sha256 of every file; the version exists from here on
    <model>/aliases/production.json        the version in production, with the history of every move
    <model>/reviews/<time>-<id>.json       rejections, refusals and time-outs (alias moves are in its log)

Every write is conditional: versions are never overwritten (If-None-Match), and the alias
moves by compare-and-swap (If-Match), only to a version whose files were read back and
match their checksums. Racing promotions therefore each get their own number, and the
alias never points at a version that is missing or half-written. A store that accepts
those conditions but ignores them is refused before the first write (a probe per store).
Each alias move carries a request token in its log entry, so a write whose response was
lost is recognised on retry and never applied twice.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from tasks.params import PARAMS_FILE, _require, load_section
from tasks.storage import Conflict, LocalStore, S3Store, StorageParams, ignored_conditions, registry_store

ALIAS = "production"
FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
CAS_ATTEMPTS = 20  # alias moves lost to concurrent writers before giving up
_ENFORCING_STORES: set[tuple[str, str]] = set()  # (endpoint, location) whose conditional-write probe passed
_PROBE_LOCK = threading.Lock()


@dataclass(frozen=True)
class RegistryParams:
    model_name: str = "shrinkflow-model"
    review_timeout_seconds: int = 86400  # a review not answered by then changes nothing
    review_poll_seconds: float = 10.0
    prefer: str = "file_bytes"  # the review form preselects the promotable candidate with the smallest of these

    def __post_init__(self) -> None:
        _require(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.model_name)),
                 f"model_name: letters, digits, '.', '_' and '-' only, got {self.model_name!r}")
        _require(self.review_timeout_seconds > 0, "review_timeout_seconds: must be positive")
        _require(self.prefer in ("file_bytes", "latency_ms_p50"),
                 f"prefer: file_bytes (smallest deployed file) or latency_ms_p50 (fastest), got {self.prefer!r}")


class RegistryError(RuntimeError):
    """The registry refused an operation or holds inconsistent data."""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


class Registry:
    def __init__(self, store: LocalStore | S3Store, model_name: str):
        self.store = store
        self.model = model_name
        self.location = f"{store.location}/{model_name}"

    def _version_key(self, number: int, name: str) -> str:
        return f"{self.model}/versions/{number:06d}/{name}"

    def _read_json(self, key: str) -> dict | None:
        found = self.store.get(key)
        return json.loads(found[0]) if found else None

    def claimed_numbers(self) -> list[int]:
        return sorted({int(m.group(1)) for key in self.store.keys(f"{self.model}/versions/")
                       if (m := re.search(r"/versions/(\d+)/claim\.json$", key))})

    def versions(self) -> list[dict]:
        """Manifests of the complete versions, oldest first (a claim without manifest is not a version)."""
        keys = set(self.store.keys(f"{self.model}/versions/"))
        return [self._read_json(self._version_key(n, "manifest.json")) for n in self.claimed_numbers()
                if self._version_key(n, "manifest.json") in keys]

    def incomplete(self) -> list[int]:
        """Numbers claimed by promotions that never finished (e.g. the store failed mid-upload)."""
        complete = {v["version"] for v in self.versions()}
        return [n for n in self.claimed_numbers() if n not in complete]

    def manifest(self, number: int) -> dict:
        manifest = self._read_json(self._version_key(number, "manifest.json"))
        if manifest is None:
            raise RegistryError(f"{self.location}: version {number} does not exist"
                                + (" (incomplete upload)" if number in self.claimed_numbers() else ""))
        return manifest

    def read(self, number: int, name: str) -> bytes:
        """A file of a version, checked against the manifest's sha256."""
        if not FILE_NAME.fullmatch(name):  # names come from an untrusted manifest: no paths
            raise RegistryError(f"{self.location}: version {number} names a file {name!r}; only plain file names")
        expected = self.manifest(number)["files"].get(name)
        found = self.store.get(self._version_key(number, name))
        if expected is None or found is None:
            raise RegistryError(f"{self.location}: version {number} has no file {name}")
        if sha256(found[0]) != expected["sha256"]:
            raise RegistryError(f"{self.location}: version {number} file {name}: sha256 {sha256(found[0])} "
                                f"!= manifest {expected['sha256']}")
        return found[0]

    def verify(self, number: int) -> dict:
        """Read back every file of a version and compare it with the manifest."""
        manifest = self.manifest(number)
        for name in manifest["files"]:
            self.read(number, name)
        return manifest

    def register(self, files: dict[str, bytes], lineage: dict, approval: dict) -> dict:
        """Upload a new immutable version; returns its manifest. Nothing else (alias, old versions) changes."""
        self._require_conditional_writes()
        documents = dict(files, **{"lineage.json": encode(lineage), "approval.json": encode(approval)})
        number = (self.claimed_numbers() or [0])[-1] + 1
        claim = encode({"claimed_at": now(), "candidate": lineage["candidate"], "token": uuid.uuid4().hex})
        while True:  # a concurrent promotion may take the number first: take the next
            try:
                self._create(self._version_key(number, "claim.json"), claim)
                break
            except Conflict:
                number += 1
        for name, data in documents.items():
            self._create(self._version_key(number, name), data)
        for name, data in documents.items():
            found = self.store.get(self._version_key(number, name))
            if found is None or sha256(found[0]) != sha256(data):
                raise RegistryError(f"{self.location}: version {number} file {name} did not read back intact")
        manifest = {
            "model": self.model, "version": number, "candidate": lineage["candidate"],
            "model_sha256": sha256(next(iter(files.values()))),
            "files": {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in documents.items()},
            "git_revision": lineage["code"]["git_revision"], "approved_by": approval["reviewer"],
            "created_at": now(),
        }
        self._create(self._version_key(number, "manifest.json"), encode(manifest))
        return manifest

    def _create(self, key: str, data: bytes) -> None:
        """Write a new object; if it exists already with these very bytes (a retried request whose
        first response was lost), that write was ours."""
        try:
            self.store.put(key, data, if_absent=True)
        except Conflict:
            found = self.store.get(key)
            if found is None or found[0] != data:
                raise

    def alias(self, name: str = ALIAS) -> dict | None:
        return self._read_json(f"{self.model}/aliases/{name}.json")

    def _require_conditional_writes(self) -> None:
        """Refuse to write to a store that ignores conditional writes (probed once per store and process)."""
        where = (self.store.endpoint, self.store.location)
        with _PROBE_LOCK:
            if where in _ENFORCING_STORES:
                return
            ignored = ignored_conditions(self.store)
            if ignored:
                raise RegistryError(
                    f"{self.store.location} ({self.store.endpoint}) ignores conditional writes "
                    f"({' and '.join(ignored)} were not enforced); versions could be overwritten and racing alias "
                    "moves lost, so the registry refuses to write there: use a store that enforces them")
            _ENFORCING_STORES.add(where)

    def _move_alias(self, action: str, plan, actor: str, reason: str) -> dict:
        """Compare-and-swap the alias to `plan(current, expected)` = (version, history), retried on lost races.

        `expected` is the version production held when the move was requested, and a token marks this
        request's log entry: if the write lands but its response is lost, the retry gets a conflict, re-reads
        and finds the token, so the move is never applied twice. `plan` returns None when nothing is left to do.
        """
        self._require_conditional_writes()
        key = f"{self.model}/aliases/{ALIAS}.json"
        token = uuid.uuid4().hex
        found = self.store.get(key)
        expected = json.loads(found[0])["version"] if found else None
        for _ in range(CAS_ATTEMPTS):
            current = json.loads(found[0]) if found else None
            log = (current or {}).get("log", [])
            if any(entry.get("request") == token for entry in log):
                return current  # our write landed; only its response was lost
            move = plan(current, expected)
            if move is None:
                return current
            number, history = move
            manifest = self.verify(number)
            log = log + [{"action": action, "version": number, "from": (current or {}).get("version"), "by": actor,
                          "reason": reason, "at": now(), "request": token}]
            record = {"alias": ALIAS, "version": number, "candidate": manifest["candidate"],
                      "model_sha256": manifest["model_sha256"],
                      "history": history, "log": log}
            try:
                self.store.put(key, encode(record), **({"if_etag": found[1]} if found else {"if_absent": True}))
                return record
            except Conflict:
                found = self.store.get(key)
        raise RegistryError(f"{self.location}: alias {ALIAS} kept changing; gave up after {CAS_ATTEMPTS} attempts")

    def promote(self, number: int, actor: str, reason: str) -> dict:
        """Point the alias at `number` (verified first); the version it left is kept in the history."""
        def plan(current, expected):
            if current and current["version"] == number:
                return None  # already there
            return number, current["history"] + [current["version"]] if current else []
        return self._move_alias("promote", plan, actor, reason)

    def rollback(self, actor: str, reason: str) -> dict:
        """Point the alias back at the version it held before; nothing is deleted.

        Only from the version in production when the rollback was requested: if production moved on
        meanwhile, the rollback is refused rather than undoing someone else's move.
        """
        def plan(current, expected):
            if current is None or (current["version"] == expected and not current["history"]):
                raise RegistryError(f"{self.location}: no earlier version to roll back to")
            if current["version"] == expected:
                return current["history"][-1], current["history"][:-1]
            last = current["log"][-1]
            if (last["action"], last["from"]) == ("rollback", expected):
                return None  # the same rollback, made by someone else meanwhile
            raise RegistryError(f"{self.location}: production moved from {expected} to {current['version']} since "
                                "the rollback was requested; not applied")
        return self._move_alias("rollback", plan, actor, reason)  # the alias log records it

    def record_review(self, review: dict) -> str:
        """Keep a decision that changed no version: rejection, refusal, time-out."""
        self._require_conditional_writes()
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")  # keys sort by time
        key = f"{self.model}/reviews/{stamp}-{uuid.uuid4().hex[:8]}.json"
        self.store.put(key, encode(dict(review, recorded_at=now())), if_absent=True)
        return key

    def reviews(self) -> list[dict]:
        return [self._read_json(key) for key in self.store.keys(f"{self.model}/reviews/")]


def open_registry(root: Path) -> Registry:
    """The registry `params.yaml` at `root` configures (storage and model name)."""
    params_file = root / PARAMS_FILE
    return Registry(registry_store(load_section("storage", StorageParams, params_file), root),
                    load_section("registry", RegistryParams, params_file).model_name)


def candidate_files(root: Path, lineage: dict) -> dict[str, bytes]:
    """The deployable files under stable names: model.<ext> (+ runtime.onnx)."""
    files = {}
    for i, entry in enumerate(lineage["files"]):
        data = (root / entry["path"]).read_bytes()
        if sha256(data) != entry["sha256"]:
            raise RegistryError(f"{entry['path']}: changed since its lineage was recorded")
        files["model" + Path(entry["path"]).suffix if i == 0 else "runtime.onnx"] = data
    return files
