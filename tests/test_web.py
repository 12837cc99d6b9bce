"""The operator's window through Django's test client: logins, CSRF, permissions, actions, API, metrics, scale."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.db.models import Model
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from sendit.relay.inline import run_inline
from sendit.relay.models import Event, Image, Series, SeriesIdentifiers, Status, Study
from sendit.web import tokens
from sendit.web.api import api
from tests.helpers import demo_into, ingest_and_run, statuses

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def no_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request computes afresh (the dashboard caches the chart and destination checks for seconds)."""
    from sendit.web import overview

    monkeypatch.setattr(overview, "THROUGHPUT_CACHE_SECONDS", 0.0)
    monkeypatch.setattr(overview, "_destinations_cache", None)


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Series the web queued for the workers (recorded instead of sent to the queue)."""
    calls: list[int] = []
    monkeypatch.setattr("sendit.relay.tasks.enqueue", lambda ids: calls.extend(ids) or len(calls))
    return calls


@pytest.fixture
def alice() -> User:
    from sendit.relay.roles import assign

    user = User.objects.create_user("alice", password=PASSWORD)
    assign(user, "reviewer")  # may act: retry, release, discard
    return user


@pytest.fixture
def browser(alice: User) -> Client:
    """A logged-in client that, like a browser, must send the CSRF token with every POST."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    return client


def csrf_of(client: Client, url: str = "/") -> str:
    page = client.get(url)
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())
    assert match, "the page carries no CSRF token"
    return match.group(1)


def quarantine_case(folders: dict[str, Path]) -> Series:
    """A demo series in which one file has a malformed StudyDate: the engine quarantines it."""
    written = demo_into(folders["INPUT_FOLDER"], patients=1, images=2)
    broken = pydicom.dcmread(written[0])
    broken.StudyDate = "2021-13-45"
    broken.save_as(written[0])
    ingest_and_run(folders["INPUT_FOLDER"])
    image = Image.objects.get(status=Status.QUARANTINED)
    assert "StudyDate" in image.reason
    return image.series


def fix_date(folders: dict[str, Path], image: Image) -> None:
    """What an operator does before retrying: repair the file that was set aside in quarantine."""
    path = folders["QUARANTINE_FOLDER"] / image.path
    ds = pydicom.dcmread(path)
    ds.StudyDate = "20210301"
    ds.save_as(path)


# --- login everywhere -----------------------------------------------------------------------------


def api_operations() -> Iterator[tuple[str, str]]:
    for route, methods in api.get_openapi_schema()["paths"].items():
        for method in methods:
            yield method.upper(), re.sub(r"\{[^}]+\}", "1", route)


PAGES = [
    "/",
    "/series/",
    "/series/1/",
    "/images/1/review",
    "/images/1/preview.png",
    "/files/",
    "/files/1/download",
    "/api/docs",
    "/api/openapi.json",
    "/metrics",
    "/static/web/live.js",
]
ACTIONS = [
    "/series/1/retry",
    "/series/1/release",
    "/series/1/discard",
    "/series/1/retry-now",
    "/images/1/release",
    "/images/1/discard",
    "/images/1/blank",
    "/series/bulk/retry",
    "/files/1/retry",
    "/files/1/discard",
    "/files/1/resolve",
]


def test_anonymous_requests_are_refused_everywhere_but_health() -> None:
    Series.objects.create(id=1, study=Study.objects.create(study_uid="1.2.3"), series_uid="1.2.3.4")
    client = Client(enforce_csrf_checks=True)
    for url in PAGES:
        response = client.get(url, HTTP_ACCEPT="text/html")
        assert response.status_code == 302 and response["Location"].startswith("/login/?next="), url
        assert client.get(url, HTTP_ACCEPT="application/json").status_code in (302, 401), url
    for url in ACTIONS:
        assert client.post(url).status_code == 403, url  # CSRF first; with a token it would go to the login
    operations = list(api_operations())
    assert len(operations) >= 9
    for method, url in operations:
        response = client.generic(method, url, HTTP_ACCEPT="application/json")
        assert response.status_code in (401, 403), (method, url)
    # every route of the project is covered by the lists above (admin has its own login)
    from sendit.server.urls import urlpatterns

    routes = {str(p.pattern) for p in urlpatterns}
    assert routes == {
        "",
        "series/",
        "series/bulk/<str:action>",
        "series/<int:series_id>/",
        "series/<int:series_id>/<str:action>",
        "images/<int:image_id>/review",
        "images/<int:image_id>/preview.png",
        "images/<int:image_id>/<str:action>",
        "files/",
        "files/<int:file_id>/download",
        "files/<int:file_id>/<str:action>",
        "login/",
        "logout/",
        "api/",
        "metrics",
        "health",
        "admin/",
        "^static/(?P<path>.*)$",
    }
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/login/").status_code == 200


def test_login_form_with_csrf_then_the_dashboard(alice: User) -> None:
    client = Client(enforce_csrf_checks=True)
    token = csrf_of(client, "/login/")
    refused = client.post("/login/", {"username": "alice", "password": "wrong", "csrfmiddlewaretoken": token})
    assert b"didn't match" in refused.content
    assert client.post("/login/", {"username": "alice", "password": PASSWORD}).status_code == 403  # no CSRF token
    response = client.post(
        "/login/", {"username": "alice", "password": PASSWORD, "csrfmiddlewaretoken": token, "next": "/series/"}
    )
    assert response.status_code == 302 and response["Location"] == "/series/"
    page = client.get("/")
    assert page.status_code == 200 and b"Dashboard" in page.content and b"alice" in page.content
    docs = client.get("/api/docs").content.decode()  # the OpenAPI page, its assets served locally
    script = re.search(r'src="(/static/ninja/swagger-ui-bundle\.js)"', docs)
    assert script and client.get(script.group(1)).status_code == 200


def test_session_cookies_are_http_only_and_secure_with_https(settings: Any) -> None:
    assert settings.SESSION_COOKIE_HTTPONLY and settings.CSRF_COOKIE_HTTPONLY
    from sendit.config import load_config

    assert load_config(env={"SENDIT_HTTPS": "true", "SENDIT_SECRET_KEY": "x" * 40}).HTTPS is True


# --- actions --------------------------------------------------------------------------------------


def test_retry_needs_csrf_restores_the_file_and_is_recorded_with_the_user(
    sendit_dirs: dict[str, Path], browser: Client, alice: User, queued: list[int]
) -> None:
    series = quarantine_case(sendit_dirs)
    image = Image.objects.get(status=Status.QUARANTINED)
    assert (sendit_dirs["QUARANTINE_FOLDER"] / image.path).exists()
    assert browser.post(f"/series/{series.pk}/retry").status_code == 403  # CSRF enforced
    assert Image.objects.get(pk=image.pk).status == Status.QUARANTINED

    fix_date(sendit_dirs, image)
    token = csrf_of(browser, f"/series/{series.pk}/")
    response = browser.post(f"/series/{series.pk}/retry", {"csrfmiddlewaretoken": token, "next": "/"})
    assert response.status_code == 302 and response["Location"] == "/"
    assert Image.objects.get(pk=image.pk).status == Status.NEW
    assert queued == [series.pk]
    event = Event.objects.get(image=image, to_status=Status.NEW, from_status=Status.QUARANTINED)
    assert event.user == alice and event.reason == "retry by alice"
    assert (sendit_dirs["INPUT_FOLDER"] / image.path).exists()  # back where it arrived
    assert "retried 1 image(s)" in browser.get("/").content.decode()  # the message after the redirect

    run_inline(queued, workers=1)  # what a worker does with the queued series
    assert Image.objects.get(pk=image.pk).status == Status.DONE
    page = browser.get(f"/series/{series.pk}/").content.decode()
    assert "retry by alice" in page and ">alice<" in page  # the event log names the user


def test_release_never_sends_an_image_that_still_fails_deidentification(
    sendit_dirs: dict[str, Path], browser: Client, queued: list[int]
) -> None:
    series = quarantine_case(sendit_dirs)
    image = Image.objects.get(status=Status.QUARANTINED)
    outputs = sorted(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))
    token = csrf_of(browser, f"/series/{series.pk}/")
    browser.post(f"/series/{series.pk}/release", {"csrfmiddlewaretoken": token})
    assert Image.objects.get(pk=image.pk).status == Status.NEW
    run_inline(queued, workers=1)
    image.refresh_from_db()
    assert image.status == Status.QUARANTINED and "StudyDate" in image.reason  # quarantined again, not sent
    assert sorted(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm")) == outputs


def test_discard_skips_with_the_user_and_deletes_the_quarantined_file(
    sendit_dirs: dict[str, Path], browser: Client, alice: User, queued: list[int]
) -> None:
    series = quarantine_case(sendit_dirs)
    image = Image.objects.get(status=Status.QUARANTINED)
    token = csrf_of(browser, f"/series/{series.pk}/")
    browser.post(f"/series/{series.pk}/discard", {"csrfmiddlewaretoken": token})
    image.refresh_from_db()
    assert image.status == Status.SKIPPED and image.reason == "discarded by alice"
    assert Event.objects.get(image=image, to_status=Status.SKIPPED).user == alice
    assert not (sendit_dirs["QUARANTINE_FOLDER"] / image.path).exists()
    assert queued == []
    assert Series.objects.get(pk=series.pk).status == Status.DONE  # nothing left that needs a person


# --- the series page and the identifier response --------------------------------------------------


def test_identifier_response_is_shown_only_with_its_permission(sendit_dirs: dict[str, Path]) -> None:
    from sendit.relay.roles import assign

    operator = User.objects.create_user("olga", password=PASSWORD)
    assign(operator, "operator")
    browser = Client()
    browser.force_login(operator)
    demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    series = Series.objects.first()
    assert series is not None
    pseudonym = SeriesIdentifiers.objects.get(series=series).response["patient_id"]
    page = browser.get(f"/series/{series.pk}/").content.decode()
    assert pseudonym not in page and "Hidden: it maps people to pseudonyms" in page
    assert "DONE" in page and "de-identifying" in page  # states and time per stage
    assert pseudonym not in browser.get(f"/api/series/{series.pk}").content.decode()

    assign(operator, "reviewer")  # the reviewer's role holds the permission
    allowed = Client()
    allowed.force_login(User.objects.get(pk=operator.pk))
    assert pseudonym in allowed.get(f"/series/{series.pk}/").content.decode()
    assert Event.objects.filter(series=series, reason="identifier response viewed by olga", user=operator).count() == 1


# --- API and metrics ------------------------------------------------------------------------------


def test_api_token_lists_filters_and_retries_without_a_session(
    sendit_dirs: dict[str, Path], alice: User, queued: list[int]
) -> None:
    series = quarantine_case(sendit_dirs)
    key = tokens.issue(alice)
    client = Client(enforce_csrf_checks=True)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    assert client.get("/api/series", HTTP_AUTHORIZATION="Bearer sndt_wrong").status_code == 401
    listed = client.get("/api/series?status=QUARANTINED", **auth).json()
    assert listed["count"] == 1 and listed["items"][0]["id"] == series.pk
    assert listed["items"][0]["counts"] == {"DONE": 1, "QUARANTINED": 1}
    images = client.get(f"/api/images?series={series.pk}&status=QUARANTINED&size=1", **auth).json()
    assert images["count"] == 1 and images["size"] == 1 and "path" not in images["items"][0]
    assert client.get("/api/status", **auth).json()["QUARANTINED"] == 1
    result = client.post(f"/api/series/{series.pk}/retry", **auth).json()
    assert result["changed"] == 1 and queued == [series.pk]
    assert Event.objects.get(to_status=Status.NEW, from_status=Status.QUARANTINED).user == alice
    assert client.get("/api/openapi.json", **auth).json()["info"]["title"] == "Sendit"
    # a session without the CSRF token may read but not act
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    assert browser.get("/api/series").status_code == 200
    assert browser.post(f"/api/series/{series.pk}/discard").status_code == 403


def test_metrics_parse_with_prometheus_client(sendit_dirs: dict[str, Path], alice: User) -> None:
    quarantine_case(sendit_dirs)
    key = tokens.issue(alice)
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(response.content.decode())}
    images = {s.labels["status"]: s.value for s in families["sendit_images"].samples}
    assert images["DONE"] == statuses()[Status.DONE] == 3 and images["QUARANTINED"] == 1
    for name in (
        "sendit_build_info",
        "sendit_stage_duration_seconds",
        "sendit_retries",
        "sendit_problem_images",
        "sendit_queue_pending_tasks",
        "sendit_workers_alive",
        "sendit_destination_up",
        "sendit_images_done",
    ):
        assert name in families, name
    stages = {s.labels["stage"] for s in families["sendit_stage_duration_seconds"].samples}
    assert {"queued", "de-identifying", "delivering", "verifying"} == stages
    reasons = families["sendit_problem_images"].samples
    assert [s.labels["status"] for s in reasons] == ["QUARANTINED"]
    assert "PatientID" not in response.content.decode()


def test_dashboard_snapshot_shows_service_state(sendit_dirs: dict[str, Path], browser: Client) -> None:
    from sendit.web.heartbeat import beat

    quarantine_case(sendit_dirs)
    beat("host:123", timezone.now())
    data = browser.get("/api/dashboard").json()
    assert data["counts"]["DONE"] == 3 and data["counts"]["QUARANTINED"] == 1
    assert sum(point["n"] for point in data["throughput"]["hour"]) == 3 and len(data["throughput"]["day"]) == 24
    assert sum(point["n"] for point in data["throughput"]["day"]) == 3
    assert [w["name"] for w in data["workers"]["alive"]] == ["host:123"]
    assert [d["reachable"] for d in data["destinations"]] == [True]  # the output folder
    assert data["disk"]["free_bytes"] > 0
    assert data["attention"]["series"][0]["quarantined"] == 1
    assert data["recent"][0]["total"] == 2


# --- query counts do not grow with the data -------------------------------------------------------


def insert_select(model: type[Model], given: dict[str, str], source: str, params: list[Any]) -> None:
    """INSERT INTO model's table SELECT …: ``given`` maps columns to SQL over ``source``; the rest take
    their defaults. Hundreds of thousands of rows in one statement, on SQLite and PostgreSQL alike."""
    columns, values, defaults = [], [], []
    for field in model._meta.concrete_fields:
        if field.primary_key:
            continue
        columns.append(connection.ops.quote_name(field.column))
        if field.column in given:
            values.append(given[field.column])
        else:
            values.append("%s")
            defaults.append(field.get_db_prep_save(field.get_default(), connection))
    table = connection.ops.quote_name(model._meta.db_table)
    sql = f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(values)} {source}"
    with connection.cursor() as cursor:
        cursor.execute(sql, _interleave(given, model, defaults, params))


def _interleave(given: dict[str, str], model: type[Model], defaults: list[Any], params: list[Any]) -> list[Any]:
    """Placeholders in column order: the defaults' and those inside ``given`` expressions, then the source's."""
    ordered: list[Any] = []
    pending = iter(defaults)
    named = iter(params)
    for field in model._meta.concrete_fields:
        if field.primary_key:
            continue
        if field.column in given:
            ordered.extend(next(named) for _ in range(given[field.column].count("%s")))
        else:
            ordered.append(next(pending))
    return ordered + list(named)


def make_images(series_count: int, per_series: int) -> list[int]:
    """Bulk rows: ``series_count`` series of ``per_series`` DONE images, each with its DONE event."""
    study = Study.objects.create(study_uid=f"2.25.{time.monotonic_ns()}")
    series = Series.objects.bulk_create(
        [
            Series(study=study, series_uid=f"{study.study_uid}.{n}", modality="CT", status=Status.DONE)
            for n in range(series_count)
        ]
    )
    now = Image._meta.get_field("created").get_db_prep_value(timezone.now(), connection)
    last = per_series - 1
    numbers = f"WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {last}) SELECT i FROM n"
    insert_select(
        Image,
        {
            "series_id": "s.id",
            "sop_instance_uid": "s.series_uid || '.' || n.i",
            "path": "'x/' || s.id || '/' || n.i",
            "status": "%s",
            "created": "%s",
            "updated": "%s",
        },
        f"FROM relay_series s CROSS JOIN ({numbers}) n WHERE s.study_id = %s",
        [Status.DONE.value, now, now, study.pk],
    )
    insert_select(
        Event,
        {
            "created": "%s",
            "series_id": "i.series_id",
            "image_id": "i.id",
            "from_status": "%s",
            "to_status": "%s",
        },
        "FROM relay_image i JOIN relay_series s ON s.id = i.series_id WHERE s.study_id = %s",
        [now, Status.SENT.value, Status.DONE.value, study.pk],
    )
    return [s.pk for s in series]


URLS = [
    "/",
    "/series/",
    "/series/?status=DONE&page=2",
    "/series/{id}/",
    "/series/{id}/?page=3&events=2",
    "/api/dashboard",
    "/api/status",
    "/api/series?size=20",
    "/api/series/{id}",
    "/api/series/{id}/events",
    "/api/images?series={id}&status=DONE",
    "/api/images?page=3",
    "/metrics",
]


def query_counts(client: Client, series_id: int) -> dict[str, int]:
    counts = {}
    for url in URLS:
        with CaptureQueriesContext(connection) as queries:
            assert client.get(url.format(id=series_id)).status_code == 200, url
        counts[url] = len(queries)
    return counts


def test_queries_per_page_do_not_grow_with_the_data(browser: Client) -> None:
    small = make_images(5, 2)  # 10 images
    few = query_counts(browser, small[0])
    big = make_images(10, 100)  # + 1,000 images
    many = query_counts(browser, big[0])
    assert many == few


def test_scale_200k_images_pages_are_paginated_and_flat(browser: Client, record_property: Callable[..., None]) -> None:
    small = make_images(2, 5)
    baseline = query_counts(browser, small[0])
    started = time.monotonic()
    big = make_images(200, 1000)
    record_property("bulk_create_seconds", round(time.monotonic() - started, 1))
    assert Image.objects.count() == 200_010
    timings = {}
    for url in URLS:
        started = time.monotonic()
        with CaptureQueriesContext(connection) as queries:
            response = browser.get(url.format(id=big[0]))
        timings[url] = round(time.monotonic() - started, 3)
        assert response.status_code == 200, url
        assert len(queries) == baseline[url], (url, [q["sql"] for q in queries])
    record_property("page_seconds", timings)
    print("queries per page", baseline)
    print("200k images: page seconds", timings)
    for url, seconds in timings.items():
        assert seconds < 5, (url, seconds)
    page = browser.get(f"/series/{big[0]}/").content.decode()
    assert page.count("data-image=") == 50 and "Page 1 of 20" in page
    listed = browser.get("/api/images?size=1000").json()
    assert listed["count"] == 200_010 and len(listed["items"]) == 500  # the page size is capped
    assert statuses()[Status.DONE] == 200_010


# --- one app for what the operator sees -------------------------------------------------------------

SRC = Path(__file__).resolve().parent.parent / "src" / "sendit"


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, absolute names (``from sendit import web`` counts as sendit.web)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_relay_never_imports_the_web_layer() -> None:
    """The web sits on top of the relay: a relay module that imports sendit.web runs up the layers."""
    upward = {
        str(path.relative_to(SRC)): sorted(m for m in imported_modules(path) if m.split(".")[:2] == ["sendit", "web"])
        for path in sorted((SRC / "relay").rglob("*.py"))
    }
    assert {name: mods for name, mods in upward.items() if mods} == {}


def test_templates_and_static_files_ship_in_the_wheel() -> None:
    """Every page template and script lives in sendit.web and is named by pyproject's package data."""
    import tomllib

    patterns = tomllib.loads((SRC.parent.parent / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"
    ]["sendit"]
    shipped = {path for pattern in patterns for path in SRC.glob(pattern) if path.is_file()}
    assets = {p for folder in ("templates", "static") for p in (SRC / "web" / folder).rglob("*") if p.is_file()}
    assert {p.relative_to(SRC).as_posix() for p in assets} >= {
        "web/templates/web/dashboard.html",
        "web/static/web/live.js",
    }
    assert assets <= shipped
    assert not (SRC / "relay" / "templates").exists() and not (SRC / "relay" / "static").exists()
