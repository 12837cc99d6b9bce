"""The pipeline with DEIDENTIFY_RESTFUL=true against a real HTTP identifier service on loopback."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pydicom
import pytest

from sendit.config import Timeout
from sendit.relay.models import Series, SeriesIdentifiers, Status
from tests.dasher_server import DasherServer, jitter_for, suid_for
from tests.helpers import demo_into, ingest_and_run, statuses

pytestmark = pytest.mark.django_db(transaction=True)
ID_SOURCE, ITEM_SOURCE = "Stanford MRN", "Stanford Accession"


@pytest.fixture
def restful(reconfigure: Any, dasher_server: DasherServer) -> DasherServer:
    reconfigure(
        DEIDENTIFY_RESTFUL=True,
        DASHER_URL=dasher_server.url,
        DASHER_STUDY=dasher_server.study,
        DASHER_TOKEN=dasher_server.initial_token,
        DASHER_TIMEOUT=Timeout(1.0, 1.0),
        DASHER_MAX_ATTEMPTS=2,
    )
    return dasher_server


def shifted(date: str, days: int) -> str:
    return (dt.date(int(date[:4]), int(date[4:6]), int(date[6:])) + dt.timedelta(days=days)).strftime("%Y%m%d")


def test_output_carries_the_service_values(sendit_dirs: dict[str, Path], restful: DasherServer) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=2, images=2)
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p, stop_before_pixels=True) for p in written}
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses() == {Status.DONE: len(written)}
    studies = {ds.StudyInstanceUID for ds in originals.values()}
    assert len(restful.requests) == len(studies)  # one request per study, covering all its series
    for series in Series.objects.all():
        row = SeriesIdentifiers.objects.get(series=series)
        assert row.response["raw"]["provider"] == "dasher"  # the service's answer is stored
    from sendit.relay.runtime import deidentifier

    by_output_uid = {deidentifier().remap_uid(uid): ds for uid, ds in originals.items()}
    outputs = list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))
    assert len(outputs) == len(written)
    for path in outputs:
        out = pydicom.dcmread(path)
        source = by_output_uid[out.SOPInstanceUID]
        assert out.PatientID == suid_for(ID_SOURCE, source.PatientID)
        assert out.AccessionNumber == suid_for(ITEM_SOURCE, source.AccessionNumber, prefix="A")
        assert out.StudyDate == shifted(source.StudyDate, jitter_for(ID_SOURCE, source.PatientID))


def test_wrong_answer_is_an_error_and_nothing_is_delivered(sendit_dirs: dict[str, Path], restful: DasherServer) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    restful.fail_always("zero_jitter")
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses() == {Status.ERROR: len(written)}
    assert list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm")) == []
    assert all("identifier service" in s.last_error and "jitter" in s.last_error for s in Series.objects.all())


@pytest.mark.slow  # waits out the client's own back-off between six failed requests
def test_service_down_only_delays(sendit_dirs: dict[str, Path], restful: DasherServer, reconfigure: Any) -> None:
    reconfigure(MAX_ATTEMPTS=10, RETRY_BASE_SECONDS=0)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    restful.fail("500", times=6)  # three pipeline attempts of two requests each fail
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses() == {Status.DONE: len(written)}
    assert len(restful.requests) == 7  # six failures, then one answer for the study
