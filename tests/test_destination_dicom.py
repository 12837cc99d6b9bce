"""DicomDestination against a real Orthanc; arrival is checked with DCMTK's findscu and Orthanc's REST API.

Statuses Orthanc 1.10 never sends (warnings, 0xA9xx, 0xCxxx) and a peer abort mid-association are
provoked with a tiny pynetdicom storage SCP on loopback instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from pynetdicom.transport import AssociationSocket

from sendit.destinations import DestinationError, OutgoingImage
from sendit.destinations.dicom import DicomDestination
from sendit.destinations.dimse_status import StatusClass, classify, describe
from tests.orthanc import (
    OrthancServer,
    dataset_part,
    findscu_sop_uids,
    lua_error_on_modality,
    make_series,
    outgoing,
    restamp,
    write_ct,
)

pytestmark = pytest.mark.orthanc

UNKNOWN_SOP_CLASS = "1.2.826.0.1.3680043.8.498.999.1"


def dest_for(server: OrthancServer, **kwargs: Any) -> DicomDestination:
    options: dict[str, Any] = {"called_aet": server.aet, "connect_timeout": 5, "acse_timeout": 10}
    options |= {"dimse_timeout": 15, "network_timeout": 15}
    return DicomDestination(server.host, server.dicom_port, **(options | kwargs))


def stored(server: OrthancServer, image: OutgoingImage) -> bytes:
    ids = server.instances_in_series(image.series_uid)
    return server.stored_file(ids[image.sop_instance_uid])


# -- success, byte fidelity, TCP_NODELAY -----------------------------------------------------


def test_batch_is_delivered_and_stored_byte_for_byte(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    images = make_series(tmp_path, 3)
    results = dest_for(orthanc_server).send(images)

    assert [(r.image_id, r.delivered, r.status, r.message) for r in results] == [
        (i.image_id, True, 0x0000, "") for i in images
    ]
    assert findscu_sop_uids(orthanc_server, images[0].series_uid) == {i.sop_instance_uid for i in images}
    for image in images:
        assert dataset_part(stored(orthanc_server, image)) == dataset_part(image.path.read_bytes())


def test_resend_is_idempotent(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    images = make_series(tmp_path, 2)
    dest = dest_for(orthanc_server)
    assert all(r.delivered for r in dest.send(images))
    assert all(r.delivered and not r.message for r in dest.send(images))
    assert len(orthanc_server.instances_in_series(images[0].series_uid)) == 2


def test_our_socket_has_tcp_nodelay(
    orthanc_server: OrthancServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    original = AssociationSocket.send

    def spy(self: AssociationSocket, data: bytes) -> None:
        if self.socket is not None:
            seen.append(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        original(self, data)

    monkeypatch.setattr(AssociationSocket, "send", spy)
    assert all(r.delivered for r in dest_for(orthanc_server).send(make_series(tmp_path, 2)))
    assert seen and all(seen), f"TCP_NODELAY off on {seen.count(0)} of {len(seen)} sends"


# -- transfer syntaxes -----------------------------------------------------------------------


def test_compressed_images_are_sent_as_they_are(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    series = generate_uid()
    images = [
        outgoing(restamp("JPEG2000.dcm", tmp_path / "j2k.dcm", series_uid=series), 1),
        outgoing(restamp("SC_rgb_rle.dcm", tmp_path / "rle.dcm", series_uid=series), 2),
    ]
    results = dest_for(orthanc_server).send(images)

    assert [r.delivered for r in results] == [True, True]
    for image in images:
        # Orthanc's DCMTK re-serialises what it receives (undefined-length sequences get lengths), so
        # compare elements and the encapsulated pixel data rather than the file bytes here.
        got, sent = dcmread(BytesIO(stored(orthanc_server, image))), dcmread(image.path)
        assert got.file_meta.TransferSyntaxUID == image.transfer_syntax_uid
        assert got.PixelData == sent.PixelData
        assert got == sent


def test_rejected_syntax_falls_back_to_native_when_decodable(
    orthanc_factory: Callable[..., OrthancServer], tmp_path: Path
) -> None:
    native_only = orthanc_factory(accepted_transfer_syntaxes=[ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    series = generate_uid()
    rle = outgoing(restamp("MR_small_RLE.dcm", tmp_path / "rle.dcm", series_uid=series), 1)
    j2k = outgoing(restamp("JPEG2000.dcm", tmp_path / "j2k.dcm", series_uid=series), 2)
    plain = make_series(tmp_path / "plain", 1, first_id=3)[0]

    rle_result, j2k_result, plain_result = dest_for(native_only).send([rle, j2k, plain])

    assert rle_result.delivered and plain_result.delivered
    got = dcmread(BytesIO(stored(native_only, rle)))
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert got.SOPInstanceUID == rle.sop_instance_uid
    assert np.array_equal(got.pixel_array, dcmread(rle.path).pixel_array)
    assert j2k_result.delivered  # JPEG 2000 decoded with pylibjpeg-openjpeg, sent as native
    got_j2k = dcmread(BytesIO(stored(native_only, j2k)))
    assert not got_j2k.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got_j2k.pixel_array, dcmread(j2k.path).pixel_array)


def test_undecodable_compressed_image_refused_by_the_peer_is_a_permanent_failure(
    orthanc_factory: Callable[..., OrthancServer], tmp_path: Path
) -> None:
    native_only = orthanc_factory(accepted_transfer_syntaxes=[ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    series = generate_uid()
    lossy12 = outgoing(restamp("JPEG-lossy.dcm", tmp_path / "l.dcm", series_uid=series), 1)  # libjpeg refuses it
    (result,) = dest_for(native_only).send([lossy12])
    assert (result.delivered, result.permanent) == (False, True)
    assert "cannot be decoded" in result.message
    assert lossy12.sop_instance_uid not in native_only.instances_in_series(series)


# -- refusals: permanent ---------------------------------------------------------------------


def test_sop_class_the_peer_refuses_is_permanent(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    series = generate_uid()
    odd = outgoing(write_ct(tmp_path / "odd.dcm", series_uid=series, sop_class_uid=UNKNOWN_SOP_CLASS), 1)
    ok = outgoing(write_ct(tmp_path / "ok.dcm", series_uid=series), 2)
    dest = dest_for(orthanc_server)

    odd_result, ok_result = dest.send([odd, ok])
    assert ok_result.delivered
    assert (odd_result.delivered, odd_result.permanent, odd_result.status) == (False, True, 0x0122)
    assert odd_result.message.startswith("0x0122 Refused: SOP Class Not Supported")

    # A batch of nothing but refused classes: the peer accepts no context at all; still per image.
    [alone] = dest.send(
        [outgoing(write_ct(tmp_path / "odd2.dcm", series_uid=series, sop_class_uid=UNKNOWN_SOP_CLASS), 3)]
    )
    assert (alone.delivered, alone.permanent, alone.status) == (False, True, 0x0122)
    assert findscu_sop_uids(orthanc_server, series) == {ok.sop_instance_uid}


def test_unreadable_file_is_permanent_and_named_by_id_only(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    gone, kept = make_series(tmp_path / "Doe^Jane 1960", 2)
    gone.path.unlink()

    gone_result, kept_result = dest_for(orthanc_server).send([gone, kept])

    assert kept_result.delivered
    assert (gone_result.delivered, gone_result.permanent) == (False, True)
    assert "cannot read" in gone_result.message and "Doe" not in gone_result.message


# -- refusals: retryable ---------------------------------------------------------------------


def test_out_of_resources_is_retryable(orthanc_factory: Callable[..., OrthancServer], tmp_path: Path) -> None:
    server = orthanc_factory(lua=lua_error_on_modality("XX"))
    refused = make_series(tmp_path / "xx", 1, modality="XX")[0]
    fine = make_series(tmp_path / "ct", 1, first_id=2)[0]

    refused_result, fine_result = dest_for(server).send([refused, fine])

    assert fine_result.delivered
    assert (refused_result.delivered, refused_result.permanent, refused_result.status) == (False, False, 0xA700)
    assert refused_result.message.startswith("0xA700 Refused: Out of Resources")
    assert findscu_sop_uids(server, refused.series_uid) == set()


def test_called_aet_mismatch_is_a_clear_retryable_error(
    orthanc_factory: Callable[..., OrthancServer], tmp_path: Path
) -> None:
    server = orthanc_factory(aet="PACS1", check_called_aet=True)
    images = make_series(tmp_path, 1)
    wrong = dest_for(server, called_aet="ORTHANC")

    with pytest.raises(DestinationError) as info:
        wrong.send(images)
    assert info.value.retryable
    assert "Called AE title not recognised" in str(info.value)
    assert "Called AE title not recognised" in (wrong.check() or "")
    assert "set ORTHANC_AET to Orthanc's DicomAet" in (wrong.check() or "")

    right = dest_for(server)
    assert right.check() is None
    assert [r.delivered for r in right.send(images)] == [True]


def test_unknown_calling_aet_is_rejected(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    with pytest.raises(DestinationError, match="Calling AE title not recognised"):
        dest_for(orthanc_server, calling_aet="STRANGER").send(make_series(tmp_path, 1))


def test_unreachable_peer_raises_retryable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = DicomDestination("127.0.0.1", port, connect_timeout=2, acse_timeout=2)
    with pytest.raises(DestinationError) as info:
        dest.send(make_series(tmp_path, 1))
    assert info.value.retryable
    assert dest.check()
    with pytest.raises(DestinationError):
        dest.missing("1.2.3", {"1.2.3.4"})


def test_outage_mid_batch_then_resend_delivers_without_duplicates(
    orthanc_factory: Callable[..., OrthancServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = orthanc_factory()
    images = make_series(tmp_path, 6)
    dest = dest_for(server)
    calls = 0
    original = Association.send_c_store

    def crash_before_fourth(self: Association, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 4:
            server.stop(kill=True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", crash_before_fourth)
    results = dest.send(images)
    monkeypatch.undo()

    assert [r.delivered for r in results] == [True] * 3 + [False] * 3
    assert not any(r.permanent for r in results)
    assert all(r.message for r in results[3:])
    with pytest.raises(DestinationError):  # still down: nothing can be tried
        dest.send(images[3:])

    server.start()
    series = images[0].series_uid
    assert dest.missing(series, {i.sop_instance_uid for i in images}) == {i.sop_instance_uid for i in images[3:]}
    assert all(r.delivered for r in dest.send(images))
    assert findscu_sop_uids(server, series) == {i.sop_instance_uid for i in images}
    assert server.count_instances() == 6


# -- verification and checks -----------------------------------------------------------------


def test_missing_counts_what_the_peer_holds(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    images = make_series(tmp_path, 3)
    dest = dest_for(orthanc_server)
    dest.send(images[:2])
    uids = {i.sop_instance_uid for i in images}
    assert dest.missing(images[0].series_uid, uids) == {images[2].sop_instance_uid}
    assert dest.missing(generate_uid(), uids) == uids
    assert dest.check() is None


FIND_REFUSED = {
    # An AE title Orthanc does not know, with Store (and Echo) open to all: the README's first mistake.
    "unknown calling AE": {"loopback_only": False, "extra_config": {"DicomAlwaysAllowFind": False}},
    # Listed, but without C-FIND.
    "listed without AllowFind": {
        "extra_config": {
            "DicomModalities": {"sendit": {"AET": "SENDIT", "Host": "127.0.0.1", "Port": 104, "AllowFind": False}}
        }
    },
}


@pytest.mark.parametrize("setup", list(FIND_REFUSED))
def test_check_catches_an_orthanc_that_will_refuse_verification(
    orthanc_factory: Callable[..., OrthancServer], tmp_path: Path, setup: str
) -> None:
    server = orthanc_factory(**FIND_REFUSED[setup])
    dest = dest_for(server)
    where = f"127.0.0.1:{server.dicom_port} (calling AE SENDIT, called AE ORTHANC)"

    problem = dest.check() or ""

    assert f"{where} refused C-FIND" in problem
    assert "DicomModalities" in problem and '"DicomAlwaysAllowFind": true' in problem
    # The run: delivery works, and verification says the same, as a refusal that waiting won't fix.
    images = make_series(tmp_path, 2)
    assert all(r.delivered for r in dest.send(images))
    with pytest.raises(DestinationError) as info:
        dest.missing(images[0].series_uid, {i.sop_instance_uid for i in images})
    assert f"{where} refused C-FIND" in str(info.value) and "DicomAlwaysAllowFind" in str(info.value)
    assert "association lost" not in str(info.value)
    assert not info.value.retryable


def test_check_catches_an_orthanc_that_refuses_echo(orthanc_factory: Callable[..., OrthancServer]) -> None:
    server = orthanc_factory(loopback_only=False, extra_config={"DicomAlwaysAllowEcho": False})

    problem = dest_for(server).check() or ""

    assert f"127.0.0.1:{server.dicom_port} (calling AE SENDIT, called AE ORTHANC) refused C-ECHO" in problem
    assert '"DicomAlwaysAllowEcho": true' in problem


def test_check_names_address_titles_and_the_fix_when_the_association_is_refused(
    orthanc_factory: Callable[..., OrthancServer],
) -> None:
    # an Orthanc of its own: the shared one may still be busy with another test's associations
    orthanc_server = orthanc_factory()
    stranger = dest_for(orthanc_server, calling_aet="STRANGER").check() or ""
    assert f"127.0.0.1:{orthanc_server.dicom_port} (calling AE STRANGER, called AE ORTHANC)" in stranger
    assert "Calling AE title not recognised" in stranger
    assert "list STRANGER in DicomModalities" in stranger and "SENDIT_AET" in stranger

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nobody = DicomDestination("127.0.0.1", port, connect_timeout=2, acse_timeout=2).check() or ""
    assert f"cannot connect to 127.0.0.1:{port} (calling AE SENDIT, called AE ORTHANC)" in nobody
    assert "Connection refused" in nobody and "ORTHANC_PORT" in nobody


def test_sendit_check_command_fails_on_an_orthanc_that_will_refuse_verification(
    orthanc_factory: Callable[..., OrthancServer], tmp_path: Path
) -> None:
    """The operator's view: `sendit check` exits 1 with one line that says what to change."""
    refusing = orthanc_factory(**FIND_REFUSED["unknown calling AE"])
    fine = orthanc_factory()

    def check(server: OrthancServer) -> subprocess.CompletedProcess[str]:
        folder = tmp_path / str(server.dicom_port)
        folder.mkdir()
        (folder / "sendit.toml").write_text(
            f'SECRET_KEY = "{"k" * 40}"\nDATA_DIR = "data"\nOUTPUT_FOLDER = "off"\nSEND_TO_ORTHANC = true\n'
            f'ORTHANC_IPADDRESS = "127.0.0.1"\nORTHANC_PORT = {server.dicom_port}\nORTHANC_TIMEOUT = 10\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDIT_", "DJANGO_")) and k != "DATABASE_URL"}
        env["SENDIT_CONFIG"] = str(folder / "sendit.toml")
        command = [sys.executable, "-m", "sendit", "check"]
        return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120)

    refused = check(refusing)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    where = f"127.0.0.1:{refusing.dicom_port} (calling AE SENDIT, called AE ORTHANC)"
    assert f"[FAIL] destination orthanc-dicom: {where} refused C-FIND" in refused.stdout
    assert "Traceback" not in refused.stderr

    ok = check(fine)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"[ok] destination orthanc-dicom: 127.0.0.1:{fine.dicom_port} (calling AE SENDIT" in ok.stdout


def test_more_than_128_contexts_use_several_associations(
    orthanc_server: OrthancServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 70 storage SOP classes that Orthanc knows → 140 contexts (own syntax + native fallback each).
    classes = [str(cx.abstract_syntax) for cx in StoragePresentationContexts][:70]
    series = generate_uid()
    images = [
        outgoing(write_ct(tmp_path / f"{k}.dcm", series_uid=series, sop_class_uid=uid), k)
        for k, uid in enumerate(classes)
    ]
    opened = 0
    original = AE.associate

    def counting(self: AE, *args: Any, **kwargs: Any) -> Association:
        nonlocal opened
        opened += 1
        assert len(kwargs["contexts"]) <= 128
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AE, "associate", counting)
    results = dest_for(orthanc_server).send(images)
    monkeypatch.undo()

    assert opened == 2
    delivered = {images[k].sop_instance_uid for k, r in enumerate(results) if r.delivered}
    refused = [r for r in results if not r.delivered]
    assert all(r.permanent and r.status == 0x0122 for r in refused)  # classes this Orthanc doesn't store
    assert len(delivered) >= 60
    assert findscu_sop_uids(orthanc_server, series) == delivered


# -- statuses Orthanc never sends: a pynetdicom SCP that answers what we tell it -------------


class StubSCP:
    """Answers each C-STORE with ``statuses[SOPInstanceUID]`` (default Success); can abort once."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}
        self.abort_once: set[str] = set()
        self.received: list[str] = []
        self.ae = AE("STUB")
        self.ae.supported_contexts = StoragePresentationContexts
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store)]
        server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        assert server is not None
        self.server = server
        self.port = int(server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)
        uid = str(request.AffectedSOPInstanceUID)
        if uid in self.abort_once:
            self.abort_once.discard(uid)
            event.assoc.abort()
            return 0xA700
        self.received.append(uid)
        return self.statuses.get(uid, 0x0000)


@pytest.fixture(scope="module")
def _stub_server() -> Iterator[StubSCP]:
    stub = StubSCP()
    yield stub
    stub.server.shutdown()


@pytest.fixture
def stub_scp(_stub_server: StubSCP) -> StubSCP:
    _stub_server.statuses, _stub_server.abort_once, _stub_server.received = {}, set(), []
    return _stub_server


@pytest.mark.parametrize(
    ("code", "delivered", "permanent", "words"),
    [
        (0xB000, True, False, "0xB000 Coercion of Data Elements"),
        (0xB006, True, False, "0xB006 Element Discarded"),
        (0xB007, True, False, "0xB007 Data Set Does Not Match SOP Class"),
        (0xA701, False, False, "0xA701 Refused: Out of Resources"),
        (0xA900, False, True, "0xA900 Data Set Does Not Match SOP Class"),
        (0xC123, False, True, "0xC123 Cannot Understand"),
        (0x0124, False, True, "0x0124 Refused: Not Authorised"),
    ],
)
def test_status_classes_reach_the_result(
    stub_scp: StubSCP, tmp_path: Path, code: int, delivered: bool, permanent: bool, words: str
) -> None:
    target, other = make_series(tmp_path, 2)
    stub_scp.statuses[target.sop_instance_uid] = code
    dest = DicomDestination("127.0.0.1", stub_scp.port, called_aet="STUB", acse_timeout=5, dimse_timeout=5)

    result, other_result = dest.send([target, other])

    assert (result.delivered, result.permanent, result.status) == (delivered, permanent, code)
    assert result.message.startswith(words)
    assert result.warning == delivered
    assert other_result.delivered and not other_result.message


def test_peer_abort_mid_batch_reopens_the_association(stub_scp: StubSCP, tmp_path: Path) -> None:
    images = make_series(tmp_path, 4)
    stub_scp.abort_once.add(images[1].sop_instance_uid)
    dest = DicomDestination("127.0.0.1", stub_scp.port, called_aet="STUB", acse_timeout=5, dimse_timeout=5)

    results = dest.send(images)

    assert [r.delivered for r in results] == [True] * 4
    assert set(stub_scp.received) == {i.sop_instance_uid for i in images}
    # What the series page shows: one reconnect, naming the image by its id and the cause.
    assert dest.reconnects == 1
    assert dest.events == [
        f"association lost while sending image {images[1].image_id} (aborted or closed by the peer); "
        "reconnecting to send it again"
    ]
    assert all(r.delivered for r in dest.send(images[:1]))
    assert (dest.reconnects, dest.events) == (1, [])  # a count since the object was made; events per send


def test_peer_that_keeps_aborting_gives_retryable_results(stub_scp: StubSCP, tmp_path: Path) -> None:
    images = make_series(tmp_path, 2)
    stub_scp.statuses[images[1].sop_instance_uid] = 0x0000
    dest = DicomDestination(
        "127.0.0.1", stub_scp.port, called_aet="STUB", acse_timeout=5, dimse_timeout=5, max_reconnects=1
    )
    # abort every time image 2 arrives (more often than we reconnect)
    stub_scp.abort_once = _Always(images[1].sop_instance_uid)  # type: ignore[assignment]

    first, second = dest.send(images)

    assert first.delivered
    assert (second.delivered, second.permanent) == (False, False)
    assert "association lost" in second.message


class _Lingering(threading.Event):
    """A reactor checkpoint that, once the reactor is let go, holds it (still marked as paused) until
    the next answer has arrived: the thread a busy machine did not reschedule in time."""

    def __init__(self, answered: threading.Event) -> None:
        super().__init__()
        self.answered = answered

    def wait(self, timeout: float | None = None) -> bool:
        woke = super().wait(timeout)
        if woke:
            self.answered.wait(5)
        return woke


def test_answer_taken_by_the_association_reactor_is_not_lost(
    stub_scp: StubSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 30-second stall (issue 12.4). pynetdicom pauses its reactor thread around send_c_store()
    with a check-then-act handshake: clear an Event, then spin until a flag the reactor sets before
    Event.wait() reads True. A reactor woken by the previous send's unpause but not yet run again
    still has that flag set, so the next send goes ahead with the reactor loose; when the answer is
    queued before the sender reads it, the reactor takes it ("Received unexpected C-STORE service
    message") and the sender waits out the DIMSE time-out for an answer the peer already sent. Here
    that interleaving is made certain: the reactor lingers until the answer is queued, and the sender
    reads it only once the reactor took it (or 0.3 s passed)."""
    answered = threading.Event()
    original_init = Association.__init__
    original_send = DIMSEServiceProvider.send_msg
    original_receive = DIMSEServiceProvider.receive_primitive

    def init(self: Association, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if self.is_requestor:
            self._reactor_checkpoint = _Lingering(answered)
            self._reactor_checkpoint.set()

    def receive(self: DIMSEServiceProvider, primitive: Any) -> None:
        original_receive(self, primitive)
        if self.assoc.is_requestor:
            answered.set()

    def send(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        if not self.assoc.is_requestor:
            return original_send(self, primitive, context_id)
        answered.clear()
        original_send(self, primitive, context_id)
        answered.wait(5)
        deadline = time.monotonic() + 0.3
        while not self.msg_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.005)

    monkeypatch.setattr(Association, "__init__", init)
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", send)
    monkeypatch.setattr(DIMSEServiceProvider, "receive_primitive", receive)
    images = make_series(tmp_path, 3)
    dest = DicomDestination(
        "127.0.0.1", stub_scp.port, called_aet="STUB", acse_timeout=3, dimse_timeout=3, network_timeout=3
    )

    results = dest.send(images)

    assert [(r.delivered, r.message) for r in results] == [(True, "")] * 3
    assert (dest.reconnects, dest.events) == (0, [])


class _Always(set[str]):
    """A set whose discard() is a no-op, so the stub aborts on every arrival of its member."""

    def __init__(self, uid: str) -> None:
        super().__init__({uid})

    def discard(self, _element: object) -> None:
        return None


# -- the classifier on its own ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status_class"),
    [
        (0x0000, StatusClass.DELIVERED),
        (0xB006, StatusClass.WARNING),
        (0xBABE, StatusClass.WARNING),
        (0xA7FE, StatusClass.RETRYABLE),
        (0xA9FF, StatusClass.PERMANENT),
        (0xCFFF, StatusClass.PERMANENT),
        (0x0122, StatusClass.PERMANENT),
        (0x0117, StatusClass.PERMANENT),
        (0x0110, StatusClass.RETRYABLE),
        (0x1234, StatusClass.RETRYABLE),  # unknown: keep the image, let a person see it after N tries
    ],
)
def test_classifier(code: int, status_class: StatusClass) -> None:
    assert classify(code).status_class is status_class
    assert describe(code).startswith(f"0x{code:04X} ")


def test_status_words_are_pynetdicoms_and_only_the_retry_column_is_ours() -> None:
    """Every Storage status pynetdicom knows reads in its words; its category agrees with ours."""
    for code, (category, words) in STORAGE_SERVICE_CLASS_STATUS.items():
        info = classify(code)
        assert info.describe() == f"0x{code:04X} {words or category}"
        assert info.delivered == (category in ("Success", "Warning")), hex(code)
