"""DicomWebDestination (STOW-RS, QIDO-RS) against Orthanc's DICOMweb plugin (Debian orthanc-dicomweb).

What Orthanc holds is checked over its own REST API (``OrthancServer`` helpers), independently of
the code under test. The last tests run the whole pipeline with DICOMWEB_URL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sendit.destinations.base import OutgoingImage
from sendit.destinations.dicomweb import DicomWebDestination, _outcomes, _result
from sendit.relay.models import Image, Status
from tests.helpers import demo_into, ingest_and_run, statuses
from tests.orthanc import (
    OrthancServer,
    lua_error_on_modality,
    make_series,
    outgoing,
    require_dicomweb_plugin,
    restamp,
    write_ct,
)

pytestmark = pytest.mark.orthanc

Reconfigure = Callable[..., None]


@pytest.fixture(scope="module")
def dicomweb_orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    """One Orthanc with the DICOMweb plugin; a Lua filter refuses Modality XX (to test what it says)."""
    require_dicomweb_plugin()
    return orthanc_factory(dicomweb=True, lua=lua_error_on_modality("XX"))


def dest_for(server: OrthancServer, **kwargs: Any) -> DicomWebDestination:
    options: dict[str, Any] = {"timeout": 15.0, "connect_timeout": 2.0}
    if server.auth:
        options["username"], options["password"] = server.auth
    return DicomWebDestination(server.dicomweb_url, **(options | kwargs))


def test_batches_are_stored_byte_for_byte_and_verified_by_qido(dicomweb_orthanc: OrthancServer, tmp_path: Path) -> None:
    images = make_series(tmp_path, 5)
    images.append(outgoing(restamp("JPEG2000.dcm", tmp_path / "j2k.dcm", series_uid=images[0].series_uid), 99))
    dest = dest_for(dicomweb_orthanc, batch=2)  # three requests, sent at once
    try:
        results = dest.send(images)
        uids = {image.sop_instance_uid for image in images}
        assert dest.missing(images[0].series_uid, uids) == set()
        held = dicomweb_orthanc.instances_in_series(images[0].series_uid)
        assert dest.missing(images[0].series_uid, uids | {"2.25.1234"}) == {"2.25.1234"}
    finally:
        dest.close()
    assert [(r.image_id, r.delivered, r.message) for r in results] == [(i.image_id, True, "") for i in images]
    assert set(held) == uids
    for image in images:  # kept as sent, compressed ones too
        assert dicomweb_orthanc.stored_file(held[image.sop_instance_uid]) == image.path.read_bytes()


def test_a_resend_is_stored_once(dicomweb_orthanc: OrthancServer, tmp_path: Path) -> None:
    images = make_series(tmp_path, 3)
    dest = dest_for(dicomweb_orthanc)
    try:
        assert all(r.delivered for r in dest.send(images))
        assert all(r.delivered for r in dest.send(images))
    finally:
        dest.close()
    assert len(dicomweb_orthanc.instances_in_series(images[0].series_uid)) == 3


def test_failed_sop_sequence_fails_that_instance_with_its_reason_and_stores_the_rest(
    dicomweb_orthanc: OrthancServer, tmp_path: Path
) -> None:
    """An instance posted to another study's URL: Orthanc lists it in the Failed SOP Sequence with
    Failure Reason 0x0110 (Processing failure), retryable in the DIMSE table; its batch-mates stored."""
    images = make_series(tmp_path, 3)
    stray = dataclasses.replace(images[1], study_uid="2.25.99")  # the URL says another study
    dest = dest_for(dicomweb_orthanc)
    try:
        results = dest.send([images[0], stray, images[2]])
    finally:
        dest.close()
    assert [r.delivered for r in results] == [True, False, True]
    assert results[1].status == 0x0110 and not results[1].permanent
    assert results[1].message == f"image {stray.image_id}: STOW-RS refused it: 0x0110 Processing Failure"
    assert set(dicomweb_orthanc.instances_in_series(images[0].series_uid)) == {
        images[0].sop_instance_uid,
        images[2].sop_instance_uid,
    }


def test_an_instance_the_server_leaves_unreported_is_not_delivered(
    dicomweb_orthanc: OrthancServer, tmp_path: Path
) -> None:
    """Orthanc's plugin answers 200 and simply leaves out an instance its Lua filter refused."""
    images = make_series(tmp_path, 2)
    refused = outgoing(write_ct(tmp_path / "xx.dcm", series_uid=images[0].series_uid, modality="XX"), 7)
    refused = dataclasses.replace(refused, study_uid=images[0].study_uid)
    dest = dest_for(dicomweb_orthanc)
    try:
        results = dest.send([*images, refused])
    finally:
        dest.close()
    assert [r.delivered for r in results] == [True, True, False]
    assert not results[2].permanent
    assert "did not report this instance as stored" in results[2].message


def test_a_file_the_server_cannot_parse_fails_alone_and_for_good(
    dicomweb_orthanc: OrthancServer, tmp_path: Path
) -> None:
    images = make_series(tmp_path, 3)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(images[1].path.read_bytes()[:400])  # the header cut short
    batch = [images[0], dataclasses.replace(images[1], path=broken), images[2]]
    dest = dest_for(dicomweb_orthanc)
    try:
        results = dest.send(batch)
    finally:
        dest.close()
    assert [r.delivered for r in results] == [True, False, True]
    assert results[1].permanent and "HTTP 400" in results[1].message


def test_a_wrong_url_fails_the_destination_not_the_images(dicomweb_orthanc: OrthancServer, tmp_path: Path) -> None:
    """Orthanc's REST root instead of its DICOMweb root: HTTP 405 for every request. That is the
    configuration's fault: retryable for the batch, never a permanent failure of the images."""
    from sendit.destinations.base import DestinationError

    images = make_series(tmp_path, 3)
    dest = DicomWebDestination(dicomweb_orthanc.url, timeout=15)
    try:
        with pytest.raises(DestinationError) as failure:
            dest.send(images)
    finally:
        dest.close()
    assert failure.value.retryable
    assert "HTTP 405 Method Not Allowed (is DICOMWEB_URL the DICOMweb root?)" in str(failure.value)


def test_failure_reasons_map_like_dimse_statuses() -> None:
    """The Failure Reason is a DIMSE status: the same table says retryable or permanent, in the same words."""
    image = OutgoingImage(
        1, Path("x"), "p", "1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
    )
    for code, permanent, words in (
        (0xA700, False, "0xA700 Refused: Out of Resources"),
        (0xA900, True, "0xA900"),
        (0xC000, True, "0xC000"),
    ):
        answer = {
            "00081198": {
                "vr": "SQ",
                "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4"]}, "00081197": {"vr": "US", "Value": [code]}}],
            }
        }
        result = _result(image, *_outcomes(answer), 409)
        assert (result.delivered, result.permanent, result.status) == (False, permanent, code)
        assert words in result.message
    warned = {
        "00081199": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4"]}, "00081196": {"vr": "US", "Value": [0xB000]}}],
        }
    }
    result = _result(image, *_outcomes(warned), 202)
    assert result.delivered and result.warning and "0xB000" in result.message


def test_check_names_what_is_wrong(orthanc_factory: Callable[..., OrthancServer], tmp_path: Path) -> None:
    require_dicomweb_plugin()
    server = orthanc_factory(dicomweb=True, users={"sendit": "right"})
    assert dest_for(server).check() is None
    wrong = DicomWebDestination(server.dicomweb_url, username="sendit", password="wrong", timeout=5)
    problem = wrong.check()
    wrong.close()
    assert problem is not None and "credentials" in problem and "wrong" not in problem
    gone = DicomWebDestination("http://127.0.0.1:9/dicom-web", timeout=2, connect_timeout=1)
    problem = gone.check()
    gone.close()
    assert problem is not None and problem.startswith("cannot reach DICOMweb at http://127.0.0.1:9/dicom-web")


# -- the pipeline with DICOMWEB_URL ----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_pipeline_delivers_over_stow_rs_and_verifies(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, dicomweb_orthanc: OrthancServer
) -> None:
    reconfigure(OUTPUT_FOLDER=None, DICOMWEB_URL=dicomweb_orthanc.dicomweb_url, RETRY_BASE_SECONDS=0)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=3)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses() == {Status.DONE: len(written)}
    for image in Image.objects.select_related("series"):
        assert image.deid_sop_instance_uid in dicomweb_orthanc.instances_in_series(image.series.deid_series_uid)


@pytest.mark.django_db(transaction=True)
def test_a_stow_rs_failure_ends_in_error_with_words(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, dicomweb_orthanc: OrthancServer
) -> None:
    reconfigure(OUTPUT_FOLDER=None, DICOMWEB_URL=dicomweb_orthanc.dicomweb_url, RETRY_BASE_SECONDS=0, MAX_ATTEMPTS=1)
    series_uid = "2.25.4242"
    write_ct(sendit_dirs["INPUT_FOLDER"] / "ok.dcm", series_uid=series_uid)
    write_ct(sendit_dirs["INPUT_FOLDER"] / "xx.dcm", series_uid=series_uid, modality="XX")  # the filter refuses it
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    failed = Image.objects.get(status=Status.ERROR)
    assert failed.reason.startswith("dicomweb: ")
    assert "did not report this instance as stored" in failed.reason
    assert statuses() == {Status.DONE: 1, Status.ERROR: 1}


# -- Google's Cloud Healthcare API: a service account's tokens ----------------------------------


class _GoogleStandIn:
    """A stand-in on loopback for Google's OAuth token endpoint and a DICOMweb store that wants a
    bearer token (no Google service can be reached from tests): it hands out tokens for a signed JWT
    assertion and records the Authorization header of each search; ``refuse`` makes it answer 401
    to the token it names."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        self.tokens: list[str] = []
        self.seen: list[str] = []
        self.refuse = ""
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                return None

            def _answer(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                form = self.rfile.read(int(self.headers["Content-Length"])).decode()
                assert "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" in form
                stand_in.tokens.append(f"test-token-{len(stand_in.tokens) + 1}")
                token = {"access_token": stand_in.tokens[-1], "expires_in": 3600, "token_type": "Bearer"}
                self._answer(200, json.dumps(token).encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802
                header = self.headers.get("Authorization", "")
                stand_in.seen.append(header)
                if not header.startswith("Bearer ") or header == f"Bearer {stand_in.refuse}":
                    self._answer(401, b"", "text/plain")
                    return
                self._answer(200, b"[]", "application/dicom+json")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_google_service_account_gets_a_token_and_a_new_one_after_a_401(tmp_path: Path) -> None:
    import json

    pytest.importorskip("google.oauth2.service_account")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    stand_in = _GoogleStandIn()
    try:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        account = tmp_path / "service-account.json"
        account.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "test",
                    "private_key_id": "k1",
                    "private_key": pem,
                    "client_email": "sendit@test.iam.gserviceaccount.com",
                    "client_id": "1",
                    "token_uri": f"{stand_in.url}/token",
                }
            )
        )
        dest = DicomWebDestination(f"{stand_in.url}/dicomWeb", google_credentials=str(account), timeout=10)
        try:
            assert dest.check() is None
            assert dest.check() is None  # the token is kept while valid
            assert stand_in.tokens == ["test-token-1"]
            stand_in.refuse = "test-token-1"  # revoked: the server answers 401
            assert dest.check() is None
        finally:
            dest.close()
        assert stand_in.tokens == ["test-token-1", "test-token-2"]
        assert stand_in.seen == ["Bearer test-token-1"] * 3 + ["Bearer test-token-2"]
    finally:
        stand_in.stop()
