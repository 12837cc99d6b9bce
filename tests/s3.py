"""An S3 server on loopback for the storage tests: moto's server, a stand-in for a real S3 store.

MinIO is not installable on these machines; moto speaks the S3 HTTP API (create-only
``If-None-Match`` writes included) and keeps its objects in memory. Its S3 service alone
(tests/moto_s3.py: what ``moto_server`` runs for S3, without the other AWS services' dispatch) is
started as a subprocess on a free loopback port and stopped by its PID. Between Sendit and moto
sits a :class:`Gate`, a plain TCP relay on its own port: closing it makes the bucket unreachable
(connections refused, open ones cut) while moto keeps every object, and opening it again on the
same port brings the bucket back.

The fixtures (``s3_server`` for the session, ``s3_bucket`` per test) are registered in
tests/conftest.py, for the storage tests and the multi-host tests alike.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY_ID = "stand-in-key"
SECRET_ACCESS_KEY = "stand-in-secret-not-a-real-one"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def moto_installed() -> bool:
    """moto with its server part (``moto[server]``: Flask, werkzeug), as the [dev] extra installs it."""
    return all(importlib.util.find_spec(name) is not None for name in ("moto", "flask", "werkzeug"))


@dataclass
class MotoServer:
    """A stand-in S3 server: ``python tests/moto_s3.py 127.0.0.1 PORT``, started and stopped by PID."""

    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoServer:
        if not moto_installed():
            raise RuntimeError("moto's server is not installed: pip install 'moto[server]' (the [dev] extra)")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("moto_s3.py")), "127.0.0.1", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded: until it answers or the time is up
            if self.process.poll() is not None:
                raise RuntimeError(f"the moto S3 server exited with {self.process.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the moto S3 server did not listen within {timeout:g} s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM to the PID we started, SIGKILL if it lingers; never by name."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def client(self, endpoint: str | None = None) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )


class Gate:
    """A TCP relay on loopback in front of a server; ``close()`` cuts it off, ``open()`` brings it back
    on the same port. Threads only: every connection is two copying threads, ended when it closes."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> Gate:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="s3-gate", daemon=True).start()
        return self

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            open_sockets, self._sockets = self._sockets, set()
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@dataclass
class Bucket:
    """One test's bucket on the stand-in server, reached through its own gate (or straight, without)."""

    server: MotoServer
    gate: Gate | None
    name: str
    prefix: str = "sendit"

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}"

    @property
    def settings(self) -> dict[str, str]:
        """The Sendit configuration values that point at this bucket (through the gate)."""
        return {
            "STORAGE_URL": self.url,
            "S3_ENDPOINT_URL": self.gate.endpoint if self.gate is not None else self.server.endpoint,
            "S3_REGION": REGION,
            "S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }

    @property
    def env(self) -> dict[str, str]:
        """The same as ``SENDIT_*`` variables, for `sendit` child processes (the multi-host tests)."""
        return {f"SENDIT_{key}": value for key, value in self.settings.items()}

    def keys(self, under: str = "") -> list[str]:
        """Every key below ``prefix/under``, read straight from the server (not through the gate)."""
        client = self.server.client()
        found: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=f"{self.prefix}/{under}"):
            found.extend(item["Key"][len(self.prefix) + 1 :] for item in page.get("Contents", []))
        return sorted(found)

    def read(self, key: str) -> bytes:
        body: bytes = self.server.client().get_object(Bucket=self.name, Key=f"{self.prefix}/{key}")["Body"].read()
        return body

    def write(self, key: str, data: bytes) -> None:
        self.server.client().put_object(Bucket=self.name, Key=f"{self.prefix}/{key}", Body=data)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One stand-in S3 server (moto) for the session; each test gets its own bucket."""
    if not moto_installed() and os.environ.get("CI") != "true":
        pytest.skip("moto's server is not installed (pip install -e '.[dev]')")
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoServer) -> Iterator[Bucket]:
    """A fresh bucket on the stand-in server, behind a gate of its own (open)."""
    name = f"sendit-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    gate = Gate(s3_server.port).open()
    try:
        yield Bucket(s3_server, gate, name)
    finally:
        gate.close()
