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
