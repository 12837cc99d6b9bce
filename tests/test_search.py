"""Finding series (pseudonym, de-identified accession, modality, reason, dates, originals) and bulk
actions on what a filter found, through Django's test client."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from django.contrib.auth.models import User
from django.test import Client

from sendit.relay.models import Event, Image, Series, SeriesIdentifiers, Status
from sendit.relay.roles import assign
from tests.helpers import demo_into, ingest_and_run

pytestmark = pytest.mark.django_db


def client_for(name: str, role: str) -> Client:
    user = User.objects.create_user(name, password="correct horse battery staple")
    assign(user, role)
    client = Client()
    client.force_login(user)
    return client


def listed(client: Client, url: str) -> set[int]:
    page = client.get(url).content.decode()
    return {s.pk for s in Series.objects.all() if f'data-series="{s.pk}"' in page}


def test_search_by_pseudonym_accession_modality_reason_and_dates(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=2, images=2)
    broken = pydicom.dcmread(written[0])
    broken.StudyDate = "2021-13-45"
    broken.save_as(written[0])
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    viewer = client_for("vera", "viewer")
    stored = {row.series_id: row.response for row in SeriesIdentifiers.objects.all()}
    first = min(stored)
    pseudonym, accession = stored[first]["patient_id"], stored[first]["accession_number"]
    same_patient = {pk for pk, r in stored.items() if r["patient_id"] == pseudonym}
    assert 0 < len(same_patient) < len(stored)
    assert listed(viewer, f"/series/?q={pseudonym}") == same_patient
    assert first in listed(viewer, f"/series/?q={accession}")
    assert listed(viewer, "/series/?q=nobody") == set()
    api = viewer.get(f"/api/series?q={pseudonym}&size=500").json()
    assert {item["id"] for item in api["items"]} == same_patient
    quarantined = Image.objects.get(status=Status.QUARANTINED).series_id
    assert listed(viewer, "/series/?reason=studydate") == {quarantined}
    assert listed(viewer, "/series/?status=QUARANTINED&modality=ct") <= {quarantined}
    assert listed(viewer, "/series/?since=2000-01-01") == set(stored)
    assert listed(viewer, "/series/?until=2000-01-01") == set()


def test_original_identifier_search_is_for_reviewers_by_post_and_an_event(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=2, images=1)
    mrn = str(pydicom.dcmread(written[0]).PatientID)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    expected = {s.pk for s in Series.objects.all() if s.header.get("patient_id") == mrn}
    assert expected
    reviewer = client_for("rita", "reviewer")
    page = reviewer.post("/series/", {"original": mrn}).content.decode()
    assert {s.pk for s in Series.objects.all() if f'data-series="{s.pk}"' in page} == expected
    event = Event.objects.get(reason__startswith="search by original")
    assert event.user.username == "rita" and mrn not in event.reason and f"{len(expected)} series" in event.reason
    assert client_for("otto", "operator").post("/series/", {"original": mrn}).status_code == 403
    assert listed(reviewer, f"/series/?original={mrn}") == set(Series.objects.values_list("id", flat=True))


def test_bulk_actions_need_the_role_a_filter_and_a_confirmation(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sendit.relay.tasks.enqueue", lambda ids: len(ids))
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=2, images=2)
    for path in written[:1] + written[-1:]:
        ds = pydicom.dcmread(path)
        ds.StudyDate = "2021-13-45"
        ds.save_as(path)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert Image.objects.filter(status=Status.QUARANTINED).count() == 2
    operator = client_for("otto", "operator")
    page = operator.get("/series/?reason=StudyDate").content.decode()
    assert "Retry all" in page and "Discard all" not in page  # discard is the reviewer's
    form = {"reason": "StudyDate"}
    assert client_for("vera", "viewer").post("/series/bulk/retry", {**form, "confirm": "yes"}).status_code == 403
    assert operator.post("/series/bulk/discard", {**form, "confirm": "yes"}).status_code == 403
    operator.post("/series/bulk/retry", form)  # no confirmation: nothing
    operator.post("/series/bulk/retry", {"confirm": "yes"})  # no filter: nothing
    assert Image.objects.filter(status=Status.QUARANTINED).count() == 2
    done = operator.post("/series/bulk/retry", {**form, "confirm": "yes"}, follow=True).content.decode()
    assert "retry: 2 image(s) in 2 series" in done
    assert Image.objects.filter(status=Status.QUARANTINED).count() == 0
    assert Event.objects.filter(reason="retry by otto", to_status=Status.NEW).count() == 2
