"""One image a destination chokes on fails alone; its siblings are delivered (issue 9, item 6).

The real case: Orthanc's DICOM parser stalls on a file of odd length ("DIMSE: Odd Fragment Length")
and never answers its C-STORE. Before, the association was reopened and the same image sent again
until the reconnects ran out, and every image after it failed too: 13 valid images of a series went
to ERROR with the bad one. Now the stalled image gets a retryable result naming it, the rest are
sent on a fresh association, and only a failure of the whole destination raises DestinationError.

The stalling peer here is the real Orthanc (the shared ``orthanc_server``). Peers that abort on one
image, or fail everything, are stand-ins: small pynetdicom storage SCPs and a small HTTP server on
loopback that behave as told for given SOPInstanceUIDs. Timeouts are set small so each test takes a
few seconds; nothing here measures time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, StoragePresentationContexts, VerificationPresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE

from sendit.destinations import DestinationError, OutgoingImage
from sendit.destinations.base import SendResult
from sendit.destinations.dicom import DicomDestination
from sendit.destinations.orthanc_rest import OrthancRestDestination
from tests.orthanc import OrthancServer, findscu_sop_uids, make_series

DIMSE_TIMEOUT = 2.0  # the stalled image costs this long, once


def choke(image: OutgoingImage) -> None:
    """Make ``image`` a file Orthanc's C-STORE SCP stalls on: Rows (0028,0010) with a 3-byte value,
    so the data set has an odd length (what the writer used to let through)."""
    data = image.path.read_bytes()
    at = data.index(b"\x28\x00\x10\x00US\x02\x00")
    image.path.write_bytes(data[: at + 6] + b"\x03\x00" + data[at + 8 : at + 10] + b"\x00" + data[at + 10 :])


def assert_phi_free(result: SendResult, image: OutgoingImage) -> None:
    assert image.sop_instance_uid not in result.message
    assert str(image.path) not in result.message and image.path.name not in result.message


def dicom_to(host: str, port: int, aet: str, **kwargs: Any) -> DicomDestination:
    options: dict[str, Any] = {"called_aet": aet, "connect_timeout": 5, "acse_timeout": 5}
    options |= {"dimse_timeout": DIMSE_TIMEOUT, "network_timeout": 10}
    return DicomDestination(host, port, **(options | kwargs))


# -- a real Orthanc that stalls on one image ----------------------------------------------------


@pytest.mark.orthanc
def test_orthanc_stalling_on_one_image_fails_only_that_image(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    images = make_series(tmp_path, 14)
    bad = images[6]
    choke(bad)
    dest = dicom_to(orthanc_server.host, orthanc_server.dicom_port, orthanc_server.aet)

    results = dest.send(images)

    assert [r.image_id for r in results] == [i.image_id for i in images]
    assert sum(r.delivered for r in results) == 13
    failed = results[6]
    assert (failed.delivered, failed.permanent, failed.destination_fault) == (False, False, False)
    assert failed.message.startswith(f"image {bad.image_id}: ")
    assert "no answer within" in failed.message
    assert_phi_free(failed, bad)
    good = {i.sop_instance_uid for i in images if i is not bad}
    assert findscu_sop_uids(orthanc_server, bad.series_uid) == good


@pytest.mark.orthanc
def test_several_bad_images_in_a_row_are_theirs_while_orthanc_answers_echo(
    orthanc_server: OrthancServer, tmp_path: Path
) -> None:
    """Three lost images in a row look like a dead peer; a C-ECHO says Orthanc is fine, so they are
    the images' own failures and the batch goes on."""
    images = make_series(tmp_path, 6)
    for bad in images[1:4]:
        choke(bad)
    dest = dicom_to(orthanc_server.host, orthanc_server.dicom_port, orthanc_server.aet)

    results = dest.send(images)

    assert [r.delivered for r in results] == [True, False, False, False, True, True]
    assert not any(r.permanent or r.destination_fault for r in results)
    assert findscu_sop_uids(orthanc_server, images[0].series_uid) == {images[k].sop_instance_uid for k in (0, 4, 5)}


# -- stand-in DICOM peers -------------------------------------------------------------------------


class AbortingSCP:
    """A stand-in storage SCP: aborts the association whenever an image in ``abort`` arrives,
    answers Success otherwise; answers C-ECHO only when ``echo``."""

    def __init__(self, *, echo: bool) -> None:
        self.abort: set[str] = set()
        self.received: list[str] = []
        self.ae = AE("STANDIN")
        contexts = list(StoragePresentationContexts) + (list(VerificationPresentationContexts) if echo else [])
        self.ae.supported_contexts = contexts
        server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        self.server = server
        self.port = int(server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)
        uid = str(request.AffectedSOPInstanceUID)
        if uid in self.abort:
            event.assoc.abort()
            return 0xA700
        self.received.append(uid)
        return 0x0000


@pytest.fixture
def aborting_scp() -> Iterator[AbortingSCP]:
    scp = AbortingSCP(echo=True)
    yield scp
    scp.server.shutdown()


@pytest.fixture
def dead_scp() -> Iterator[AbortingSCP]:
    """A stand-in that takes associations but fails every image it is told to and cannot echo."""
    scp = AbortingSCP(echo=False)
    yield scp
    scp.server.shutdown()


def test_peer_aborting_on_one_image_fails_only_that_image(aborting_scp: AbortingSCP, tmp_path: Path) -> None:
    images = make_series(tmp_path, 14)
    bad = images[3]
    aborting_scp.abort = {bad.sop_instance_uid}

    results = dicom_to("127.0.0.1", aborting_scp.port, "STANDIN").send(images)

    assert [r.delivered for r in results] == [i is not bad for i in images]
    failed = results[3]
    assert (failed.permanent, failed.destination_fault) == (False, False)
    assert failed.message.startswith(f"image {bad.image_id}: association lost")
    assert_phi_free(failed, bad)
    assert sorted(aborting_scp.received) == sorted(i.sop_instance_uid for i in images if i is not bad)


def test_peer_failing_every_image_fails_the_batch(dead_scp: AbortingSCP, tmp_path: Path) -> None:
    images = make_series(tmp_path, 6)
    dead_scp.abort = {i.sop_instance_uid for i in images}

    with pytest.raises(DestinationError) as info:
        dicom_to("127.0.0.1", dead_scp.port, "STANDIN").send(images)

    assert info.value.retryable
    assert "3 images in a row" in str(info.value)
    assert not any(i.sop_instance_uid in str(info.value) for i in images)


def test_peer_dying_mid_batch_leaves_the_rest_unblamed(dead_scp: AbortingSCP, tmp_path: Path) -> None:
    """Delivered images keep their result; those lost when the peer died are not counted against."""
    images = make_series(tmp_path, 10)
    dead_scp.abort = {i.sop_instance_uid for i in images[4:]}

    results = dicom_to("127.0.0.1", dead_scp.port, "STANDIN").send(images)

    assert [r.delivered for r in results] == [True] * 4 + [False] * 6
    assert all(r.destination_fault and not r.permanent for r in results[4:])


# -- a stand-in Orthanc REST API -------------------------------------------------------------------


class StandInOrthanc(ThreadingHTTPServer):
    """Answers ``POST /instances`` with Success, except: an upload carrying a UID in ``stall`` (or
    any, with ``stall_all``) gets no answer until the test ends; one carrying a UID in ``garbled``
    gets a body that claims gzip and is not. ``GET /system`` stalls when ``system_stalls``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.stall: set[bytes] = set()
        self.garbled: set[bytes] = set()
        self.stall_all = False
        self.system_stalls = False
        self.stored: list[bytes] = []
        self.release = threading.Event()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: StandInOrthanc

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _answer(self, body: bytes, *, gzipped: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.server.system_stalls:
            self.server.release.wait(30)
            return
        self._answer(json.dumps({"Version": "stand-in"}).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.server.stall_all or any(uid in body for uid in self.server.stall):
            self.server.release.wait(30)
            return
        if any(uid in body for uid in self.server.garbled):
            self._answer(b"this is not gzip", gzipped=True)
            return
        with self.server.lock:
            self.server.stored.append(body)
        self._answer(json.dumps({"Status": "Success", "ID": "x"}).encode())


@pytest.fixture
def standin_orthanc() -> Iterator[StandInOrthanc]:
    server = StandInOrthanc()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


def rest_to(server: StandInOrthanc) -> OrthancRestDestination:
    return OrthancRestDestination(server.url, timeout=DIMSE_TIMEOUT, connect_timeout=2, concurrency=3)


def test_rest_upload_stalling_on_one_image_fails_only_that_image(
    standin_orthanc: StandInOrthanc, tmp_path: Path
) -> None:
    images = make_series(tmp_path, 14)
    bad = images[5]
    standin_orthanc.stall = {bad.sop_instance_uid.encode()}
    dest = rest_to(standin_orthanc)
    try:
        results = dest.send(images)
    finally:
        standin_orthanc.release.set()
        dest.close()

    assert [r.delivered for r in results] == [i is not bad for i in images]
    failed = results[5]
    assert (failed.permanent, failed.destination_fault) == (False, False)
    assert failed.message.startswith(f"image {bad.image_id}: timed out")
    assert_phi_free(failed, bad)
    assert len(standin_orthanc.stored) == 13


def test_rest_unexpected_error_on_one_image_fails_only_that_image(
    standin_orthanc: StandInOrthanc, tmp_path: Path
) -> None:
    images = make_series(tmp_path, 6)
    bad = images[2]
    standin_orthanc.garbled = {bad.sop_instance_uid.encode()}
    dest = rest_to(standin_orthanc)
    try:
        results = dest.send(images)
    finally:
        dest.close()

    assert [r.delivered for r in results] == [i is not bad for i in images]
    assert results[2].message.startswith(f"image {bad.image_id}: ")
    assert not results[2].permanent
    assert_phi_free(results[2], bad)


@pytest.mark.slow  # waits out a timeout per upload and the health check: seconds by design
def test_rest_orthanc_answering_nothing_fails_the_batch(standin_orthanc: StandInOrthanc, tmp_path: Path) -> None:
    images = make_series(tmp_path, 4)
    standin_orthanc.stall_all = True
    standin_orthanc.system_stalls = True
    dest = rest_to(standin_orthanc)
    try:
        with pytest.raises(DestinationError) as info:
            dest.send(images)
    finally:
        standin_orthanc.release.set()
        dest.close()

    assert info.value.retryable
    assert "no upload of the batch got an answer" in str(info.value)


def test_rest_images_orthanc_never_answers_are_theirs_while_it_is_up(
    standin_orthanc: StandInOrthanc, tmp_path: Path
) -> None:
    images = make_series(tmp_path, 3)
    standin_orthanc.stall_all = True  # but /system answers: Orthanc is up, these uploads are the problem
    dest = rest_to(standin_orthanc)
    try:
        results = dest.send(images)
    finally:
        standin_orthanc.release.set()
        dest.close()

    assert [(r.delivered, r.permanent, r.destination_fault) for r in results] == [(False, False, False)] * 3
