"""Google Cloud Storage: each de-identified instance as one object, created once, verified by listing.

1. Name: ``<prefix>/<pseudonym>/<study>/<series>/<SOP>.dcm`` (:mod:`.layout`; no PHI in a name).
2. Upload create-only (``if_generation_match=0``) with the file's CRC32C, which Storage checks (an
   upload that arrived damaged is refused, HTTP 400: that image is tried again later); files above
   8 MiB go as a resumable upload in 8 MiB chunks. The client retries 429, 5xx and time-outs with
   exponential back-off and jitter for GOOGLE_TIMEOUT seconds in all.
3. A 412 (an object of that name is there already: an earlier attempt whose answer was lost, or a
   re-send) compares checksums: equal is delivered; different is a permanent error for the image.
4. 401/403 and a missing bucket are the configuration's (not retried, naming the setting); anything
   that still fails after the retries is the destination's (the series is tried again later).
5. Up to :data:`UPLOADS` objects go up at once, each thread with its own client.
6. Verification lists the series' prefix and compares names, and the CRC32C of every object this
   adapter uploaded or matched.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from sendit.destinations.base import DestinationError, OutgoingImage, SendResult
from sendit.destinations.folder import safe_path_part
from sendit.destinations.google import client as gclient
from sendit.destinations.google.layout import instance_name, link, series_prefix
from sendit.destinations.google.settings import GoogleSettings

log = logging.getLogger("sendit.destinations.google")

RESUMABLE_ABOVE = 8 * 1024 * 1024  # the client's own multipart limit; larger files go in chunks
CHUNK_SIZE = 8 * 1024 * 1024  # a multiple of 256 KiB, as resumable uploads require
CHECK_OBJECT = ".sendit-check"
UPLOADS = 8  # objects uploaded at once per batch: one upload waits on the network most of its time


def crc32c_of(path: Path) -> str:
    """Base64 of the big-endian CRC32C, as Storage reports it (``crc32c`` of an object)."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            checksum.update(block)
    return base64.b64encode(checksum.digest()).decode("ascii")


class GoogleStorageDestination:
    name = "google-storage"

    def __init__(self, settings: GoogleSettings) -> None:
        self.settings = settings
        self.where = f"gs://{settings.bucket}/{settings.prefix + '/' if settings.prefix else ''}"
        self._lock = threading.Lock()
        self._series: dict[str, str] = {}  # series UID → its prefix, for verification
        self._checksums: dict[str, str] = {}  # object name → CRC32C of what we hold locally

    # -- the client ------------------------------------------------------------------------------

    def bucket(self) -> Any:
        """The bucket through this thread's client (its own HTTP session, kept by the process)."""
        return gclient.shared_client("storage", self.settings).bucket(self.settings.bucket)

    def explain(self, exc: BaseException, doing: str) -> DestinationError:
        return gclient.explain(exc, service="Cloud Storage", setting="GOOGLE_CLOUD_STORAGE", doing=doing)

    def timeouts(self) -> tuple[float, float]:
        return (min(10.0, self.settings.timeout), self.settings.timeout)

    # -- one object --------------------------------------------------------------------------------

    def upload(self, path: Path, name: str, content_type: str) -> tuple[str, bool]:
        """Create ``name`` from ``path`` unless it exists; returns (its CRC32C, created).

        An object already there with other content raises :class:`Conflict`. Google's errors pass up.
        """
        from google.api_core import exceptions as gexc

        local = crc32c_of(path)
        blob = self.bucket().blob(name, chunk_size=CHUNK_SIZE if path.stat().st_size > RESUMABLE_ABOVE else None)
        blob.crc32c = local  # sent with the object: Storage refuses it (400) if what arrived differs
        try:
            blob.upload_from_filename(
                str(path),
                content_type=content_type,
                if_generation_match=0,
                timeout=self.timeouts(),
                retry=gclient.retry_policy(self.settings),
            )
        except gexc.PreconditionFailed:
            existing = self.bucket().get_blob(name, timeout=self.timeouts(), retry=gclient.retry_policy(self.settings))
            if existing is None:  # removed between the two calls: the next attempt creates it
                raise Vanished() from None
            if existing.crc32c != local:
                raise Conflict(existing.generation) from None
            return local, False
        if blob.crc32c != local:  # what Storage says it holds
            raise Damaged()
        return local, True

    # -- Destination ---------------------------------------------------------------------------------

    def send(self, images: Sequence[OutgoingImage]) -> list[SendResult]:
        """Up to :data:`UPLOADS` at once; one result per image, in order. A destination-wide failure
        (refused, missing bucket, still down after the retries) stops the rest and raises."""
        self.bucket()  # no usable credentials: a DestinationError for the batch, before any image
        if len(images) <= 1:
            return [self.send_one(image) for image in images]
        futures = [upload_pool().submit(self.send_one, image) for image in images]
        try:
            return [future.result() for future in futures]
        finally:  # after a failure: the rest is not started, and nothing runs on after we return
            for future in futures:
                future.cancel()
            wait(futures)

    def send_one(self, image: OutgoingImage) -> SendResult:
        prefix = series_prefix(self.settings.prefix, image.patient_id, image.study_uid, image.series_uid)
        name = instance_name(prefix, image.sop_instance_uid)
        with self._lock:
            self._series[image.series_uid] = prefix
        try:
            checksum, _ = self.upload(image.path, name, "application/dicom")
        except Conflict:
            message = (
                f"image {image.image_id}: the bucket already holds this instance with different content "
                "(CRC32C differs); not overwritten"
            )
            return SendResult(image.image_id, delivered=False, permanent=True, message=message)
        except Vanished:  # this image only, tried again later
            return SendResult(image.image_id, delivered=False, message=f"image {image.image_id}: its object vanished")
        except Damaged:
            message = f"image {image.image_id}: Storage holds other bytes than were sent (CRC32C differs)"
            return SendResult(image.image_id, delivered=False, message=message)
        except Exception as exc:
            if _refused_as_damaged(exc):  # Storage checked the CRC32C we sent: this image, later again
                message = f"image {image.image_id}: Storage refused the upload (HTTP 400, damaged on the way?)"
                return SendResult(image.image_id, delivered=False, message=message)
            raise self.explain(exc, f"uploading image {image.image_id}") from None
        with self._lock:
            self._checksums[name] = checksum
        return SendResult(image.image_id, delivered=True)

    def missing(self, series_uid: str, sop_instance_uids: set[str]) -> set[str]:
        prefix = self._series.get(series_uid)
        try:
            if prefix is not None:
                listed = self.list_objects(prefix)
            else:  # a series delivered by an earlier process: find it by its series part (glob, then filter)
                base = f"{self.settings.prefix}/" if self.settings.prefix else ""
                pattern = f"{base}**/{safe_path_part(series_uid)}/*.dcm"
                listed = self.list_objects(base, match_glob=pattern)
        except Exception as exc:
            raise self.explain(exc, "listing the series") from None
        wanted_part = safe_path_part(series_uid)
        present: set[str] = set()
        for name, checksum in listed.items():
            parts = name.rsplit("/", 2)
            if len(parts) != 3 or parts[1] != wanted_part or not parts[2].endswith(".dcm"):
                continue
            expected = self._checksums.get(name)
            if expected is not None and expected != checksum:
                continue  # not what we sent: missing, so sent again (and then a 412 with words)
            present.add(parts[2][: -len(".dcm")])
        return {uid for uid in sop_instance_uids if safe_path_part(uid) not in present}

    def list_objects(self, prefix: str, match_glob: str | None = None) -> dict[str, str]:
        """Object name → CRC32C under ``prefix`` (paged by the client; bounded by the retry policy)."""
        extra = {"match_glob": match_glob} if match_glob else {}
        blobs = self.bucket().client.list_blobs(
            self.settings.bucket,
            prefix=prefix,
            fields="items(name,crc32c),nextPageToken",
            timeout=self.timeouts(),
            retry=gclient.retry_policy(self.settings),
            **extra,
        )
        return {blob.name: str(blob.crc32c) for blob in blobs}

    def check(self) -> str | None:
        """Writable: create ``<prefix>/.sendit-check`` once (create-only, so a 412 also proves it).

        A probe that needs no delete permission (roles/storage.objectCreator has none) and leaves at
        most one tiny object behind."""
        from google.api_core import exceptions as gexc

        name = f"{self.settings.prefix}/{CHECK_OBJECT}" if self.settings.prefix else CHECK_OBJECT
        try:
            self.bucket().blob(name).upload_from_string(
                b"written by `sendit check`\n",
                content_type="text/plain",
                if_generation_match=0,
                timeout=self.timeouts(),
                retry=gclient.retry_policy(self.settings),
            )
        except gexc.PreconditionFailed:
            pass
        except DestinationError as exc:
            return str(exc)
        except Exception as exc:
            return str(self.explain(exc, f"bucket {self.settings.bucket} not writable"))
        return None

    def link(self, name: str) -> str:
        return link(self.settings.bucket, name)

    def close(self) -> None:
        return None  # the clients stay with the process (client.shared_client)


_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def upload_pool() -> ThreadPoolExecutor:
    """This process's upload threads (made after a fork, never inherited), kept with their clients."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=UPLOADS, thread_name_prefix="sendit-gcs"))
        return _POOL[1]


class Conflict(Exception):
    """An object of that name holds other content (its generation, to replace it on purpose)."""

    def __init__(self, generation: int | None) -> None:
        super().__init__("object exists with different content")
        self.generation = generation


class Vanished(Exception):
    """A 412 said the object was there, and then it was not."""


class Damaged(Exception):
    """Storage reports another CRC32C than the file's."""


def _refused_as_damaged(exc: BaseException) -> bool:
    """A 400 on an upload: the request was well formed but for its content (the CRC32C sent with it)."""
    from google.api_core import exceptions as gexc

    return isinstance(exc, gexc.BadRequest)
