"""Rejected files (not images): counted apart from images, downloaded by reviewers, retried, a
conflict resolved by choosing the winner, discarded — in the web, the API and the CLI."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from django.contrib.auth.models import User
from django.test import Client

from sendit.relay.housekeeping import file_counts, status_counts
from sendit.relay.models import Event, Image, ReceivedFile, Status
from sendit.relay.roles import assign
from sendit.web import tokens
from tests.helpers import demo_into, ingest_and_run, run_cli

pytestmark = pytest.mark.django_db


def user(name: str, role: str) -> User:
    made = User.objects.create_user(name, password="correct horse battery staple")
    assign(made, role)
    return made


def client_for(made: User) -> Client:
    client = Client()
    client.force_login(made)
    return client


def test_a_truncated_file_is_counted_apart_downloaded_by_a_reviewer_and_retried_after_repair(
    sendit_dirs: dict[str, Path],
) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    whole = written[0].read_bytes()
    written[0].write_bytes(whole[: len(whole) - 300])
    (sendit_dirs["INPUT_FOLDER"] / "notes.txt").write_text("not an image")
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    done_before = status_counts()[Status.DONE]
    assert status_counts()[Status.QUARANTINED] == 0 and done_before == len(written) - 1
    assert file_counts()[Status.QUARANTINED] == 2
    truncated = ReceivedFile.objects.get(reason__contains="truncated")
    reviewer, operator = user("rita", "reviewer"), user("otto", "operator")
    dashboard = client_for(operator).get("/api/dashboard").json()
    assert dashboard["counts"]["QUARANTINED"] == 0 and dashboard["files"]["QUARANTINED"] == 2
    # download: a reviewer's, as an attachment named by id, and an event
    assert client_for(operator).get(f"/files/{truncated.pk}/download").status_code == 403
    got = client_for(reviewer).get(f"/files/{truncated.pk}/download")
    assert got.status_code == 200 and got.content == whole[: len(whole) - 300]
    assert got["Content-Disposition"] == f'attachment; filename="received-file-{truncated.pk}.bin"'
    assert Event.objects.filter(reason=f"received file #{truncated.pk}: downloaded by rita", user=reviewer).exists()
    # the operator repairs the set-aside copy and retries it through the API: it becomes an image
    Path(truncated.stored_at).write_bytes(whole)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {tokens.issue(operator)}"}
    done = Client().post(f"/api/files/{truncated.pk}/retry", **auth).json()
    assert done["changed"] == 1 and written[0].exists()
    again = Client().post(f"/api/files/{truncated.pk}/retry", **auth).json()
    assert again["changed"] == 0 and "already resolved" in again["problems"][0]
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert status_counts()[Status.DONE] == done_before + 1 and file_counts()[Status.QUARANTINED] == 1
    assert ReceivedFile.objects.get(pk=truncated.pk).resolved == "retried by otto"
    # the listing says it; discarding the other one is the reviewer's (web and CLI)
    listed = client_for(operator).get("/files/").content.decode()
    notes = ReceivedFile.objects.get(reason__contains="not a DICOM")
    assert f'data-file="{notes.pk}"' in listed and f'data-file="{truncated.pk}"' not in listed
    assert client_for(operator).post(f"/files/{notes.pk}/discard").status_code == 403
    assert run_cli("discard", "--file", str(notes.pk), "--yes")[0] == 0
    assert not Path(notes.stored_at).exists() and file_counts()[Status.QUARANTINED] == 0


def test_a_conflict_is_resolved_by_choosing_the_winner(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    for name in ("z-copy-a.dcm", "z-copy-b.dcm"):
        ds = pydicom.dcmread(written[0])
        ds.ImageComments = name  # same SOPInstanceUID, other content
        ds.save_as(written[0].parent / name)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    conflicts = list(ReceivedFile.objects.filter(reason__startswith="conflict").order_by("id"))
    assert len(conflicts) == 2 and status_counts()[Status.QUARANTINED] == 0
    first, second = conflicts
    image = Image.objects.get(pk=first.image_id)
    assert image.status == Status.DONE
    operator = client_for(user("otto", "operator"))
    # keeping the processed copy deletes this one: the reviewer's decision
    assert operator.post(f"/files/{first.pk}/resolve", {"winner": "processed"}).status_code == 403
    assert (
        client_for(user("rita", "reviewer")).post(f"/files/{first.pk}/resolve", {"winner": "processed"}).status_code
        == 302
    )
    assert not Path(first.stored_at).exists()
    assert ReceivedFile.objects.get(pk=first.pk).resolved == "conflict resolved: processed copy kept by rita"
    # this copy wins: it arrives again and the image is processed again from it
    winner = pydicom.dcmread(second.stored_at).ImageComments
    code, out, _ = run_cli("resolve", str(second.pk), "--winner", "this")
    assert code == 0 and "resolved" in out
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    image.refresh_from_db()
    assert image.status == Status.DONE and image.path.endswith(winner)
    assert run_cli("files") == (0, "", "")  # nothing open
