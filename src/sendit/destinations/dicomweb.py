"""DICOMweb: STOW-RS to deliver, QIDO-RS to verify (PS3.18 10.5 Store Transaction, 10.6 Search).

Today's archives take DICOMweb: Google Cloud Healthcare, Azure's DICOM service, AWS HealthImaging,
dcm4chee, Orthanc's plugin. Each request is one ``multipart/related; type="application/dicom"``
body of up to ``batch`` files of one study, posted to ``{url}/studies/{StudyInstanceUID}`` (so the
server itself refuses an instance of another study), several requests at once over a small pool of
keep-alive connections. Only de-identified UIDs go into URLs and bodies.

Per-instance results come from the response (PS3.18 Table 10.5.3-1): an instance in the Referenced
SOP Sequence (0008,1199) is delivered (with its Warning Reason (0008,1196) as a note); one in the
Failed SOP Sequence (0008,1198) failed with its Failure Reason (0008,1197), a DIMSE status code
classified as retryable or permanent by :mod:`sendit.destinations.dimse_status`, the same table
as for C-STORE. An instance the server mentions in neither was not stored (Orthanc's plugin leaves
out an instance its Lua filter refused): a retryable failure that says so.

Whole-request answers: 5xx, 408, 429, time-outs and dropped connections are retryable failures of
the request's images; 401/403 (the credentials) and 404/405/406/415 (not a STOW-RS endpoint) fail
the destination, not the images. Another 4xx (Orthanc: 400 for a file it cannot parse) gives the
instances it names their result; one it does not name is sent again alone, so one bad file never
fails its siblings, and refused alone it fails for good.
Raises ``DestinationError`` only when the destination as a whole fails, as the other adapters do.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import httpx

from sendit.destinations.base import DestinationError, OutgoingImage, SendResult
from sendit.destinations.dimse_status import classify, describe
from sendit.destinations.http import HttpPool

log = logging.getLogger(__name__)

# PS3.18 Table 10.5.3-1 and PS3.3 C.12.1: the attributes of a Store Instances Response
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
SOP_INSTANCE_UID = "00080018"

#: QIDO-RS page size; a series larger than this is read page by page
QIDO_PAGE = 1000


@dataclass(frozen=True)
class _Attempt:
    result: SendResult
    batch_reason: str | None = None  # the destination failed, not the image (unreachable, auth refused)
    answered: bool = False  # the server sent an HTTP response


class BearerToken(httpx.Auth):
    """``Authorization: Bearer …``: a fixed token (DICOMWEB_TOKEN)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


class GoogleServiceAccount(httpx.Auth):
    """Bearer tokens of a Google service account (the Cloud Healthcare API's DICOMweb), from
    google-auth (``pip install 'sendit[google]'``): fetched when first needed, renewed before they
    expire, and once more when the server answers 401."""

    SCOPES = ("https://www.googleapis.com/auth/cloud-healthcare",)

    def __init__(self, credentials_file: str, timeout: float = 30.0) -> None:
        try:
            from google.oauth2 import service_account
        except ImportError as exc:  # an optional dependency
            raise DestinationError(
                "DICOMWEB_GOOGLE_CREDENTIALS needs google-auth: pip install 'sendit[google]'", retryable=False
            ) from exc
        self._credentials = service_account.Credentials.from_service_account_file(credentials_file, scopes=self.SCOPES)
        self._timeout = timeout
        self._lock = threading.Lock()

    def _token(self, renew: bool = False) -> str:
        with self._lock:
            if renew or not self._credentials.valid:
                self._credentials.refresh(_GoogleTransport(self._timeout))
            return str(self._credentials.token)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token()}"
        response = yield request
        if response.status_code == 401:  # revoked or expired early: one new token, one more try
            request.headers["Authorization"] = f"Bearer {self._token(renew=True)}"
            yield request


class _GoogleResponse:
    """google.auth.transport.Response over an httpx answer."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.headers = dict(response.headers)
        self.data = response.content


class _GoogleTransport:
    """google.auth.transport.Request with httpx (no second HTTP library for one token request)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _GoogleResponse:
        from google.auth.exceptions import TransportError

        try:
            with httpx.Client(timeout=timeout or self.timeout) as client:
                return _GoogleResponse(client.request(method, url, content=body, headers=headers))
        except httpx.HTTPError as exc:
            raise TransportError(f"token request failed ({type(exc).__name__})") from None


class DicomWebDestination:
    """STOW-RS batches over ``concurrency`` connections; QIDO-RS per series to verify."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        google_credentials: str | None = None,
        batch: int = 20,
        concurrency: int = 4,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        verify: bool = True,
        name: str | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        auth: httpx.Auth | None = None
        if google_credentials:
            auth = GoogleServiceAccount(google_credentials, timeout=timeout)
        elif token:
            auth = BearerToken(token)
        elif username:
            auth = httpx.BasicAuth(username, password or "")
        self._http = HttpPool(
            url,
            auth=auth,
            concurrency=concurrency,
            timeout=timeout,
            connect_timeout=connect_timeout,
            verify=verify,
            thread_name="sendit-stow",
        )
        self.url, self.where, self.concurrency = self._http.url, self._http.where, concurrency
        self.batch = batch
        self.name = name or f"dicomweb:{self.where}"
        self._timeout = timeout
        self._client = self._http.client

    def __repr__(self) -> str:
        return f"DicomWebDestination({self.name!r})"

    # -- the Destination protocol -------------------------------------------------------------

    def send(self, images: Sequence[OutgoingImage]) -> list[SendResult]:
        """One result per image, in order; raises DestinationError if none could reach the server."""
        if not images:
            return []
        attempts: dict[int, _Attempt] = {}
        for done in self._http.map(self._guarded_store, list(_batches(images, self.batch))):
            attempts.update(done)
        ordered = [attempts[image.image_id] for image in images]
        reasons = {a.batch_reason for a in ordered}
        if None not in reasons:
            raise DestinationError(f"{self.name}: {sorted(r for r in reasons if r)[0]}", retryable=True)
        if not any(a.answered for a in ordered):
            problem = self.check()
            if problem is not None:
                raise DestinationError(f"{problem} (no request of the batch got an answer)", retryable=True)
        return [replace(a.result, destination_fault=True) if a.batch_reason else a.result for a in ordered]

    def missing(self, series_uid: str, sop_instance_uids: set[str]) -> set[str]:
        """QIDO-RS ``GET {url}/instances?SeriesInstanceUID=…`` (PS3.18 10.6), page by page."""
        if not sop_instance_uids:
            return set()
        held: set[str] = set()
        pages = len(sop_instance_uids) // QIDO_PAGE + 2  # bounded: one more page than can be full
        for page in range(pages):
            params = {
                "SeriesInstanceUID": series_uid,
                "includefield": SOP_INSTANCE_UID,
                "limit": str(QIDO_PAGE),
                "offset": str(page * QIDO_PAGE),
            }
            found = self._search("/instances", params)
            for match in found:
                held.update(str(uid) for uid in _values(match, SOP_INSTANCE_UID))
            if len(found) < QIDO_PAGE:
                break
        return set(sop_instance_uids) - held

    def check(self) -> str | None:
        """A QIDO-RS search for a study that does not exist: reachable, credentials accepted, DICOMweb."""
        where = f"DICOMweb at {self.where}"
        try:
            response = self._client.get("/studies", params={"StudyInstanceUID": "2.25.1", "limit": "1"}, headers=_JSON)
        except httpx.TimeoutException:
            return f"{where}: no answer to a QIDO-RS search within {self._timeout:g} s"
        except httpx.TransportError as exc:
            return f"cannot reach {where}: {str(exc)[:200] or type(exc).__name__}"
        except Exception as exc:  # the credentials' own token request (google-auth's RefreshError)
            return f"{where}: no token for the service account ({type(exc).__name__})"
        if response.status_code in (401, 403):
            return (
                f"{where} refused our credentials (HTTP {response.status_code}):"
                " check DICOMWEB_USERNAME and DICOMWEB_PASSWORD, or DICOMWEB_TOKEN"
            )
        if response.status_code not in (200, 204):
            return f"{where}: a QIDO-RS search answered {_http_reason(response)} (is DICOMWEB_URL the DICOMweb root?)"
        return None

    def close(self) -> None:
        self._http.close()

    # -- STOW-RS -------------------------------------------------------------------------------

    def _guarded_store(self, images: list[OutgoingImage]) -> dict[int, _Attempt]:
        try:
            return self._store(images)
        except Exception as exc:  # anything unforeseen is these images' retryable failure
            reason = f"unexpected error while storing ({type(exc).__name__})"
            return {image.image_id: _Attempt(_failed(image, False, reason)) for image in images}

    def _store(self, images: list[OutgoingImage], split: bool = True) -> dict[int, _Attempt]:
        """1. Read the files (one that cannot be read fails alone). 2. POST them as one multipart
        body. 3. Read per-instance results; a 4xx naming no instance is asked again one by one."""
        attempts: dict[int, _Attempt] = {}
        parts: list[tuple[OutgoingImage, bytes]] = []
        for image in images:
            try:
                parts.append((image, Path(image.path).read_bytes()))
            except OSError as exc:  # str(exc) names the path
                attempts[image.image_id] = _Attempt(
                    _failed(image, True, f"cannot read the file to send: {exc.strerror or 'error'}")
                )
        if not parts:
            return attempts
        sent = [image for image, _ in parts]
        boundary = uuid.uuid4().hex
        body = _multipart(boundary, [data for _, data in parts])
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', **_JSON}
        study = sent[0].study_uid
        try:
            response = self._client.post(f"/studies/{study}", content=body, headers=headers)
        except httpx.ConnectTimeout:
            reason = "cannot reach the DICOMweb server (ConnectTimeout)"
            attempts.update({i.image_id: _Attempt(_failed(i, False, reason), batch_reason=reason) for i in sent})
            return attempts
        except httpx.TimeoutException as exc:
            reason = f"timed out waiting for the STOW-RS answer ({type(exc).__name__})"
            attempts.update({i.image_id: _Attempt(_failed(i, False, reason)) for i in sent})
            return attempts
        except httpx.TransportError as exc:
            reason = f"cannot reach the DICOMweb server ({type(exc).__name__})"
            attempts.update({i.image_id: _Attempt(_failed(i, False, reason), batch_reason=reason) for i in sent})
            return attempts
        code = response.status_code
        if code in (
            401,
            403,
            404,
            405,
            406,
            415,
        ):  # the credentials, or not a STOW-RS endpoint: the destination's fault
            reason = _http_reason(response) + ("" if code in (401, 403) else " (is DICOMWEB_URL the DICOMweb root?)")
            attempts.update({i.image_id: _Attempt(_failed(i, False, reason, code), batch_reason=reason) for i in sent})
            return attempts
        answer = _json(response)
        failed, referenced = _outcomes(answer)
        if 400 <= code < 500 and code not in (408, 429):
            # a refusal: the instances it names have their result; one it does not name is asked
            # again alone (which is it?), and refused alone it fails for good
            unreported = [i for i in sent if i.sop_instance_uid not in failed and i.sop_instance_uid not in referenced]
            for image in sent:
                if image not in unreported:
                    attempts[image.image_id] = _Attempt(_result(image, failed, referenced, code), answered=True)
            if split and len(sent) > 1:
                for image in unreported:
                    attempts.update(self._store([image], split=False))
                return attempts
            reason = f"STOW-RS refused it: {_http_reason(response)}"
            attempts.update({i.image_id: _Attempt(_failed(i, True, reason, code), answered=True) for i in unreported})
            return attempts
        if code >= 500 or (code not in (200, 202, 409) and not failed and not referenced):
            reason = f"STOW-RS failed: {_http_reason(response)}"
            attempts.update({i.image_id: _Attempt(_failed(i, False, reason, code), answered=True) for i in sent})
            return attempts
        for image in sent:
            attempts[image.image_id] = _Attempt(_result(image, failed, referenced, code), answered=True)
        return attempts

    def _search(self, path: str, params: dict[str, str]) -> list[Any]:
        try:
            response = self._client.get(path, params=params, headers=_JSON)
        except httpx.TimeoutException as exc:
            raise DestinationError(f"{self.name}: timed out on a QIDO-RS search") from exc
        except httpx.TransportError as exc:
            raise DestinationError(f"{self.name}: cannot reach the DICOMweb server ({type(exc).__name__})") from exc
        if response.status_code == 204 or (response.status_code == 200 and not response.content.strip()):
            return []  # PS3.18 10.6.3.2: no match
        if response.status_code != 200:
            raise DestinationError(f"{self.name}: QIDO-RS search answered {_http_reason(response)}")
        found = _json(response)
        if not isinstance(found, list):
            raise DestinationError(f"{self.name}: QIDO-RS answered something that is not a JSON list")
        return found


_JSON = {"Accept": "application/dicom+json"}


def _batches(images: Sequence[OutgoingImage], size: int) -> Iterator[list[OutgoingImage]]:
    """Images grouped by study (a request goes to one study's URL), ``size`` at most per request."""
    by_study: dict[str, list[OutgoingImage]] = {}
    for image in images:
        by_study.setdefault(image.study_uid, []).append(image)
    for group in by_study.values():
        it = iter(group)
        while chunk := list(islice(it, size)):
            yield chunk


def _multipart(boundary: str, files: list[bytes]) -> bytes:
    """PS3.18 8.6.1.2: one part per instance, ``Content-Type: application/dicom``."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    chunks: list[bytes] = []
    for data in files:
        chunks += [head, data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json() if response.content.strip() else None
    except ValueError:
        return None


def _values(item: Any, tag: str) -> list[Any]:
    """The Value list of ``tag`` in a DICOM JSON object (PS3.18 F.2), or []."""
    if not isinstance(item, dict):
        return []
    element = item.get(tag)
    if not isinstance(element, dict):
        return []
    value = element.get("Value")
    return value if isinstance(value, list) else []


def _code(item: Any, tag: str) -> int | None:
    values = _values(item, tag)
    try:
        return int(values[0]) if values else None
    except (TypeError, ValueError):
        return None


def _outcomes(answer: Any) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """(failed: SOPInstanceUID → Failure Reason, referenced: SOPInstanceUID → Warning Reason)."""
    failed = {
        str(uid): _code(item, FAILURE_REASON)
        for item in _values(answer, FAILED_SOP_SEQUENCE)
        for uid in _values(item, REFERENCED_SOP_INSTANCE_UID)[:1]
    }
    referenced = {
        str(uid): _code(item, WARNING_REASON)
        for item in _values(answer, REFERENCED_SOP_SEQUENCE)
        for uid in _values(item, REFERENCED_SOP_INSTANCE_UID)[:1]
    }
    return failed, referenced


def _result(
    image: OutgoingImage, failed: dict[str, int | None], referenced: dict[str, int | None], code: int
) -> SendResult:
    uid = image.sop_instance_uid
    if uid in failed:
        reason = failed[uid]
        if reason is None:
            return _failed(image, False, "STOW-RS: in the Failed SOP Sequence without a Failure Reason", code)
        info = classify(reason)
        return _failed(image, info.permanent, f"STOW-RS refused it: {info.describe()}", reason)
    if uid in referenced:
        warning = referenced[uid]
        message = f"image {image.image_id}: STOW-RS stored it with a warning: {describe(warning)}" if warning else ""
        return SendResult(image.image_id, delivered=True, status=warning or 0, message=message)
    return _failed(image, False, f"STOW-RS answered HTTP {code} but did not report this instance as stored", code)


def _http_reason(response: httpx.Response) -> str:
    text = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    if response.status_code in (401, 403):
        return f"{text}: credentials refused"
    return text


def _failed(image: OutgoingImage, permanent: bool, message: str, status: int | None = None) -> SendResult:
    """A failed result whose message names the image by its id (never by a path or a DICOM value)."""
    return SendResult(
        image.image_id, False, permanent=permanent, status=status, message=f"image {image.image_id}: {message}"
    )
