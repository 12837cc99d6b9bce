"""A real DASHER-compatible HTTP server on loopback, for tests of the REST identifier provider.

It answers deterministically (suid from a hash of id_source + id, a nonzero jitter from the same hash),
records every request it receives, serves an OAuth2 token endpoint, and can be told to misbehave for
the next N identifier requests (``fail``) or for all of them (``fail_always``).

Register in tests/conftest.py with ``pytest_plugins = ["tests.dasher_server"]``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest

# Every way the identifier endpoint can be told to misbehave.
FAILURE_MODES = frozenset(
    {
        "500",  # HTTP 500 with a body that is not JSON
        "503",  # HTTP 503 with Retry-After: 1
        "stall",  # wait ``stall_seconds`` before answering (past the client's read timeout)
        "401",  # refuse whatever token was sent
        "400",  # HTTP 400 with an error body that echoes the request (as some services do)
        "malformed",  # 200 with a body that is not JSON
        "not_object",  # 200 with a JSON list instead of {"results": [...]}
        "drop_item",  # the last item of the first patient is left out
        "extra_item",  # an item nobody asked about is added
        "empty_suid",  # the first patient's suid is ""
        "empty_item_suid",  # the first item's suid is ""
        "echo_id",  # the first patient's suid is its original id
        "zero_jitter",  # the first patient's jitter is 0
        "float_jitter",  # 7.0 instead of 7
        "string_jitter",  # "7"
        "bool_jitter",  # true
        "big_jitter",  # 100000 days
        "item_jitter_mismatch",  # an item's jitter differs from its patient's
        "wrong_patient",  # the first patient's id is changed (an answer for someone else)
        "drop_patient",  # the last patient is left out
        "bad_custom_fields",  # custom_fields is a number
    }
)

TOKEN_FAILURE_MODES = frozenset({"500", "400", "no_access_token"})


def _digest(id_source: str, value: str) -> bytes:
    return hashlib.sha256(f"{id_source}\x00{value}".encode()).digest()


def suid_for(id_source: str, value: str, prefix: str = "S") -> str:
    """The pseudonym the server gives ``value``; 11 characters so it fits DICOM SH as well as LO."""
    return prefix + _digest(id_source, value).hex()[:10].upper()


def jitter_for(id_source: str, value: str) -> int:
    """A day shift in DASHER's range [-33, -3] ∪ [3, 33], never 0."""
    n = _digest(id_source, value)[-1]
    magnitude = 3 + n % 31
    return -magnitude if n & 0x80 else magnitude


def _shift(timestamp: Any, days: int) -> str | None:
    if not isinstance(timestamp, str):
        return None
    try:
        return (datetime.fromisoformat(timestamp) + timedelta(days=days)).isoformat()
    except ValueError:
        return None


@dataclass
class RecordedRequest:
    """What the server saw: path, headers (lower-case names) and the parsed body."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def bearer(self) -> str:
        value = self.headers.get("authorization", "")
        return value[len("Bearer ") :] if value.startswith("Bearer ") else ""


@dataclass
class DasherServer:
    """State and behaviour of the fake service; start() binds 127.0.0.1 on a free port."""

    study: str = "test-study"
    initial_token: str = "initial-token-abc"
    client_id: str = "sendit-client"
    client_secret: str = "client-secret-xyz"
    refresh_token: str = "refresh-token-1"
    stall_seconds: float = 2.0
    # Custom fields per patient: name -> value template ({suid} is replaced). DASHER's list form.
    custom_fields: dict[str, str] = field(default_factory=lambda: {"site": "SITE-{suid}", "arm": "B"})
    issue_valid_tokens: bool = True
    # Called with each identifier request before it is answered (e.g. to rotate a token file).
    on_uid_request: Callable[[RecordedRequest], object] | None = None
    accepted_tokens: set[str] = field(default_factory=set)
    requests: list[RecordedRequest] = field(default_factory=list)
    token_requests: list[RecordedRequest] = field(default_factory=list)
    _failures: list[str] = field(default_factory=list)
    _always: str | None = None
    _token_failures: list[str] = field(default_factory=list)
    _issued: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def fail(self, mode: str, times: int = 1) -> None:
        """Misbehave in ``mode`` for the next ``times`` identifier requests, then answer normally."""
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r}")
        with self._lock:
            self._failures.extend([mode] * times)

    def fail_always(self, mode: str | None) -> None:
        if mode is not None and mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r}")
        with self._lock:
            self._always = mode

    def fail_token(self, mode: str, times: int = 1) -> None:
        if mode not in TOKEN_FAILURE_MODES:
            raise ValueError(f"unknown token failure mode {mode!r}")
        with self._lock:
            self._token_failures.extend([mode] * times)

    def revoke_tokens(self) -> None:
        """Every token presented so far is refused from now on (a 401), until a new one is issued."""
        with self._lock:
            self.accepted_tokens.clear()

    def start(self) -> DasherServer:
        self.accepted_tokens.add(self.initial_token)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        httpd.daemon_threads = True
        httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes stalled handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- behaviour -------------------------------------------------------------------------------

    def _next_failure(self) -> str | None:
        with self._lock:
            if self._failures:
                return self._failures.pop(0)
            return self._always

    def answer(self, body: Any, mode: str | None) -> dict[str, Any]:
        """The response DASHER would give for ``body``, bent by ``mode``."""
        results: list[dict[str, Any]] = []
        for identifier in body.get("identifiers", []):
            pid, source = identifier["id"], identifier["id_source"]
            jitter = jitter_for(source, pid)
            suid = suid_for(source, pid)
            result: dict[str, Any] = {
                "id": pid,
                "id_source": source,
                "suid": suid,
                "jitter": jitter,
                "jittered_timestamp": _shift(identifier.get("id_timestamp"), jitter),
                "custom_fields": [
                    {"key": k, "value": v.replace("{suid}", suid)} for k, v in self.custom_fields.items()
                ],
                "items": [
                    {
                        "id": item["id"],
                        "id_source": item["id_source"],
                        "suid": suid_for(item["id_source"], item["id"], prefix="A"),
                        "jitter": jitter,
                        "jittered_timestamp": _shift(item.get("id_timestamp"), jitter),
                    }
                    for item in identifier.get("items", [])
                ],
            }
            results.append(result)
        first = results[0] if results else {}
        first_item = first["items"][0] if first.get("items") else {}
        if mode == "drop_item" and first.get("items"):
            first["items"].pop()
        elif mode == "extra_item" and first:
            first["items"].append({"id": "UNASKED", "id_source": "other", "suid": "AX", "jitter": first["jitter"]})
        elif mode == "empty_suid" and first:
            first["suid"] = ""
        elif mode == "empty_item_suid" and first_item:
            first_item["suid"] = ""
        elif mode == "echo_id" and first:
            first["suid"] = first["id"]
        elif mode == "zero_jitter" and first:
            first["jitter"] = 0
            for item in first["items"]:
                item["jitter"] = 0
        elif mode == "float_jitter" and first:
            first["jitter"] = float(first["jitter"])
        elif mode == "string_jitter" and first:
            first["jitter"] = str(first["jitter"])
        elif mode == "bool_jitter" and first:
            first["jitter"] = True
        elif mode == "big_jitter" and first:
            first["jitter"] = 100000
        elif mode == "item_jitter_mismatch" and first_item:
            first_item["jitter"] = first["jitter"] + 1
        elif mode == "wrong_patient" and first:
            first["id"] = first["id"] + "9"
        elif mode == "drop_patient" and results:
            results.pop()
        elif mode == "bad_custom_fields" and first:
            first["custom_fields"] = 42
        return {"results": results}

    def issue_token(self) -> str:
        with self._lock:
            self._issued += 1
            token = f"issued-token-{self._issued}"
            if self.issue_valid_tokens:
                self.accepted_tokens.add(token)
            return token


def _make_handler(server: DasherServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            return

        def _send(
            self,
            status: int,
            payload: bytes,
            content_type: str = "application/json",
            extra: dict[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, status: int, data: Any, extra: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), extra=extra)

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.path == "/token":
                self._token(raw, headers)
            elif self.path.startswith("/uid/"):
                self._uid(raw, headers)
            else:
                self._json(404, {"error": "not found"})

        def _token(self, raw: bytes, headers: dict[str, str]) -> None:
            form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
            server.token_requests.append(RecordedRequest("POST", self.path, headers, form))
            with server._lock:
                mode = server._token_failures.pop(0) if server._token_failures else None
            if mode == "500":
                return self._send(500, b"token service down", "text/plain")
            if mode == "400":
                return self._json(400, {"error": "invalid_grant"})
            basic = "Basic " + base64.b64encode(f"{server.client_id}:{server.client_secret}".encode()).decode()
            grant = form.get("grant_type")
            if grant == "client_credentials" and headers.get("authorization") != basic:
                return self._json(401, {"error": "invalid_client"})
            if grant == "refresh_token" and form.get("refresh_token") != server.refresh_token:
                return self._json(400, {"error": "invalid_grant"})
            if grant not in ("client_credentials", "refresh_token"):
                return self._json(400, {"error": "unsupported_grant_type"})
            payload: dict[str, Any] = {"token_type": "Bearer", "expires_in": 3600}
            if mode != "no_access_token":
                payload["access_token"] = server.issue_token()
            if grant == "refresh_token":
                server.refresh_token = f"refresh-token-{server._issued + 1}"  # rotate, as many services do
                payload["refresh_token"] = server.refresh_token
            self._json(200, payload)

        def _uid(self, raw: bytes, headers: dict[str, str]) -> None:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            recorded = RecordedRequest("POST", self.path, headers, body)
            server.requests.append(recorded)
            if server.on_uid_request is not None:
                server.on_uid_request(recorded)
            if self.path != f"/uid/{server.study}":
                return self._json(404, {"error": "unknown study"})
            token = headers.get("authorization", "").removeprefix("Bearer ")
            if token not in server.accepted_tokens:  # refused before any scripted failure is used up
                return self._json(401, {"error": "invalid token"})
            mode = server._next_failure()
            if mode == "stall":
                if server._stop.wait(server.stall_seconds):
                    return
                mode = None
            if mode == "401":
                return self._json(401, {"error": "invalid token"})
            if mode == "500":
                return self._send(500, b"<html>Internal Server Error</html>", "text/html")
            if mode == "503":
                return self._send(503, b"busy", "text/plain", {"Retry-After": "1"})
            if mode == "400":
                return self._json(400, {"error": "bad request", "echo": body})
            if not isinstance(body, dict) or not isinstance(body.get("identifiers"), list):
                return self._json(400, {"error": "identifiers missing"})
            if mode == "malformed":
                return self._send(200, b'{"results": [{"id": ', "application/json")
            if mode == "not_object":
                return self._json(200, [])
            self._json(200, server.answer(body, mode))

    return Handler


@pytest.fixture
def dasher_server() -> Iterator[DasherServer]:
    """A started DasherServer on 127.0.0.1; stopped (stalled answers cut short) after the test."""
    server = DasherServer().start()
    try:
        yield server
    finally:
        server.stop()
