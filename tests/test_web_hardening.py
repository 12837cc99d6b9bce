"""The operator's window when things go wrong (issue 9): failed or stalled scans, full or missing
folders, a database that cannot answer one panel, ids too large for the database, password guessing."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import OperationalError
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from sendit.relay.models import Image, ScanState, Series, Status, Study
from sendit.web import heartbeat, overview, tokens

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"
HUGE = "99999999999999999999999"  # more than a 64-bit integer: SQLite raises OverflowError on it


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No cached chart, destination check or login counters from another test."""
    monkeypatch.setattr(overview, "THROUGHPUT_CACHE_SECONDS", 0.0)
    monkeypatch.setattr(overview, "_destinations_cache", None)
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def alice() -> User:
    from sendit.relay.roles import assign

    user = User.objects.create_user("alice", password=PASSWORD)
    assign(user, "reviewer")  # may act: retry, release, discard
    return user


@pytest.fixture
def browser(alice: User) -> Client:
    client = Client()
    client.force_login(alice)
    return client


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """The throttle's clock, frozen; call it to move time forward (no sleeping)."""
    from sendit.web import throttle

    moment = [1_000_000.0]
    monkeypatch.setattr(throttle, "now", lambda: moment[0])

    def advance(seconds: float) -> None:
        moment[0] += seconds

    return advance


def metrics(client: Client) -> dict[str, list[Any]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {f.name: f.samples for f in text_string_to_metric_families(response.content.decode())}


def sample(families: dict[str, list[Any]], name: str, **labels: str) -> float | None:
    for s in families.get(name, []):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


# --- scan health ----------------------------------------------------------------------------------


def test_a_failed_scan_is_shown_on_the_dashboard_in_health_and_in_metrics(
    sendit_dirs: dict[str, Path], reconfigure: Callable[..., None], browser: Client
) -> None:
    reconfigure(LOW_SPACE_MB=0)
    assert Client().get("/health").json() == {"status": "ok"}  # no watcher has ever scanned: nothing to say
    now = timezone.now()
    ScanState.objects.create(
        name="host-a",
        started=now - timedelta(seconds=2),
        finished=now,
        ok=True,
        ignored={"hidden": 3, "in_progress": 1},
    )
    ScanState.objects.create(
        name="host-b",
        started=now,
        finished=now,
        ok=False,
        error="input folder unreadable (PermissionError)",
        failures=4,
    )

    data = browser.get("/api/dashboard").json()
    scans = {s["name"]: s for s in data["scans"]}
    assert scans["host-a"]["ok"] is True and scans["host-a"]["ignored"] == {"hidden": 3, "in_progress": 1}
    assert scans["host-b"]["ok"] is False and scans["host-b"]["failures"] == 4
    assert scans["host-b"]["error"] == "input folder unreadable (PermissionError)"
    page = browser.get("/").content.decode()
    assert "host-b" in page and "input folder unreadable (PermissionError)" in page  # a warning before any script

    health = Client().get("/health")
    assert health.status_code == 200 and health.json() == {"status": "degraded", "problems": ["scan_failed"]}
    assert Client().get("/health?strict=1").status_code == 503  # for monitors that only read the code
    assert "host-b" not in health.content.decode()  # anonymous: problem codes only

    families = metrics(browser)
    assert sample(families, "sendit_scan_ok", host="host-a") == 1
    assert sample(families, "sendit_scan_ok", host="host-b") == 0
    assert sample(families, "sendit_scan_consecutive_failures", host="host-b") == 4
    assert sample(families, "sendit_scan_last_success_timestamp_seconds", host="host-a") == pytest.approx(
        now.timestamp()
    )
    assert sample(families, "sendit_scan_last_success_timestamp_seconds", host="host-b") is None
    assert sample(families, "sendit_ignored_entries", host="host-a", reason="hidden") == 3
    assert sample(families, "sendit_ignored_entries", host="host-a", reason="in_progress") == 1


def test_a_watcher_that_stopped_scanning_degrades_health(
    sendit_dirs: dict[str, Path], reconfigure: Callable[..., None], browser: Client
) -> None:
    reconfigure(LOW_SPACE_MB=0, RESCAN_SECONDS=30)
    recent = timezone.now() - timedelta(seconds=60)
    state = ScanState.objects.create(name="host-a", started=recent, finished=recent, ok=True)
    assert Client().get("/health").json() == {"status": "ok"}  # within 3 x RESCAN_SECONDS

    old = timezone.now() - timedelta(seconds=91)
    ScanState.objects.filter(pk=state.pk).update(started=old, finished=old)
    assert Client().get("/health").json() == {"status": "degraded", "problems": ["scan_stale"]}
    assert browser.get("/api/dashboard").json()["scans"][0]["stale"] is True
    assert "No scan of the input folder by host-a" in browser.get("/").content.decode()


# --- free space -----------------------------------------------------------------------------------


def test_free_space_of_every_folder_with_missing_ones_and_a_low_space_warning(
    sendit_dirs: dict[str, Path], reconfigure: Callable[..., None], browser: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = sendit_dirs["DATA_DIR"] / "not-there"
    reconfigure(QUARANTINE_FOLDER=missing, LOW_SPACE_MB=1)
    # the work folder is its own file system, nearly full; the others share one with room
    real_device, real_usage = overview._device, overview._usage
    work = sendit_dirs["WORK_FOLDER"]
    monkeypatch.setattr(overview, "_device", lambda path: -1 if Path(path) == work else real_device(path))
    monkeypatch.setattr(
        overview,
        "_usage",
        lambda path: SimpleNamespace(total=10 << 20, free=1000) if Path(path) == work else real_usage(path),
    )

    disk = browser.get("/api/dashboard").json()["disk"]
    groups = {tuple(fs["folders"]): fs for fs in disk["filesystems"]}
    assert set(groups) == {("DATA_DIR", "INPUT_FOLDER", "OUTPUT_FOLDER"), ("WORK_FOLDER",)}
    assert groups[("WORK_FOLDER",)]["free_bytes"] == 1000 and groups[("WORK_FOLDER",)]["low"] is True
    assert groups[("DATA_DIR", "INPUT_FOLDER", "OUTPUT_FOLDER")]["low"] is False
    assert disk["missing"] == [{"folder": "QUARANTINE_FOLDER", "path": str(missing), "problem": "missing"}]
    assert disk["free_bytes"] > 0  # DATA_DIR's, as before

    page = browser.get("/").content.decode()
    assert "Low space" in page and "WORK_FOLDER" in page
    assert Client().get("/health").json() == {"status": "degraded", "problems": ["low_space"]}

    families = metrics(browser)
    assert sample(families, "sendit_free_bytes", folder="WORK_FOLDER") == 1000
    assert (sample(families, "sendit_free_bytes", folder="INPUT_FOLDER") or 0) > 1000
    assert sample(families, "sendit_free_bytes", folder="QUARANTINE_FOLDER") is None
    assert sample(families, "sendit_folder_present", folder="QUARANTINE_FOLDER") == 0
    assert sample(families, "sendit_low_space_threshold_bytes") == 1 << 20


def test_missing_folders_show_as_missing_instead_of_failing(
    sendit_dirs: dict[str, Path], reconfigure: Callable[..., None], browser: Client
) -> None:
    gone = sendit_dirs["DATA_DIR"] / "gone"
    reconfigure(
        DATA_DIR=gone,
        INPUT_FOLDER=gone / "in",
        WORK_FOLDER=gone / "w",
        QUARANTINE_FOLDER=gone / "q",
        OUTPUT_FOLDER=None,
    )
    response = browser.get("/api/dashboard")
    assert response.status_code == 200
    disk = response.json()["disk"]
    assert disk["filesystems"] == [] and disk["free_bytes"] is None
    assert [m["folder"] for m in disk["missing"]] == ["DATA_DIR", "INPUT_FOLDER", "WORK_FOLDER", "QUARANTINE_FOLDER"]
    assert overview.space_lines(disk)[0] == f"missing: DATA_DIR ({gone})"  # for `sendit status`
    assert browser.get("/").status_code == 200
    assert metrics(browser)["sendit_images"]  # the rest of /metrics is still there


# --- a panel that cannot be computed --------------------------------------------------------------


def test_a_failing_panel_is_unavailable_and_the_rest_is_shown(
    sendit_dirs: dict[str, Path], browser: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = Study.objects.create(study_uid="1.2")
    series = Series.objects.create(study=study, series_uid="1.2.3", modality="CT")
    Image.objects.create(series=series, sop_instance_uid="1.2.3.4", path="a/1.dcm", status=Status.DONE)

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("database or disk is full")

    monkeypatch.setattr(heartbeat, "alive", full)
    monkeypatch.setattr(overview, "attention", full)
    response = browser.get("/api/dashboard")
    assert response.status_code == 200
    data = response.json()
    assert data["unavailable"] == {"workers": "OperationalError", "attention": "OperationalError"}
    assert data["workers"] is None and data["attention"] is None  # never a false "0 workers"
    assert data["counts"]["DONE"] == 1 and data["recent"][0]["id"] == series.pk
    assert "disk is full" not in response.content.decode()  # the type only, not the message

    page = browser.get("/")
    assert page.status_code == 200
    text = page.content.decode()
    assert re.search(r"workers[^<]*unavailable|unavailable[^<]*workers", text, re.IGNORECASE)
    assert "OperationalError" in text

    monkeypatch.setattr(overview, "status_counts", full)  # the counts too
    data = browser.get("/api/dashboard").json()
    assert data["counts"] is None and data["total"] is None and data["unavailable"]["counts"] == "OperationalError"


# --- ids too large for the database ---------------------------------------------------------------


def test_ids_too_large_for_the_database_are_client_errors(alice: User) -> None:
    series = Series.objects.create(study=Study.objects.create(study_uid="1.2"), series_uid="1.2.3")
    Image.objects.create(series=series, sop_instance_uid="1.2.3.4", path="a", status=Status.QUARANTINED)
    root = User.objects.create_superuser("root", password=PASSWORD)
    client = Client(raise_request_exception=False)
    client.force_login(root)
    requests = [
        ("get", f"/api/images?series={HUGE}"),
        ("get", f"/api/images?series=-{HUGE}"),
        ("get", f"/api/series/{HUGE}"),
        ("get", f"/api/series/{HUGE}/events"),
        ("get", f"/api/series?page={HUGE}&size={HUGE}"),
        ("get", f"/api/images?page=-{HUGE}"),
        ("post", f"/api/series/{HUGE}/retry"),
        ("post", f"/api/series/{series.pk}/retry?image_ids={HUGE}"),
        ("post", f"/api/series/{series.pk}/discard?image_ids=1&image_ids={HUGE}"),
        ("post", f"/api/series/{series.pk}/release?image_ids=-{HUGE}"),
        ("get", f"/series/{HUGE}/"),
        ("get", f"/series/{series.pk}/?page={HUGE}&events=-{HUGE}"),
        ("post", f"/series/{HUGE}/retry"),
        ("get", f"/series/?page={HUGE}"),
        ("get", f"/admin/relay/series/{HUGE}/change/"),
        ("get", f"/admin/relay/image/?series={HUGE}"),
        ("get", f"/admin/relay/image/?series__exact={HUGE}"),
        ("get", f"/admin/relay/event/?series={HUGE}"),
    ]
    for method, url in requests:
        status = getattr(client, method)(url).status_code
        assert status < 500, (url, status)
    assert client.get(f"/api/images?series={HUGE}").status_code in (400, 422)
    assert client.post(f"/api/series/{series.pk}/retry?image_ids={HUGE}").status_code in (400, 422)
    assert Image.objects.get().status == Status.QUARANTINED  # nothing moved


# --- login throttling -----------------------------------------------------------------------------


def login(client: Client, username: str, password: str, address: str = "127.0.0.1") -> Any:
    return client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=address)


def test_repeated_wrong_passwords_lock_the_user_out_for_a_while(
    alice: User, clock: Callable[[float], None], caplog: pytest.LogCaptureFixture
) -> None:
    client = Client()
    for attempt in range(5):
        response = login(client, "alice", f"guess {attempt}", address=f"10.0.0.{attempt}")
        assert response.status_code == 200 and b"didn't match" in response.content
    with caplog.at_level(logging.INFO, logger="sendit"):
        refused = login(client, "alice", "guess 6", address="10.0.0.9")  # the 6th, from yet another address
    assert refused.status_code == 429 and b"Too many failed attempts" in refused.content
    assert int(refused["Retry-After"]) == 30
    assert "try again in 30 s" in refused.content.decode()
    right = login(client, "alice", PASSWORD)  # even the right password, during the lock-out
    assert right.status_code == 429 and "_auth_user_id" not in client.session
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "throttled" in logged and "alice" not in logged  # the name is never logged

    clock(29)
    assert login(client, "alice", PASSWORD).status_code == 429
    clock(2)
    response = login(client, "alice", PASSWORD)
    assert response.status_code == 302 and client.session["_auth_user_id"] == str(alice.pk)


def test_the_admin_login_is_throttled_too(clock: Callable[[float], None]) -> None:
    User.objects.create_superuser("root", password=PASSWORD)
    client = Client()
    for attempt in range(5):
        client.post("/admin/login/", {"username": "root", "password": f"guess {attempt}"})
    client.post("/admin/login/?next=/admin/", {"username": "root", "password": PASSWORD})
    assert "_auth_user_id" not in client.session  # refused, the right password included
    assert login(client, "root", PASSWORD).status_code == 429  # one count for both forms
    clock(31)
    response = client.post("/admin/login/?next=/admin/", {"username": "root", "password": PASSWORD})
    assert response.status_code == 302 and "_auth_user_id" in client.session


def test_the_lock_out_grows_with_each_further_failure(alice: User, clock: Callable[[float], None]) -> None:
    from sendit.web import throttle

    client = Client()
    for attempt in range(5):
        login(client, "alice", f"guess {attempt}")
    assert "try again in 30 s" in login(client, "alice", "x").content.decode()
    clock(31)
    assert login(client, "alice", "still wrong").status_code == 200  # one more try, which fails
    refused = login(client, "alice", PASSWORD)
    assert refused.status_code == 429 and "try again in 60 s" in refused.content.decode()
    clock(61 + throttle.QUIET_SECONDS)  # quiet for the window after the lock-out: forgotten
    for attempt in range(4):
        assert login(client, "alice", f"guess {attempt}").status_code == 200
    assert login(client, "alice", PASSWORD).status_code == 302


def test_one_address_guessing_many_names_is_locked_out(alice: User, clock: Callable[[float], None]) -> None:
    from sendit.web import throttle

    client = Client()
    for n in range(throttle.ADDRESS_LIMIT):
        assert login(client, f"user{n}", "guess", address="10.1.1.1").status_code == 200
    assert login(client, "alice", PASSWORD, address="10.1.1.1").status_code == 429
    assert login(client, "alice", PASSWORD, address="10.1.1.2").status_code == 302  # other addresses are fine


def test_wrong_api_tokens_are_throttled_per_address(alice: User, clock: Callable[[float], None]) -> None:
    from sendit.web import throttle

    key = tokens.issue(alice)
    client = Client()
    for n in range(throttle.ADDRESS_LIMIT):
        assert client.get("/api/status", HTTP_AUTHORIZATION=f"Bearer sndt_wrong{n}").status_code == 401
    refused = client.get("/api/status", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert refused.status_code == 429 and refused["Retry-After"] == "30"
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 429
    assert client.get("/api/status", HTTP_AUTHORIZATION=f"Bearer {key}", REMOTE_ADDR="10.9.9.9").status_code == 200
    clock(31)
    assert client.get("/api/status", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200
