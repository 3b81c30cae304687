"""Where versioned data and models live: the DVC remote and the model registry's object store.

`params.yaml:storage` picks a local directory (the embedded default) or an S3 bucket
(any S3-compatible endpoint). Credentials are never configured here: DVC and boto3
take them from the standard AWS chain (environment, profile, instance role), so no
file the pipeline writes can contain them.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tasks.params import _require

DVC_REMOTE = "shrinkflow"


@dataclass(frozen=True)
class StorageParams:
    backend: str = "local"  # local | s3
    local_dir: str = "storage"  # local: DVC remote in <local_dir>/dvc, registry in <local_dir>/registry
    bucket: str = ""  # s3: DVC remote at s3://<bucket>/<prefix>/dvc, registry under <prefix>/registry
    prefix: str = "shrinkflow"
    region: str = "us-east-1"
    endpoint_url: str = ""  # S3-compatible stores (MinIO, Ceph, a test server); empty: AWS
    attempts: int = 4  # per S3 request, with exponential backoff, before the operation fails

    def __post_init__(self) -> None:
        _require(self.backend in ("local", "s3"), f"backend: must be local or s3, got {self.backend!r}")
        _require(self.backend != "s3" or bool(self.bucket), "bucket: required for backend 's3'")
        _require(self.attempts >= 1, f"attempts: must be at least 1, got {self.attempts}")
        _require("://" not in self.bucket and "/" not in self.bucket,
                 f"bucket: a bucket name, not a URL or path, got {self.bucket!r}")


class StorageError(RuntimeError):
    """The store refused a request: missing bucket, no or wrong credentials, no permission."""


class StorageUnavailable(StorageError):
    """The store could not be reached, or kept failing, after every retry."""


class Conflict(RuntimeError):
    """A conditional write lost: the object exists already, or changed since it was read."""


def dvc_remote_url(params: StorageParams, root: Path) -> str:
    if params.backend == "s3":
        return "s3://" + "/".join(part for part in (params.bucket, params.prefix.strip("/"), "dvc") if part)
    return str((root / params.local_dir / "dvc").resolve())


def configure_dvc_remote(root: Path, params: StorageParams, url: str | None = None) -> str:
    """Make `url` (default: from params) the default DVC remote in .dvc/config.local (not committed).

    Only the location, region and endpoint are written; DVC reads credentials from the AWS chain.
    """
    from dvc.config import Config

    url = url or dvc_remote_url(params, root)
    remote = {"url": url}
    if url.startswith("s3://"):
        remote["region"] = params.region
        if params.endpoint_url:
            remote["endpointurl"] = params.endpoint_url
    config = Config(dvc_dir=str(root / ".dvc"))
    with config.edit("local") as local:
        local.setdefault("remote", {})[DVC_REMOTE] = remote
        local.setdefault("core", {})["remote"] = DVC_REMOTE
    return url


class LocalStore:
    """Objects as files under a directory, with the same conditional writes as S3."""

    endpoint = "local directory"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.location = str(root)

    def _path(self, key: str) -> Path:
        """The file of `key`; keys come from untrusted records, so none may leave the store's directory."""
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"{self.location}: key {key!r} leaves the store")
        return path

    def get(self, key: str) -> tuple[bytes, str] | None:
        """(content, etag), or None if the object does not exist."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def keys(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and
                      not p.name.startswith("."))

    def put(self, key: str, data: bytes, *, if_absent: bool = False, if_etag: str | None = None) -> None:
        """Write `data`; with `if_absent` only if the key is new, with `if_etag` only if unchanged since read."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            with open(self.root / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # serialises compare-and-swap across processes
                current = self.get(key)
                if (if_absent and current is not None) or (
                        if_etag is not None and (current is None or current[1] != if_etag)):
                    raise Conflict(f"{self.location}/{key} exists or changed")
                os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store:
    """Objects in an S3 bucket via boto3, with conditional writes (If-None-Match / If-Match)."""

    def __init__(self, params: StorageParams, prefix: str):
        import boto3
        from botocore.config import Config

        self.bucket = params.bucket
        self.prefix = prefix
        self.location = f"s3://{params.bucket}/{prefix}"
        self.endpoint = params.endpoint_url or "AWS"
        self.attempts = params.attempts
        self.client = boto3.session.Session().client(
            "s3", region_name=params.region, endpoint_url=params.endpoint_url or None,
            config=Config(retries={"total_max_attempts": params.attempts, "mode": "standard"},
                          connect_timeout=3, read_timeout=20))

    def _call(self, operation: str, key: str, **kwargs):
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError

        where = f"{self.location} ({self.endpoint}): {operation} {key}"
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except (ConnectionError, HTTPClientError) as e:
            raise StorageUnavailable(f"{where} failed after {self.attempts} attempts: {e}") from e
        except NoCredentialsError as e:
            raise StorageError(f"{where}: no AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                               "or AWS_PROFILE, or run with an instance/pod role") from e
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise Conflict(f"{self.location}/{key} exists or changed") from e
            if code in ("NoSuchKey", "404"):
                raise
            if code == "NoSuchBucket":
                raise StorageError(f"bucket {self.bucket!r} does not exist (params.yaml storage.bucket)") from e
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
                raise StorageError(f"{where}: {code}; check the AWS credentials and the bucket policy") from e
            if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                raise StorageUnavailable(f"{where} failed after {self.attempts} attempts: {code}") from e
            raise StorageError(f"{where}: {code}: {e}") from e

    def get(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            response = self._call("get_object", key, Key=f"{self.prefix}/{key}")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return response["Body"].read(), response["ETag"]

    def keys(self, prefix: str) -> list[str]:
        keys, token = [], {}
        while True:
            page = self._call("list_objects_v2", prefix, Prefix=f"{self.prefix}/{prefix}", **token)
            keys += [item["Key"][len(self.prefix) + 1:] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def put(self, key: str, data: bytes, *, if_absent: bool = False, if_etag: str | None = None) -> None:
        conditions = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_etag} if if_etag else {}
        self._call("put_object", key, Key=f"{self.prefix}/{key}", Body=data, ChecksumAlgorithm="SHA256",
                   **conditions)

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Key=f"{self.prefix}/{key}")


def ignored_conditions(store: LocalStore | S3Store) -> list[str]:
    """The conditional writes `store` does not enforce (If-None-Match, If-Match), found by trying them.

    Some S3-compatible stores accept the headers and write anyway; compare-and-swap would then
    silently lose concurrent writes. The probe key is fresh, so nothing else is touched.
    """
    key = f".conditional-write-probe/{uuid.uuid4().hex}"
    store.put(key, b"probe", if_absent=True)
    ignored = []
    for condition, write in (("If-None-Match", {"if_absent": True}), ("If-Match", {"if_etag": '"not-its-etag"'})):
        try:
            store.put(key, f"probe {condition}".encode(), **write)
            ignored.append(condition)
        except Conflict:
            pass
    try:
        store.delete(key)
    except StorageError:
        pass  # delete permission is not required: the probe key is then left behind, harmless
    return ignored


def registry_store(params: StorageParams, root: Path) -> LocalStore | S3Store:
    if params.backend == "s3":
        return S3Store(params, "/".join(part for part in (params.prefix.strip("/"), "registry") if part))
    return LocalStore((root / params.local_dir / "registry").resolve())
