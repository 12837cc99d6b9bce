"""Orthanc over its REST API: ``POST /instances`` to deliver, the series' instance list to verify.

REST is the faster way into Orthanc on this machine kind (~400 vs ~150 CT files/s for pynetdicom)
and stores the uploaded file byte for byte. Only de-identified UIDs go in request bodies and only
Orthanc's own IDs go in URLs, so nothing from the original images can end up in an access log.

Failure policy: HTTP 200 with Status Success or AlreadyStored is delivered (a re-send is
idempotent); 400 means Orthanc cannot parse the file and is permanent; 5xx, time-outs, connection
errors and anything unexpected are retryable results for that one image, naming it and the cause:
one upload Orthanc chokes on never fails its siblings. Only a failure of the whole destination
raises ``DestinationError(retryable=True)`` for the batch: not one image reached Orthanc
(unreachable, or credentials refused), or no upload got any answer and ``GET /system`` gets none
either. An image that could not even be tried because Orthanc was unreachable gets a result marked
``destination_fault`` (not counted against the image).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
from pydicom.uid import generate_uid

from sendit.destinations.base import DestinationError, OutgoingImage, SendResult
from sendit.destinations.http import HttpPool

log = logging.getLogger(__name__)

_DELIVERED = frozenset({"Success", "AlreadyStored"})


@dataclass(frozen=True)
class _Attempt:
    result: SendResult
    # Set when the failure is about the destination, not the image (unreachable, auth refused).
    batch_reason: str | None = None
    answered: bool = False  # Orthanc sent an HTTP response


class OrthancRestDestination:
    """Uploads over a small pool of keep-alive connections (one httpx.Client shared by N threads)."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        verify: bool = True,
        name: str | None = None,
    ) -> None:
        self._http = HttpPool(
            url,
            auth=httpx.BasicAuth(username, password or "") if username else None,
            concurrency=concurrency,
            timeout=timeout,
            connect_timeout=connect_timeout,
            verify=verify,
            thread_name="sendit-orthanc-rest",
            headers={"Accept": "application/json"},
        )
        self.url, self.where, self.concurrency = self._http.url, self._http.where, concurrency
        self.name = name or f"orthanc-rest:{self.where}"
        self._timeout = timeout
        self._client = self._http.client

    def __repr__(self) -> str:
        return f"OrthancRestDestination({self.name!r})"

    # -- the Destination protocol -------------------------------------------------------------

    def send(self, images: Sequence[OutgoingImage]) -> list[SendResult]:
        """One result per image, in order; raises DestinationError if none could reach Orthanc."""
        if not images:
            return []
        attempts = self._http.map(self._guarded_post, images)
        reasons = {a.batch_reason for a in attempts}
        if None not in reasons:
            raise DestinationError(f"{self.name}: {sorted(r for r in reasons if r)[0]}", retryable=True)
        if not any(a.answered for a in attempts):
            # Every upload timed out or dropped: is Orthanc down, or are these images the problem?
            problem = self._alive()
            if problem is not None:
                raise DestinationError(f"{problem} (no upload of the batch got an answer)", retryable=True)
        return [replace(a.result, destination_fault=True) if a.batch_reason else a.result for a in attempts]

    def missing(self, series_uid: str, sop_instance_uids: set[str]) -> set[str]:
        """``/tools/lookup`` then the series' instance list (index only, no file reads)."""
        if not sop_instance_uids:
            return set()
        found = self._request("POST", "/tools/lookup", content=series_uid.encode())
        series_ids = [m["ID"] for m in found if isinstance(m, dict) and m.get("Type") == "Series"]
        if not series_ids:
            return set(sop_instance_uids)
        held: set[str] = set()
        for series_id in series_ids:
            instances = self._request("GET", f"/series/{series_id}/instances", missing_ok=True)
            for instance in instances or []:
                uid = instance.get("MainDicomTags", {}).get("SOPInstanceUID")
                if uid:
                    held.add(uid)
        return set(sop_instance_uids) - held

    def check(self) -> str | None:
        """What delivery and verification need, tried before a run: ``GET /system`` (reachable, our
        credentials accepted, and it is Orthanc's REST root), then ``POST /tools/lookup`` for a UID
        that does not exist (what verification asks; a read-only filter refuses it). None when both
        answer; else one line naming the URL (never its credentials) and what to change."""
        where = f"Orthanc at {self.where}"
        try:
            response = self._client.get("/system")
        except httpx.TimeoutException:
            return f"{where}: no answer to GET /system within {self._timeout:g} s"
        except httpx.TransportError as exc:
            return (
                f"cannot reach {where}: {_transport_reason(exc)} (is ORTHANC_URL Orthanc's HTTP address and "
                "port, and RemoteAccessAllowed true when Sendit runs on another host?)"
            )
        if response.status_code in (401, 403):
            return (
                f"{where} refused our credentials on GET /system (HTTP {response.status_code}): set "
                "ORTHANC_USERNAME and ORTHANC_PASSWORD to a user in Orthanc's RegisteredUsers (HTTP 403 can "
                "also mean RemoteAccessAllowed is false on Orthanc)"
            )
        try:
            system = response.json() if response.status_code == 200 else None
        except ValueError:
            system = None
        if not isinstance(system, dict) or "ApiVersion" not in system:
            return (
                f"{where}: GET /system answered HTTP {response.status_code} but not as Orthanc does "
                "(ORTHANC_URL must be Orthanc's REST root, e.g. http://orthanc:8042)"
            )
        try:
            lookup = self._client.post("/tools/lookup", content=generate_uid().encode())
        except httpx.TimeoutException:
            return f"{where}: no answer to POST /tools/lookup within {self._timeout:g} s"
        except httpx.TransportError as exc:
            return f"{where}: POST /tools/lookup failed: {_transport_reason(exc)}"
        if lookup.status_code != 200:
            return (
                f"{where} refused POST /tools/lookup, which verification needs: {_http_reason(lookup)} "
                "(a Lua IncomingHttpRequestFilter or an authorization plugin must let this user POST "
                "/instances and /tools/lookup)"
            )
        return None

    def close(self) -> None:
        self._http.close()

    # -- internals ---------------------------------------------------------------------------

    def _alive(self) -> str | None:
        """GET /system answers 200: Orthanc is up (the cheap question ``send`` asks mid-batch)."""
        try:
            self._request("GET", "/system")
        except DestinationError as exc:
            return str(exc)
        return None

    def _guarded_post(self, image: OutgoingImage) -> _Attempt:
        """``_post``, with anything unexpected made this image's retryable failure, never the batch's."""
        try:
            return self._post(image)
        except Exception as exc:
            return _Attempt(_failed(image, False, f"unexpected error while uploading ({type(exc).__name__})"))

    def _post(self, image: OutgoingImage) -> _Attempt:
        try:
            body = image.path.read_bytes()
        except OSError as exc:
            # str(exc) names the path, which may carry PHI from the source folder.
            return _Attempt(_failed(image, True, f"cannot read the file to send: {exc.strerror or 'error'}"))
        headers = {"Content-Type": "application/dicom"}
        response: httpx.Response | None = None
        for attempt in range(2):  # a second try only for a keep-alive connection dropped under us
            try:
                response = self._client.post("/instances", content=body, headers=headers)
                break
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if attempt:
                    return _Attempt(_failed(image, False, f"connection dropped ({type(exc).__name__})"))
            except httpx.ConnectTimeout:
                reason = "cannot reach Orthanc (ConnectTimeout)"
                return _Attempt(_failed(image, False, reason), batch_reason=reason)
            except httpx.TimeoutException as exc:
                return _Attempt(_failed(image, False, f"timed out waiting for Orthanc ({type(exc).__name__})"))
            except httpx.TransportError as exc:
                reason = f"cannot reach Orthanc ({type(exc).__name__})"
                return _Attempt(_failed(image, False, reason), batch_reason=reason)
        assert response is not None
        return _classify(image, response)

    def _request(self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise DestinationError(f"{self.name}: timed out on {method} {path.split('/')[1]}") from exc
        except httpx.TransportError as exc:
            raise DestinationError(f"{self.name}: cannot reach Orthanc ({type(exc).__name__})") from exc
        if missing_ok and response.status_code == 404:
            return None
        if response.status_code != 200:
            raise DestinationError(f"{self.name}: {_http_reason(response)}")
        try:
            return response.json()
        except ValueError as exc:
            raise DestinationError(f"{self.name}: Orthanc answered something that is not JSON") from exc


def _classify(image: OutgoingImage, response: httpx.Response) -> _Attempt:
    attempt = _classify_response(image, response)
    return replace(attempt, answered=True)


def _classify_response(image: OutgoingImage, response: httpx.Response) -> _Attempt:
    code = response.status_code
    if code == 200:
        try:
            status = response.json().get("Status")
        except (ValueError, AttributeError):
            return _Attempt(_failed(image, False, "HTTP 200 without a JSON status"))
        if status in _DELIVERED:
            return _Attempt(SendResult(image.image_id, delivered=True, status=code))
        if status == "FilteredOut":
            return _Attempt(_failed(image, True, "Orthanc filtered the instance out (a Lua/plugin filter)", code))
        return _Attempt(_failed(image, False, f"Orthanc answered Status {str(status)[:40]!r}", code))
    reason = _http_reason(response)
    if code == 400:
        return _Attempt(_failed(image, True, f"Orthanc could not store the file: {reason}", code))
    if code in (401, 403):
        return _Attempt(_failed(image, False, reason, code), batch_reason=reason)
    return _Attempt(_failed(image, False, reason, code))


def _transport_reason(exc: httpx.TransportError) -> str:
    """The OS's reason (e.g. "[Errno 111] Connection refused"), short; httpx puts no URL in it."""
    return str(exc)[:200] or type(exc).__name__


def _http_reason(response: httpx.Response) -> str:
    code = response.status_code
    text = f"HTTP {code} {response.reason_phrase}".rstrip()
    if code in (401, 403):
        return f"{text}: credentials refused (check the Orthanc user and password)"
    if code == 404:
        return f"{text}: is the URL Orthanc's root?"
    try:
        body = response.json()
    except ValueError:
        return text
    if isinstance(body, dict):
        details = "; ".join(str(body[k]) for k in ("Message", "Details") if body.get(k))
        if details:
            text += f": {details[:300]}"
    return text


def _failed(image: OutgoingImage, permanent: bool, message: str, status: int | None = None) -> SendResult:
    """A failed result whose message names the image by its id (never by a path or a DICOM value)."""
    text = f"image {image.image_id}: {message}"
    return SendResult(image.image_id, delivered=False, permanent=permanent, status=status, message=text)
