"""The C-STORE listener of `sendit run`: what a sender sees, and what Sendit keeps.

Each test starts its own `sendit run` (SQLite, its own data folder, loopback ports) in a session of
its own and stops it by that session's process group. Senders are DCMTK's `storescu` (Debian) and
pynetdicom. What Sendit recorded is read from its SQLite database directly, independently of its code.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.orthanc import OrthancServer, dataset_part, write_ct

pytestmark = pytest.mark.slow  # starts `sendit run` processes

STORESCU = "/usr/bin/storescu"  # DCMTK's, not pynetdicom's app of the same name in .venv/bin
SECRET = "listener-test-secret-key-0123456789abcdef"
NOT_KEPT = 0xA700


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll (bounded in time) until ``condition()`` is truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Run:
    """A `sendit run` of one test: its folder, ports and database."""

    def __init__(self, folder: Path, settings: dict[str, str], port: int = 0, check_echo: bool = True) -> None:
        self.folder = folder
        self.check_echo = check_echo
        self.port = port or _free_port()
        self.web_port = _free_port()
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.data = folder / "data"
        self.input = Path(settings.get("INPUT_FOLDER", self.data / "input"))

    def write_config(self) -> None:
        lines = [f'SECRET_KEY = "{SECRET}"', 'DATA_DIR = "data"', "WORKERS = 1", "RETRY_BASE_SECONDS = 0"]
        lines += [f"LISTEN_PORT = {self.port}", 'LISTEN_HOST = "127.0.0.1"', f"WEB_PORT = {self.web_port}"]
        lines += [f'{key} = "{value}"' for key, value in self.settings.items()]
        (self.folder / "sendit.toml").write_text("\n".join(lines) + "\n")

    def start(self) -> Run:
        self.write_config()
        ready = self.echo if self.check_echo else self.listening
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDIT_", "DJANGO_")) and k != "DATABASE_URL"}
        env["SENDIT_CONFIG"] = str(self.folder / "sendit.toml")
        with (self.folder / "run.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sendit", "run"],
                cwd=self.folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: ready() or self.process is None or self.process.poll() is not None, 60, "the listener")
        assert self.process.poll() is None, self.log()
        return self

    def listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def echo(self) -> bool:
        caller = self.settings.get("ALLOWED_CALLERS", "PYSENDER").split(",")[0].split("@")[0].strip()
        ae = AE(ae_title=caller)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="SENDIT")
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0

    def kill(self) -> None:
        """SIGKILL to the run and everything it started (its own process group): a crash."""
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=40)
        self.kill()  # whatever is left of its group

    def log(self) -> str:
        return (self.folder / "run.log").read_text(errors="replace")

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.data / "sendit.sqlite3", timeout=30) as db:
            return list(db.execute(sql, args))

    def images(self) -> dict[str, tuple[str, str]]:
        """SOPInstanceUID → (status, path) of every recorded image."""
        return {
            uid: (status, path)
            for uid, status, path in self.query("select sop_instance_uid, status, path from relay_image")
        }

    def received_files(self) -> list[str]:
        folder = self.input / ".sendit-received" / socket.gethostname()
        return sorted(os.listdir(folder)) if folder.is_dir() else []


@pytest.fixture
def sendit_listener(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def make(folder: Path | None = None, port: int = 0, check_echo: bool = True, **settings: Any) -> Run:
        run = Run(folder or tmp_path, {k: str(v) for k, v in settings.items()}, port, check_echo)
        runs.append(run)
        return run.start()

    yield make
    for run in runs:
        run.stop()


def ct_series(folder: Path, n: int, size: int = 64) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    return [write_ct(folder / f"{k:03d}.dcm", series_uid=series_uid, size=size) for k in range(n)]


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Sender:
    """A pynetdicom sender with one association; ``statuses`` holds each answer (None: no answer)."""

    def __init__(self, port: int, aet: str = "PYSENDER", bind: str = "", timeout: float = 30) -> None:
        ae = AE(ae_title=aet)
        ae.dimse_timeout = ae.network_timeout = timeout
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="SENDIT", bind_address=(bind, 0) if bind else None)
        self.statuses: list[int | None] = []

    def send(self, files: list[Path]) -> list[int | None]:
        for path in files:
            try:
                answer = self.assoc.send_c_store(path)
                self.statuses.append(int(answer.Status) if answer and "Status" in answer else None)
            except (RuntimeError, OSError):
                self.statuses.append(None)
        return self.statuses

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def send(port: int, files: list[Path], aet: str = "PYSENDER") -> list[int | None]:
    sender = Sender(port, aet)
    assert sender.assoc.is_established
    try:
        return sender.send(files)
    finally:
        sender.release()


def _require_storescu() -> None:
    if not os.access(STORESCU, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail("DCMTK's storescu is not installed (apt-get install dcmtk)")
        pytest.skip("DCMTK's storescu is not installed")


# -- a series arrives and goes DONE -----------------------------------------------------------------


def test_storescu_series_waits_out_the_idle_time_then_goes_done_at_orthanc(
    tmp_path: Path, sendit_listener: Callable[..., Run], orthanc_factory: Callable[..., OrthancServer]
) -> None:
    _require_storescu()
    orthanc = orthanc_factory()
    run = sendit_listener(
        ALLOWED_CALLERS="STORESCU",
        SERIES_IDLE_SECONDS=4,
        SEND_TO_ORTHANC="true",
        ORTHANC_PORT=orthanc.dicom_port,
        OUTPUT_FOLDER="off",
    )
    files = ct_series(tmp_path / "series", 6)
    env = dict(os.environ, TCP_NODELAY="1")
    out = subprocess.run(
        [STORESCU, "-aet", "STORESCU", "-aec", "SENDIT", "127.0.0.1", str(run.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    # every instance answered Success is recorded already, and still waits for the rest of its series
    images = run.images()
    assert set(images) == {sop_uid(f) for f in files}
    assert {status for status, _ in images.values()} == {"NEW"}
    assert orthanc.count_instances() == 0
    wait_for(lambda: {s for s, _ in run.images().values()} == {"DONE"}, 90, "the series to go DONE")
    assert orthanc.count_instances() == 6
    assert run.received_files() == []  # originals cleaned up after DONE


def test_pynetdicom_sender_echo_store_duplicate_and_conflict(
    tmp_path: Path, sendit_listener: Callable[..., Run]
) -> None:
    """As for the folder: the same instance again while in flight is SKIPPED, different bytes under the
    same SOPInstanceUID are a conflict, quarantined; the sender gets Success for each (Sendit kept it)."""
    run = sendit_listener(ALLOWED_CALLERS="PYSENDER", SERIES_IDLE_SECONDS=3600)
    assert run.echo()
    files = ct_series(tmp_path / "series", 3)
    assert send(run.port, files) == [0, 0, 0]
    assert send(run.port, files[:1]) == [0]  # a re-send while the first is in flight
    changed = write_ct(tmp_path / "changed.dcm", series_uid=generate_uid(), sop_uid=sop_uid(files[1]))
    assert send(run.port, [changed]) == [0]
    images = run.images()
    assert len(images) == 3 and {s for s, _ in images.values()} == {"NEW"}  # the series waits: idle 1 h
    outcomes = sorted(run.query("select status, reason from relay_receivedfile"))
    assert [status for status, _ in outcomes] == ["QUARANTINED", "SKIPPED"]
    assert "conflict" in outcomes[0][1] and "duplicate" in outcomes[1][1]
    # what was answered Success is on disk byte for byte (the data set as sent)
    for path in files:
        _, stored = images[sop_uid(path)]
        assert dataset_part((run.input / stored).read_bytes()) == dataset_part(path.read_bytes())


# -- who may call ----------------------------------------------------------------------------------


def test_an_unknown_caller_is_rejected_at_association(sendit_listener: Callable[..., Run]) -> None:
    run = sendit_listener(ALLOWED_CALLERS="PYSENDER, HOSTED@127.0.0.2")
    stranger = Sender(run.port, aet="INTRUDER")
    assert stranger.assoc.is_rejected
    assert stranger.assoc.acceptor.primitive.diagnostic == 0x03  # calling AE title not recognised
    # an AE title allowed from one host only is refused from another, and accepted from its own
    assert Sender(run.port, aet="HOSTED", bind="127.0.0.1").assoc.is_rejected
    hosted = Sender(run.port, aet="HOSTED", bind="127.0.0.2")
    assert hosted.assoc.is_established
    hosted.release()
    assert "rejected: not in ALLOWED_CALLERS" in run.log()
    assert run.images() == {}


# -- failures: nothing lost ------------------------------------------------------------------------


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or not shutil.which("mount"):
        if os.environ.get("CI") == "true":
            pytest.fail("mounting a tmpfs needs root")
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def test_disk_full_answers_out_of_resources_loses_nothing_and_a_retry_succeeds(
    tmp_path: Path, sendit_listener: Callable[..., Run]
) -> None:
    files = ct_series(tmp_path / "series", 10, size=512)  # ~0.5 MB each; 3 MB hold about five
    with small_tmpfs(tmp_path / "input", "3m") as input_folder:
        run = sendit_listener(ALLOWED_CALLERS="PYSENDER", SERIES_IDLE_SECONDS=3600, INPUT_FOLDER=input_folder)
        statuses = send(run.port, files)
        kept = [f for f, s in zip(files, statuses, strict=True) if s == 0]
        refused = [f for f, s in zip(files, statuses, strict=True) if s != 0]
        assert kept and refused, statuses
        assert {s for s in statuses if s != 0} == {NOT_KEPT}
        # what was answered Success is recorded and whole; nothing of the refused ones is left behind
        images = run.images()
        assert set(images) == {sop_uid(f) for f in kept}
        assert len(run.received_files()) == len(kept)
        assert not any(name.endswith(".part") for name in run.received_files())
        assert "disk full" in run.log()
        # room again: the sender's retry of what was refused succeeds, and every instance is there once
        subprocess.run(["mount", "-o", "remount,size=64m", str(input_folder)], check=True, timeout=30)
        assert send(run.port, refused) == [0] * len(refused)
        images = run.images()
        assert set(images) == {sop_uid(f) for f in files}
        for path in files:
            _, stored = images[sop_uid(path)]
            assert dataset_part((input_folder / stored).read_bytes()) == dataset_part(path.read_bytes())
        run.stop()


def test_a_listener_killed_mid_association_leaves_nothing_half_written(
    tmp_path: Path, sendit_listener: Callable[..., Run]
) -> None:
    """kill -9 of `sendit run` while a sender is sending: every instance answered Success is recorded
    and whole, the sender sees failure for the rest, and after a restart the sender's re-send of what
    failed completes the series: each instance recorded once, nothing partial anywhere."""
    files = ct_series(tmp_path / "series", 40, size=512)
    run = sendit_listener(ALLOWED_CALLERS="PYSENDER", SERIES_IDLE_SECONDS=3600)
    sender = Sender(run.port, timeout=5)  # the killed listener: a failure in seconds, not 30
    assert sender.assoc.is_established
    worker = threading.Thread(target=sender.send, args=(files,))
    worker.start()
    wait_for(lambda: sender.statuses.count(0) >= 5, 60, "five instances stored")
    run.kill()
    worker.join(timeout=120)
    assert not worker.is_alive()
    acknowledged = [f for f, s in zip(files, sender.statuses, strict=False) if s == 0]
    failed = [f for f in files if f not in acknowledged]
    assert failed, "the kill came after the last instance; nothing was cut"
    assert all(s is None for s in sender.statuses[len(acknowledged) :])  # no Success for what was not kept
    images = run.images()
    assert {sop_uid(f) for f in acknowledged} <= set(images)
    by_uid = {sop_uid(f): f for f in files}
    for uid, (status, stored) in images.items():  # whatever is recorded is whole
        assert status == "NEW"
        assert dataset_part((run.input / stored).read_bytes()) == dataset_part(by_uid[uid].read_bytes())
    # the restarted listener clears partial files and records complete ones the kill left unrecorded
    run.start()
    assert not any(name.endswith(".part") for name in run.received_files())
    assert sorted(p for _, (_, p) in run.images().items()) == sorted(
        f".sendit-received/{socket.gethostname()}/{name}" for name in run.received_files()
    )
    assert send(run.port, failed) == [0] * len(failed)
    images = run.images()
    assert set(images) == set(by_uid)
    assert {status for status, _ in images.values()} == {"NEW"}


# -- storage commitment ----------------------------------------------------------------------------


def test_storage_commitment_against_orthanc_confirms_a_series(
    tmp_path: Path, sendit_listener: Callable[..., Run], orthanc_factory: Callable[..., OrthancServer]
) -> None:
    """Orthanc (1.6+) answers N-ACTION and sends its N-EVENT-REPORT to Sendit's listener. This Orthanc
    refuses C-FIND from Sendit, so the series can only be verified, and go DONE, by the commitment."""
    _require_storescu()
    port = _free_port()
    sendit = {"AET": "SENDIT", "Host": "127.0.0.1", "Port": port, "AllowFind": False, "AllowStorageCommitment": True}
    modalities = {"sendit": sendit, "storescu": ["STORESCU", "127.0.0.1", 104]}
    orthanc = orthanc_factory(extra_config={"DicomModalities": modalities})
    run = sendit_listener(
        port=port,
        ALLOWED_CALLERS="STORESCU, ORTHANC@127.0.0.1",
        SERIES_IDLE_SECONDS=2,
        SEND_TO_ORTHANC="true",
        ORTHANC_PORT=orthanc.dicom_port,
        OUTPUT_FOLDER="off",
        STORAGE_COMMITMENT="true",
        STORAGE_COMMITMENT_SECONDS=30,
    )
    files = ct_series(tmp_path / "series", 4)
    out = subprocess.run(
        [STORESCU, "-aet", "STORESCU", "-aec", "SENDIT", "127.0.0.1", str(run.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    wait_for(lambda: {s for s, _ in run.images().values()} == {"DONE"}, 120, "the series to go DONE\n" + run.log())
    assert orthanc.count_instances() == 4
    assert "storage commitment report: 4 committed, 0 failed" in run.log()
    assert run.query("select count(*) from relay_commitmentreport") == [(0,)]  # read and dropped


# -- TLS -------------------------------------------------------------------------------------------


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if not shutil.which("openssl"):
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is not installed")
        pytest.skip("openssl is not installed")
    folder.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
    )
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (folder / f"{name}.ext").write_text(extra + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_with_client_certificates(tmp_path: Path, sendit_listener: Callable[..., Run]) -> None:
    """LISTEN_TLS_*: a caller with a certificate from LISTEN_TLS_CA stores over TLS; one without
    cannot even associate."""
    import ssl

    certs = _certificates(tmp_path / "certs")
    run = sendit_listener(
        ALLOWED_CALLERS="PYSENDER",
        SERIES_IDLE_SECONDS=3600,
        LISTEN_TLS_CERT=certs["server.pem"],
        LISTEN_TLS_KEY=certs["server.key"],
        LISTEN_TLS_CA=certs["ca.pem"],
        check_echo=False,
    )

    def sender(with_certificate: bool) -> Any:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["ca.pem"]))
        if with_certificate:
            context.load_cert_chain(str(certs["client.pem"]), str(certs["client.key"]))
        ae = AE(ae_title="PYSENDER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        return ae.associate("127.0.0.1", run.port, ae_title="SENDIT", tls_args=(context, "127.0.0.1"))

    files = ct_series(tmp_path / "series", 2)
    assoc = sender(with_certificate=True)
    assert assoc.is_established
    assert [int(assoc.send_c_store(path).Status) for path in files] == [0, 0]
    assoc.release()
    assert set(run.images()) == {sop_uid(f) for f in files}
    assert not sender(with_certificate=False).is_established
