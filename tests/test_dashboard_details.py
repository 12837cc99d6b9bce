"""What the dashboard's JSON says beyond counts: each destination's target, last success and its own
throughput; series rows with the shifted study date, the duration, and for a quarantined series the
stage "quarantined" with a reason instead of "delivered" and an empty last error."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from django.contrib.auth.models import User
from django.test import Client

from sendit.relay.models import Series, SeriesIdentifiers, Status
from tests.helpers import demo_into, ingest_and_run

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    from sendit.web import overview

    monkeypatch.setattr(overview, "_destinations_cache", None)


def viewer() -> Client:
    client = Client()
    client.force_login(User.objects.get_or_create(username="vera")[0])
    return client


def test_destinations_say_where_when_and_how_much(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    (folder,) = viewer().get("/api/dashboard").json()["destinations"]
    assert folder["target"] == str(sendit_dirs["OUTPUT_FOLDER"]) and folder["reachable"]
    assert folder["last_hour"] == len(written)
    assert datetime.fromisoformat(folder["last_success"]) > datetime.now().astimezone() - timedelta(minutes=5)


def test_series_rows_carry_the_shifted_date_the_duration_and_why_a_series_is_held(
    sendit_dirs: dict[str, Path],
) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    original = pydicom.dcmread(written[1]).StudyDate
    descriptions = {str(d.SeriesInstanceUID): str(d.SeriesDescription) for d in map(pydicom.dcmread, written)}
    broken = pydicom.dcmread(written[0])
    broken.StudyDate = "2021-13-45"
    broken.save_as(written[0])
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    rows = {row["id"]: row for row in viewer().get("/api/dashboard").json()["recent"]}
    held = Series.objects.get(status=Status.QUARANTINED)
    assert rows[held.pk]["stage"] == "quarantined" and "StudyDate" in rows[held.pk]["last_error"]
    done = Series.objects.filter(status=Status.DONE).first()
    assert done is not None
    jitter = SeriesIdentifiers.objects.get(series=done).response["jitter_days"]
    expected = (datetime.strptime(original, "%Y%m%d") + timedelta(days=jitter)).strftime("%Y-%m-%d")
    assert rows[done.pk]["study_date"] == expected and original not in str(rows[done.pk])
    assert rows[done.pk]["duration"] is not None and rows[done.pk]["duration"] >= 0
    # the description as researchers get it (scrubbed; the demo's hold no names)
    assert rows[done.pk]["description"] == descriptions[done.series_uid]
    listed = viewer().get("/api/series?status=QUARANTINED").json()["items"][0]
    assert listed["stage"] == "quarantined"
