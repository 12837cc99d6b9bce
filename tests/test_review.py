"""Roles, the review page of a quarantined image, site blanking rules and the same verbs everywhere
(web, API, CLI), through Django's test client and `sendit` called in-process."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.contrib.auth.models import User
from django.test import Client
from PIL import Image as PILImage

from sendit.deid.recipe import parse_recipe
from sendit.relay.models import BlankingRule, Event, Image, Series, Status
from sendit.relay.roles import assign
from sendit.web import tokens
from tests.helpers import ingest_and_run, run_cli, write_ultrasound

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _ocr_off(reconfigure: Any) -> None:
    """The synthetic ultrasound holds no text: with OCR off the filter's flag alone quarantines it, as
    on a site without tesseract (with OCR on it would be released)."""
    reconfigure(OCR=False)


def account(name: str, role: str | None) -> User:
    user = User.objects.create_user(name, password=PASSWORD)
    if role:
        assign(user, role)
    return user


def client_for(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def quarantined_ultrasound(folders: dict[str, Path], name: str = "us", **kwargs: object) -> Image:
    write_ultrasound(folders["INPUT_FOLDER"] / name / "1.dcm", **kwargs)  # type: ignore[arg-type]
    ingest_and_run(folders["INPUT_FOLDER"])
    image = Image.objects.get(status=Status.QUARANTINED, series__modality="US", path__startswith=name + "/")
    assert "Ultrasound without a known layout" in image.reason
    return image


def delivered(folders: dict[str, Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folders["OUTPUT_FOLDER"].rglob("*")) if p.is_file()]


# --- roles ----------------------------------------------------------------------------------------


def test_each_role_may_do_only_its_actions_in_the_web_and_the_api(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sendit.relay.tasks.enqueue", lambda ids: len(ids))
    image = quarantined_ultrasound(sendit_dirs)
    series = image.series
    viewer, operator, reviewer = account("vera", "viewer"), account("otto", "operator"), account("rita", "reviewer")
    # a viewer sees the dashboard and the series, without buttons, and every action is refused
    page = client_for(viewer).get(f"/series/{series.pk}/").content.decode()
    assert "QUARANTINED" in page and f"/series/{series.pk}/retry" not in page
    assert 'data-actions=""' in client_for(viewer).get("/").content.decode()
    for action in ("retry", "release", "discard"):
        assert client_for(viewer).post(f"/series/{series.pk}/{action}").status_code == 403
    # a token-only script account acts with its role: an operator retries and releases, never discards
    script = User.objects.create_user("nightly")  # no password: token only
    assign(script, "operator")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {tokens.issue(script)}"}
    refused = Client().post(f"/api/series/{series.pk}/discard", **auth)
    assert refused.status_code == 403 and "reviewer" in refused.json()["detail"]
    assert Image.objects.get(pk=image.pk).status == Status.QUARANTINED
    assert client_for(operator).post(f"/series/{series.pk}/discard").status_code == 403
    assert Client().post(f"/api/series/{series.pk}/release", **auth).json()["changed"] == 1
    assert Image.objects.get(pk=image.pk).status == Status.NEW
    # the operator's pages offer retry and release; the reviewer's also discard
    assert 'data-actions="retry release"' in client_for(operator).get("/").content.decode()
    assert 'data-actions="retry release discard"' in client_for(reviewer).get("/").content.decode()
    # an account without a role (made before roles, or by hand) is a viewer: the API refuses its actions
    plain = User.objects.create_user("plain")
    plain_auth = {"HTTP_AUTHORIZATION": f"Bearer {tokens.issue(plain)}"}
    assert Client().post(f"/api/series/{series.pk}/retry", **plain_auth).status_code == 403
    assert Client().get(f"/api/series/{series.pk}", **plain_auth).status_code == 200


def test_createuser_checks_the_name_and_the_password_and_sets_the_role(sendit_dirs: dict[str, Path]) -> None:
    code, _, err = run_cli("createuser", "bad name!", "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 2 and "user name refused" in err
    code, _, err = run_cli("createuser", "dora", "--password-stdin", stdin="12345678\n")
    assert code == 2 and "password refused" in err and "too short" in err
    code, _, err = run_cli("createuser", "dora", "--password-stdin", stdin="481516234200\n")
    assert code == 2 and "entirely numeric" in err
    assert not User.objects.filter(username="dora").exists()
    code, out, _ = run_cli("createuser", "dora", "--password-stdin", "--role", "operator", stdin=PASSWORD + "\n")
    assert code == 0 and "created user dora (operator)" in out
    dora = User.objects.get(username="dora")
    assert dora.has_perm("relay.change_series") and not dora.has_perm("relay.discard_image")
    assert run_cli("createuser", "dora", "--role", "reviewer")[0] == 0
    assert User.objects.get(username="dora").has_perm("relay.discard_image")
    assert run_cli("createuser", "eve", "--no-password")[0] == 0  # no role given: a viewer
    assert not User.objects.get(username="eve").has_perm("relay.change_series")


# --- the review page ------------------------------------------------------------------------------


def test_reviewer_sees_header_and_preview_and_each_look_is_an_event(sendit_dirs: dict[str, Path]) -> None:
    image = quarantined_ultrasound(sendit_dirs, frames=3)
    reviewer = client_for(account("rita", "reviewer"))
    page = reviewer.get(f"/images/{image.pk}/review").content.decode()
    assert "(0010,0010)" in page and "PatientName" in page and "SONO^JANE" in page  # the original's header
    assert "Ultrasound without a known layout" in page  # the rule that fired
    # a sequence is one row with its item count; its items' rows are folded (hidden) below it
    assert re.search(r"ProcedureCodeSequence</td><td>SQ</td><td><button[^>]*>1 item\(s\)", page)
    assert re.search(r'<tr data-depth="1" class="nested" hidden><td[^>]*>\(0008,0100\)</td><td>CodeValue', page)
    assert 'type="range"' in page and 'max="2"' in page  # a slider over the three frames
    assert (
        Event.objects.filter(reason=f"review: original header and preview viewed of image #{image.pk} by rita").count()
        == 1
    )
    png = reviewer.get(f"/images/{image.pk}/preview.png?frame=2")
    assert png.status_code == 200 and png["Content-Type"] == "image/png" and png["Cache-Control"] == "no-store"
    shown = PILImage.open(io.BytesIO(png.content))
    assert shown.size == (64, 48) and shown.getpixel((10, 10)) == (200, 200, 200)
    assert reviewer.get(f"/images/{image.pk}/preview.png?frame=3").status_code == 422
    # a preview fetched without the page (another session) is an event of its own
    again = client_for(User.objects.get(username="rita"))
    assert again.get(f"/images/{image.pk}/preview.png").status_code == 200
    assert Event.objects.filter(reason__startswith=f"review: original preview viewed of image #{image.pk}").count() == 1
    # no one below reviewer sees original data
    for role in ("viewer", "operator"):
        other = client_for(account(f"{role}-user", role))
        assert other.get(f"/images/{image.pk}/review").status_code == 403
        assert other.get(f"/images/{image.pk}/preview.png").status_code == 403
        assert other.post(f"/images/{image.pk}/blank", {"x0": 0, "y0": 0, "x1": 5, "y1": 5}).status_code == 403
    assert (
        "SONO^JANE"
        not in client_for(User.objects.get(username="viewer-user")).get(f"/series/{image.series_id}/").content.decode()
    )


def test_a_drawn_blanking_rule_applies_on_release_and_to_later_images_of_that_layout(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    queued: list[int] = []
    monkeypatch.setattr("sendit.relay.tasks.enqueue", lambda ids: queued.extend(ids) or len(ids))
    image = quarantined_ultrasound(sendit_dirs)
    rita = account("rita", "reviewer")
    reviewer = client_for(rita)
    made = reviewer.post(f"/images/{image.pk}/blank", {"x0": 4, "y0": 2, "x1": 30, "y1": 12}, follow=True)
    rule = BlankingRule.objects.get()
    assert (rule.modality, rule.manufacturer, rule.model_name, rule.rows, rule.columns) == (
        "US",
        "ACME",
        "Sono 1",
        48,
        64,
    )
    page = made.content.decode()
    assert f"blanking rule #{rule.pk} stored" in page
    text = re.search(r'<pre data-testid="filter-text">(.*?)</pre>', page, re.S)
    assert text and "coordinates 4,2,30,12" in text.group(1)
    label = parse_recipe(text.group(1).replace("&quot;", '"'), "shown").filters("graylist")[0]
    assert label.regions == ((4, 2, 30, 12),)  # the text is a valid %filter block
    assert Event.objects.filter(reason=f"review: blanking rule #{rule.pk} drawn of image #{image.pk} by rita").exists()

    released = reviewer.post(f"/images/{image.pk}/release", follow=True)
    message = released.content.decode()
    assert "released 1 image(s)" in message and 'class="info"' in message  # not a green banner
    from sendit.relay.inline import run_inline

    run_inline(queued, workers=1)
    assert Image.objects.get(pk=image.pk).status == Status.DONE
    (out,) = delivered(sendit_dirs)
    pixels = out.pixel_array
    assert (pixels[:, 2:12, 4:30] == 0).all() and (pixels[:, 20:, 40:] == 200).all()
    assert out.BurnedInAnnotation == "NO"

    # a new image of the same layout is blanked at once; another size is still quarantined
    write_ultrasound(
        sendit_dirs["INPUT_FOLDER"] / "later" / "1.dcm",
        frames=1,
        study_uid="1.2.826.0.1.3680043.8.498.201",
        series_uid="1.2.826.0.1.3680043.8.498.202",
        sop_uid="1.2.826.0.1.3680043.8.498.203",
    )
    write_ultrasound(
        sendit_dirs["INPUT_FOLDER"] / "other" / "1.dcm",
        rows=50,
        study_uid="1.2.826.0.1.3680043.8.498.301",
        series_uid="1.2.826.0.1.3680043.8.498.302",
        sop_uid="1.2.826.0.1.3680043.8.498.303",
    )
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert Image.objects.get(path="later/1.dcm").status == Status.DONE
    assert Image.objects.get(path="other/1.dcm").status == Status.QUARANTINED


def test_a_release_that_quarantines_again_says_so(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    queued: list[int] = []
    monkeypatch.setattr("sendit.relay.tasks.enqueue", lambda ids: queued.extend(ids) or len(ids))
    image = quarantined_ultrasound(sendit_dirs)
    reviewer = client_for(account("rita", "reviewer"))
    assert 'data-testid="requarantined"' not in reviewer.get(f"/images/{image.pk}/review").content.decode()
    reviewer.post(f"/images/{image.pk}/release")
    from sendit.relay.inline import run_inline

    run_inline(queued, workers=1)
    assert Image.objects.get(pk=image.pk).status == Status.QUARANTINED
    assert "Quarantined again after a release" in reviewer.get(f"/images/{image.pk}/review").content.decode()
    listed = reviewer.get(f"/api/images?series={image.series_id}").json()["items"][0]
    assert listed["requarantined"] is True


# --- the same verbs on the command line -----------------------------------------------------------


def test_cli_release_and_discard_are_the_dashboards_buttons(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sendit.relay.tasks.enqueue", lambda ids: len(ids))
    image = quarantined_ultrasound(sendit_dirs)
    series = image.series
    code, out, _ = run_cli("release", str(series.pk))
    assert code == 0 and f"series #{series.pk}: released 1 image(s)" in out and "quarantined again" in out
    event = Event.objects.get(image=image, to_status=Status.NEW, from_status=Status.QUARANTINED)
    assert event.reason.startswith("release by cli:") and event.user is None
    Image.objects.filter(pk=image.pk).update(status=Status.QUARANTINED)
    assert run_cli("discard", str(series.pk))[0] == 2  # needs --yes
    assert Image.objects.get(pk=image.pk).status == Status.QUARANTINED
    assert run_cli("discard", str(series.pk), "--yes")[0] == 0
    assert Image.objects.get(pk=image.pk).status == Status.SKIPPED
    code, _, err = run_cli("release", "999999")
    assert code == 1 and "no series 999999; nothing released" in err
    assert Series.objects.filter(pk=series.pk).exists()
