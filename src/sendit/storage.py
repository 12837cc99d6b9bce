"""Where originals wait for a worker when hosts share no folder: an object store keyed by SHA-256.

Two adapters with one small interface (:class:`Store`): :class:`S3Store` for any S3-compatible
bucket (AWS S3, MinIO, Ceph; botocore, from boto3), and :class:`FolderStore` for a folder (one host, or a mount
every host shares). Without a store (``STORAGE_URL`` empty, the default) originals are read where
they arrived, in the input folder, as they always were. No Django here: the relay decides when.

Writes of originals are create-only (S3: ``PutObject`` with ``If-None-Match: *``): an object that
is there already is compared by its SHA-256 — the same bytes are "already there", other bytes a
:class:`StoreConflict`. Errors carry no key, bucket content or credential: only what failed and the
exception type, so they can go to logs and the dashboard as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

# Requests a process has in flight at once (a batch's uploads at ingest, its fetches in a worker):
# enough to hide a store's latency, few enough not to crowd the interpreter's lock.
TRANSFERS = 8


class StoreError(Exception):
    """The store could not be used now (unreachable, refused, throttled): the step waits and retries."""


class StoreConflict(StoreError):
    """Create-only write found other bytes under the key: never overwritten, never retried."""


class Store(Protocol):
    """Objects by key ("originals/<sha256>", "kept/<name>"); every method raises StoreError when the
    store is out of reach, and ``get`` raises FileNotFoundError for a key that is not there."""

    location: str  # for operators: bucket and prefix or folder, never a credential

    def put_new(self, key: str, source: Path | bytes, sha256: str) -> bool:
        """Create ``key`` from ``source``, a file or its bytes (whose SHA-256 is ``sha256``), unless it
        exists: True when written, False when the same bytes were there already; raises
        StoreConflict on other bytes."""
        ...

    def get(self, key: str, target: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def copy(self, key: str, new_key: str) -> None: ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a key that is not there is no error (clean-up may run twice)."""
        ...

    def delete_many(self, keys: list[str]) -> None:
        """``delete`` for many keys at once (S3: one request per 1,000): a series' clean-up."""
        ...

    def check(self) -> str | None:
        """What `sendit check` asks: None when the store can be listed, else why not, in one line."""
        ...


#: At most this many bytes of a file are read into memory to be hashed and uploaded in one read
#: (:func:`read_small`); a larger one is hashed, then streamed from the file.
IN_MEMORY = 64 << 20


def read_small(path: Path, size: int) -> bytes | None:
    """The bytes of a file of about ``size`` bytes when that is at most :data:`IN_MEMORY`, else None.
    One read gives both the SHA-256 that names the object and the body uploaded, so the two cannot
    differ (a file rewritten between a hash and an upload could not be told apart)."""
    if size > IN_MEMORY:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def _sha256_of_stream(read: Any) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


class FolderStore:
    """A folder as a store: keys are relative paths below ``root``; create-only by a hard link."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def _path(self, key: str) -> Path:
        path = self.root / key
        if ".." in Path(key).parts or Path(key).is_absolute():
            raise ValueError("a store key is a relative path without '..'")
        return path

    def put_new(self, key: str, source: Path | bytes, sha256: str) -> bool:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".put-")
        os.close(handle)
        try:
            if isinstance(source, bytes):
                Path(temporary).write_bytes(source)
            else:
                shutil.copyfile(source, temporary)
            try:
                os.link(temporary, target)  # fails if the key exists: create-only
                return True
            except FileExistsError:
                with open(target, "rb") as existing:
                    if _sha256_of_stream(existing.read) == sha256:
                        return False
                raise StoreConflict("the store holds other content under this key") from None
        except StoreConflict:
            raise
        except OSError as exc:
            raise StoreError(f"store folder not writable ({type(exc).__name__})") from None
        finally:
            Path(temporary).unlink(missing_ok=True)

    def get(self, key: str, target: Path) -> None:
        shutil.copyfile(self._path(key), target)  # FileNotFoundError when the key is not there

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def copy(self, key: str, new_key: str) -> None:
        destination = self._path(new_key)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), destination)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.delete(key)

    def check(self) -> str | None:
        return None if self.root.is_dir() and os.access(self.root, os.W_OK) else "not a writable folder"


# S3 error codes that mean "not there" and "a create-only write found an object" (RFC 7232 412)
_MISSING = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION = {"412", "PreconditionFailed"}


class S3Store:
    """An S3-compatible bucket under a key prefix (botocore). One client per process: botocore
    clients are thread-safe, so a batch is fetched on a few threads at once. The client is made lazily.

    botocore costs about 2 ms of CPU per request on these machines (docs/performance.md): Sendit
    makes two per image (the upload at ingest, the fetch in a worker) and skips what it does not
    use: response timestamps are not parsed into datetimes (no one reads them; dateutil's parse cost
    a quarter of a GetObject), and no CRC32 is computed on top of the SHA-256 checked end to end.
    obstore (Rust) costs less than half per request but is not fork-safe: a worker forked after its
    parent made a request hangs on its first own (measured with obstore 0.12), and `sendit import
    --wait` forks its workers after its ingest uploaded.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str = "",
        region: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
        timeout: tuple[float, float] = (5.0, 30.0),
        attempts: int = 3,
    ) -> None:
        import botocore.session
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError, ClientError

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        # Credentials: the two keys when given, else botocore's own chain (AWS_* variables, profile, role)
        self._session = botocore.session.get_session()
        # timestamps (LastModified) stay text: Sendit reads none of them
        self._session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
        self._credentials = {
            "aws_access_key_id": access_key_id or None,
            "aws_secret_access_key": secret_access_key or None,
        }
        self._region = region or None
        self._endpoint_url = endpoint_url or None
        self._config = BotoConfig(
            connect_timeout=timeout[0],
            read_timeout=timeout[1],
            retries={"max_attempts": attempts, "mode": "standard"},  # bounded in count and time
            max_pool_connections=16,
            # no CRC32 of every body on top: the SHA-256 of each original is checked end to end
            # (at ingest, and by the worker before de-identification)
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._pid = -1
        self._made: Any = None
        # what the bucket or the way to it raised (some are OSErrors too): told apart from local disk errors
        self._remote: tuple[type[Exception], ...] = (BotoCoreError, ClientError)

    @property
    def _client(self) -> Any:
        """This process's client: a forked worker makes its own (its parent's connections are not its
        to use), from the inherited session, whose loaded service model makes that cheap."""
        if self._pid != os.getpid():
            self._made = self._session.create_client(
                "s3",
                region_name=self._region,
                endpoint_url=self._endpoint_url,
                config=self._config,
                **self._credentials,
            )
            self._pid = os.getpid()
        return self._made

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _fail(self, doing: str, exc: Exception) -> StoreError:
        code = _code(exc)
        name = type(exc).__name__
        detail = f"{name} {code}" if code and code != name else name  # e.g. "ClientError AccessDenied"
        return StoreError(f"storage bucket: {doing} failed ({detail})")

    def put_new(self, key: str, source: Path | bytes, sha256: str) -> bool:
        try:
            with contextlib.nullcontext(source) if isinstance(source, bytes) else open(source, "rb") as body:
                self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=body, IfNoneMatch="*", Metadata={"sha256": sha256}
                )
            return True
        except self._remote as exc:
            if _code(exc) not in _PRECONDITION:
                raise self._fail("upload", exc) from None
        # An object is there: compare what it holds, not what its metadata claims.
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            theirs = _sha256_of_stream(body.read)
        except self._remote as exc:
            raise self._fail("reading an existing object", exc) from None
        if theirs == sha256:
            return False
        raise StoreConflict("storage bucket holds other content under this original's SHA-256 key")

    def get(self, key: str, target: Path) -> None:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            with open(target, "wb") as out:
                shutil.copyfileobj(body, out, 1 << 20)
        except self._remote as exc:  # a local OSError (disk full) passes as it is
            if _code(exc) in _MISSING:
                raise FileNotFoundError("not in the storage bucket") from None
            raise self._fail("download", exc) from None

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except self._remote as exc:
            if _code(exc) in _MISSING:
                return False
            raise self._fail("lookup", exc) from None

    def copy(self, key: str, new_key: str) -> None:
        try:
            self._client.copy_object(
                Bucket=self.bucket, Key=self._key(new_key), CopySource={"Bucket": self.bucket, "Key": self._key(key)}
            )
        except self._remote as exc:
            if _code(exc) in _MISSING:
                raise FileNotFoundError("not in the storage bucket") from None
            raise self._fail("copy", exc) from None

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except self._remote as exc:
            if _code(exc) not in _MISSING:
                raise self._fail("delete", exc) from None

    def delete_many(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            chunk = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            try:
                answer = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
            except self._remote as exc:
                raise self._fail("delete", exc) from None
            failed = [error for error in answer.get("Errors", []) if error.get("Code") not in _MISSING]
            if failed:
                raise StoreError(f"storage bucket: delete failed for {len(failed)} object(s) ({failed[0].get('Code')})")

    def check(self) -> str | None:
        try:
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except self._remote as exc:
            return str(self._fail("listing", exc))
        return None


def _code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError ("NoSuchKey", "412"), or "" for anything else."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def open_store(
    url: str,
    *,
    endpoint_url: str = "",
    region: str = "",
    access_key_id: str = "",
    secret_access_key: str = "",
) -> Store | None:
    """The store a ``STORAGE_URL`` names: ``s3://bucket/prefix``, ``file:///folder``, or None for ""."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.hostname:
            raise ValueError("STORAGE_URL: s3:// needs a bucket name (s3://bucket/prefix)")
        return S3Store(
            parts.hostname,
            parts.path,
            endpoint_url=endpoint_url,
            region=region,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
        )
    if parts.scheme == "file":
        return FolderStore(Path(parts.path))
    raise ValueError("STORAGE_URL: must be empty, s3://bucket/prefix or file:///folder")
