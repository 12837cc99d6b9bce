"""Talking to the service: bounded retries with back-off, an overall deadline per attempt, and the
bearer token's life (configured, read from a file, or fetched and renewed from an OAuth2 endpoint).

A transient failure (time-out, connection, 5xx, 408, 429) is retried up to ``max_attempts`` and then
raised as a retryable ``IdentifierError``; anything else the service says is final. Logs and messages
carry statuses and counts, never a token, a URL with credentials (refused in settings) or a body.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx

from sendit.identifiers.base import IdentifierError
from sendit.identifiers.dasher.settings import DasherSettings

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 16 * 1024 * 1024
TOKEN_EXPIRY_MARGIN = 30.0  # seconds; refresh a little before the service would refuse
_RETRY_STATUSES = frozenset({408, 429})

Sleep = Callable[[float], None]
Clock = Callable[[], float]


class _TransientFailure(Exception):
    """One attempt failed in a way that may pass (time-out, connection, 5xx); retried with back-off."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class _Reply:
    status: int
    body: bytes


def _status_text(status: int) -> str:
    """The standard phrase, not the server's: a server could put anything in its reason phrase."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _loads(body: bytes, what: str) -> Any:
    def refuse_constant(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(body, parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError):
        raise IdentifierError(f"{what} returned malformed JSON", retryable=False) from None


class DasherClient:
    """POSTs JSON with a bearer token. Thread-safe: the token is shared under a lock, so one instance
    may serve several worker threads and a renewed token is fetched once."""

    def __init__(self, settings: DasherSettings, *, sleep: Sleep = time.sleep, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._access_token = ""  # from the token endpoint; wins over the configured one until it expires
        self._access_expires: float | None = None
        self._refresh_token = settings.refresh_token

    def session(self) -> httpx.Client:
        """One connection pool for the requests of one ``identify`` call; no redirects followed."""
        s = self.settings
        timeout = httpx.Timeout(
            connect=s.connect_timeout, read=s.read_timeout, write=s.read_timeout, pool=s.connect_timeout
        )
        return httpx.Client(timeout=timeout, follow_redirects=False)

    def post_json(self, session: httpx.Client, url: str, body: dict[str, Any], where: str) -> Any:
        """POST with the bearer token; one token refresh on 401, then judge the status."""
        what = f"identifier service ({where})"
        token = self._token(session)
        reply = self._send(session, "POST", url, what, json=body, headers=self._auth(token))
        if reply.status == 401:
            logger.warning("%s answered 401; refreshing the token once", what)
            token = self._renew_token(session, rejected=token)
            reply = self._send(session, "POST", url, what, json=body, headers=self._auth(token))
            if reply.status == 401:
                raise IdentifierError(
                    f"{what}: authentication failed (401 again after a token refresh)", retryable=False
                )
        if not 200 <= reply.status < 300:
            raise IdentifierError(f"{what} refused the request: {_status_text(reply.status)}", retryable=False)
        return _loads(reply.body, what)

    @staticmethod
    def _auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    # -- retry and deadline ----------------------------------------------------------------------

    def _send(self, session: httpx.Client, method: str, url: str, what: str, **kwargs: Any) -> _Reply:
        """At most ``max_attempts`` tries, each bounded in time; transient failures back off and retry."""
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return self._attempt(session, method, url, **kwargs)
            except _TransientFailure as failure:
                if attempt == attempts:
                    raise IdentifierError(
                        f"{what} unavailable: {failure.reason}; gave up after {attempts} attempt(s)",
                        retryable=True,
                    ) from None
                delay = min(self.settings.backoff_cap, self.settings.backoff_base * 2 ** (attempt - 1))
                if failure.retry_after is not None:
                    delay = min(self.settings.backoff_cap, max(delay, failure.retry_after))
                logger.warning(
                    "%s: %s; attempt %d of %d, retrying in %.2f s", what, failure.reason, attempt, attempts, delay
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - settings guarantee max_attempts >= 1

    def _attempt(self, session: httpx.Client, method: str, url: str, **kwargs: Any) -> _Reply:
        # httpx bounds each read, not the whole exchange: a server trickling bytes could hold us for
        # ever, so the attempt also has an overall deadline checked between chunks.
        s = self.settings
        deadline = self._clock() + s.connect_timeout + 2 * s.read_timeout
        try:
            with session.stream(method, url, **kwargs) as response:
                status = response.status_code
                if status >= 500 or status in _RETRY_STATUSES:
                    raise _TransientFailure(_status_text(status), _retry_after(response.headers.get("retry-after")))
                if not 200 <= status < 300:
                    return _Reply(status, b"")
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise IdentifierError(
                            f"identifier service answer larger than {MAX_RESPONSE_BYTES // 2**20} MiB",
                            retryable=False,
                        )
                    if self._clock() > deadline:
                        raise _TransientFailure("answer took too long to arrive")
                    chunks.append(chunk)
                return _Reply(status, b"".join(chunks))
        except httpx.TimeoutException as exc:
            raise _TransientFailure(f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _TransientFailure(f"connection failed ({type(exc).__name__})") from None

    # -- token -----------------------------------------------------------------------------------

    def _token(self, session: httpx.Client) -> str:
        with self._lock:
            if self._fresh_access_token():
                return self._access_token
            configured = self._configured_token()
            if configured:
                return configured
            return self._fetch_token(session)

    def _fresh_access_token(self) -> bool:
        expires = self._access_expires
        return bool(self._access_token) and (expires is None or self._clock() < expires)

    def _configured_token(self) -> str:
        """DASHER_TOKEN, or DASHER_TOKEN_FILE read now, so a rotated file is picked up without restart."""
        if self.settings.token_file:
            try:
                token = Path(self.settings.token_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise IdentifierError(
                    f"cannot read DASHER_TOKEN_FILE {self.settings.token_file} ({type(exc).__name__})",
                    retryable=False,
                ) from None
            if not token:
                raise IdentifierError(f"DASHER_TOKEN_FILE {self.settings.token_file} is empty", retryable=False)
            return token
        return self.settings.token

    def _renew_token(self, session: httpx.Client, rejected: str) -> str:
        """A token other than the rejected one: from the token endpoint, or a rotated token file."""
        with self._lock:
            if self._fresh_access_token() and self._access_token != rejected:
                return self._access_token  # another thread renewed it meanwhile
            if self.settings.refresh_configured:
                return self._fetch_token(session)
            if self.settings.token_file:
                token = self._configured_token()
                if token != rejected:
                    return token
        raise IdentifierError(
            "identifier service: authentication failed (401; the token was refused and no token refresh is configured)",
            retryable=False,
        )

    def _fetch_token(self, session: httpx.Client) -> str:
        """OAuth2 client_credentials grant (HTTP Basic client auth), or refresh_token when configured."""
        s = self.settings
        what = "token endpoint"
        data: dict[str, str]
        auth: tuple[str, str] | None = None
        if s.refresh_token:
            data = {"grant_type": "refresh_token", "refresh_token": self._refresh_token}
            if s.client_id and s.client_secret:
                auth = (s.client_id, s.client_secret)
            elif s.client_id:
                data["client_id"] = s.client_id
        else:
            data = {"grant_type": "client_credentials"}
            auth = (s.client_id, s.client_secret)
        logger.info("requesting a new access token (%s grant)", data["grant_type"])
        reply = self._send(
            session, "POST", s.token_url, what, data=data, auth=auth, headers={"Accept": "application/json"}
        )
        if not 200 <= reply.status < 300:
            raise IdentifierError(f"{what}: authentication failed ({_status_text(reply.status)})", retryable=False)
        payload = _loads(reply.body, what)
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise IdentifierError(f"{what}: authentication failed (no access_token in the answer)")
        token_type = payload.get("token_type", "bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise IdentifierError(f"{what}: authentication failed (token type is not bearer)")
        expires_in = payload.get("expires_in")
        self._access_token = token.strip()
        self._access_expires = (
            self._clock() + max(0.0, float(expires_in) - TOKEN_EXPIRY_MARGIN)
            if type(expires_in) in (int, float) and expires_in > 0
            else None
        )
        rotated = payload.get("refresh_token")
        if isinstance(rotated, str) and rotated.strip():
            self._refresh_token = rotated.strip()
        return self._access_token
