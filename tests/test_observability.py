"""What an operator sees of a running service: the version everywhere, log lines a collector can read
(and no DICOM value in them), one line for a bad Host header, each failed attempt on the series page,
"retry now" (web, API, CLI), `sendit status` during an outage, and `sendit import` with no worker."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from sendit.cli import main
from sendit.relay.ingest import ingest_folder
from sendit.relay.models import Event, Series, Stage, Status
from sendit.relay.pipeline import process_series
from sendit.web import tokens
from tests.helpers import demo_into, ingest_and_run, wait_for
from tests.test_cli import cli_env

VERSION = version("sendit")
NO_WORKER = "no worker is running: start `sendit run` or `sendit worker`, or use --wait"
SECRET = "observability-test-secret-key-0123456789-abc"


@contextmanager
def console() -> Iterator[io.StringIO]:
    """What the configured log handlers write (``LOGGING`` of the settings), for the block."""
    stream = io.StringIO()
    handlers = {
        handler
        for name in ("", "sendit", "django", "django.security")
        for handler in logging.getLogger(name).handlers
        if handler.get_name() in ("console", "security") and isinstance(handler, logging.StreamHandler)
    }
    assert handlers, "LOGGING configures no console handler"
    previous = [(handler, handler.setStream(stream)) for handler in handlers]
    try:
        yield stream
    finally:
        for handler, old in previous:
            handler.setStream(old)


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Series pushed to the queue (recorded instead of sent)."""
    calls: list[int] = []
    monkeypatch.setattr("sendit.relay.tasks.enqueue", lambda ids: calls.extend(ids) or len(calls))
    return calls


def operator(name: str, may_change: bool) -> User:
    user = User.objects.create_user(name, password="correct horse battery staple")
    if may_change:
        user.user_permissions.add(Permission.objects.get(codename="change_series"))
    return User.objects.get(pk=user.pk)  # a fresh object: permissions are cached per instance


def retrying_series(folders: dict[str, Path], reconfigure: Any, patients: int = 1) -> list[Series]:
    """Series whose delivery failed once (the output folder cannot be made: a file is in its way)
    and that wait an hour for their next attempt."""
    blocked = folders["DATA_DIR"] / "out-file"
    blocked.write_text("a file where the output folder should be")
    reconfigure(OUTPUT_FOLDER=blocked / "sub", MAX_ATTEMPTS=3, RETRY_BASE_SECONDS=3600, RETRY_CAP_SECONDS=3600)
    demo_into(folders["INPUT_FOLDER"], patients=patients, images=2)
    for series_id in sorted(ingest_folder(folders["INPUT_FOLDER"]).series_ids):
        assert process_series(series_id).retry_in == 3600
    series = list(Series.objects.order_by("id"))
    assert all(s.stage == Stage.RETRYING and s.next_attempt_at > timezone.now() for s in series)
    return series


def is_due_now(series: Series) -> bool:
    series.refresh_from_db()
    return series.next_attempt_at is not None and series.next_attempt_at <= timezone.now()


# --- the version ----------------------------------------------------------------------------------


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"sendit {VERSION}\n"


@pytest.mark.django_db
def test_build_info_metric_and_the_dashboard_show_the_version(sendit_dirs: dict[str, Path]) -> None:
    alice = operator("alice", may_change=False)
    client = Client()
    metrics = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {tokens.issue(alice)}").content.decode()
    families = {family.name: family for family in text_string_to_metric_families(metrics)}
    [sample] = families["sendit_build_info"].samples
    assert sample.labels == {"version": VERSION} and sample.value == 1
    client.force_login(alice)
    assert f"Sendit {VERSION}" in client.get("/").content.decode()
    assert VERSION not in Client().get("/login/").content.decode()  # not told to anyone who asks


# --- log lines --------------------------------------------------------------------------------------


def test_log_level_and_format_are_checked_at_start() -> None:
    from sendit.config import ConfigError, load_config

    env = {"SENDIT_SECRET_KEY": SECRET, "SENDIT_DATA_DIR": "/tmp/sendit-unused"}
    cfg = load_config(None, env={**env, "SENDIT_LOG_LEVEL": "debug", "SENDIT_LOG_FORMAT": "JSON"})
    assert (cfg.LOG_LEVEL, cfg.LOG_FORMAT) == ("debug", "JSON")
    with pytest.raises(ConfigError) as wrong:
        load_config(None, env={**env, "SENDIT_LOG_LEVEL": "loud", "SENDIT_LOG_FORMAT": "xml"})
    assert [line.split(":")[0] for line in wrong.value.problems] == ["LOG_LEVEL", "LOG_FORMAT"]


def test_json_lines_parse_and_carry_no_dicom_value() -> None:
    from sendit.server.settings import logging_config

    canary = "CANARY^PATIENT^0451"
    try:
        logging.config.dictConfig(logging_config("DEBUG", "json"))
        with console() as out:
            logging.getLogger("sendit.pipeline").debug("series #%s: one\nline", 7)
            logging.getLogger("pydicom").warning("Invalid value for VR PN: '%s'", canary)
            logging.getLogger("pynetdicom.assoc").error("dataset: %s", canary)
            try:
                raise ValueError(f"a message quoting {canary}")
            except ValueError:
                logging.getLogger("huey.consumer").exception("task failed")
    finally:
        logging.config.dictConfig(settings.LOGGING)
    text = out.getvalue()
    assert canary not in text
    entries = [json.loads(line) for line in text.splitlines()]
    assert [e["logger"] for e in entries if e["logger"] != "sendit.dicomio"] == ["sendit.pipeline", "huey.consumer"]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert entries[0]["message"] == "series #7: one\nline" and entries[0]["level"] == "DEBUG"
    failed = entries[-1]
    assert failed["exception"] == "ValueError" and "raise ValueError" in failed["stack"]


@pytest.mark.django_db
def test_a_bad_host_header_is_one_warning_line_without_a_traceback() -> None:
    with console() as out:
        response = Client().get("/health", HTTP_HOST="scanner.example")
    assert response.status_code == 400
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert " WARNING django.security.DisallowedHost: Invalid HTTP_HOST header: 'scanner.example'" in lines[0]
    assert "Traceback" not in out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_a_series_done_is_one_info_line_with_images_and_seconds(sendit_dirs: dict[str, Path]) -> None:
    demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=3)
    with console() as out:
        report = ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    done = [line for line in out.getvalue().splitlines() if " DONE: " in line]
    assert len(done) == len(report.series_ids) >= 1
    series_id = min(report.series_ids)
    line = next(line for line in done if f"series #{series_id} DONE" in line)
    assert " INFO sendit.pipeline: " in line and "DONE: 3 image(s), " in line and line.endswith(" s from first ingest")


# --- failed attempts and retry now ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_each_failed_attempt_is_an_event_and_the_next_attempt_is_shown(
    sendit_dirs: dict[str, Path], reconfigure: Any
) -> None:
    series = retrying_series(sendit_dirs, reconfigure)[0]
    attempts = Event.objects.filter(series=series, from_status="", to_status="").order_by("id")
    [first] = attempts
    assert first.image_id is None and first.reason.startswith("attempt 1 failed: folder: ")
    assert "next in 3600 s" in first.reason
    alice = operator("alice", may_change=False)
    client = Client()
    client.force_login(alice)
    due = series.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S")
    page = client.get(f"/series/{series.pk}/").content.decode()
    assert f"{due} UTC" in page and "attempt 1 failed" in page
    assert due in client.get("/series/").content.decode()
    assert client.get(f"/api/series/{series.pk}").json()["next_attempt_at"] == series.next_attempt_at.isoformat()
    listed = {item["id"]: item for item in client.get("/api/series").json()["items"]}
    assert listed[series.pk]["next_attempt_at"] == series.next_attempt_at.isoformat()
    process_series(series.pk)
    process_series(series.pk)  # the third of MAX_ATTEMPTS = 3: ERROR
    reasons = [event.reason for event in attempts.all()]
    assert [reason.split(":")[0] for reason in reasons] == ["attempt 1 failed", "attempt 2 failed", "attempt 3 failed"]
    assert reasons[-1].endswith("; giving up")
    series.refresh_from_db()
    assert series.status == Status.ERROR and series.next_attempt_at is None


@pytest.mark.django_db(transaction=True)
def test_retry_now_from_the_web_the_api_and_the_cli_moves_the_next_attempt_to_now(
    sendit_dirs: dict[str, Path], reconfigure: Any, queued: list[int]
) -> None:
    by_web, by_api, by_cli, left = retrying_series(sendit_dirs, reconfigure, patients=2)[:4]
    # the web: the button and the action need the permission to change series
    bob = operator("bob", may_change=False)
    client = Client()
    client.force_login(bob)
    assert 'data-testid="retry-now"' not in client.get(f"/series/{by_web.pk}/").content.decode()
    assert client.post(f"/series/{by_web.pk}/retry-now").status_code == 403
    assert (
        client.post(f"/api/series/{by_web.pk}/retry-now", HTTP_AUTHORIZATION=f"Bearer {tokens.issue(bob)}").status_code
        == 403
    )
    assert not is_due_now(by_web)
    alice = operator("alice", may_change=True)
    client.force_login(alice)
    assert 'data-testid="retry-now"' in client.get(f"/series/{by_web.pk}/").content.decode()
    response = client.post(f"/series/{by_web.pk}/retry-now", {"next": f"/series/{by_web.pk}/"})
    assert response.status_code == 302 and is_due_now(by_web) and queued == [by_web.pk]
    assert Event.objects.filter(series=by_web, reason="retry now requested by alice", user=alice).count() == 1
    # the API
    answer = Client().post(f"/api/series/{by_api.pk}/retry-now", HTTP_AUTHORIZATION=f"Bearer {tokens.issue(alice)}")
    assert answer.status_code == 200 and answer.json()["changed"] == 1
    assert is_due_now(by_api) and queued == [by_web.pk, by_api.pk]
    # the command line, by id, once the cause is fixed; the other series keeps waiting
    reconfigure(OUTPUT_FOLDER=sendit_dirs["OUTPUT_FOLDER"])
    assert main(["retry", "--now", str(by_cli.pk)]) == 0
    assert is_due_now(by_cli) and queued[-1] == by_cli.pk and not is_due_now(left)
    # a series that is not waiting: nothing to do, said so
    again = Client().post(f"/api/series/{by_api.pk}/retry-now", HTTP_AUTHORIZATION=f"Bearer {tokens.issue(alice)}")
    assert again.json()["changed"] == 0


# --- status and import ----------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on (a PACS that is down: the connection is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.django_db(transaction=True)
def test_status_shows_the_problems_and_an_unreachable_destination(
    sendit_dirs: dict[str, Path], reconfigure: Any, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = sendit_dirs["DATA_DIR"] / "out-file"
    blocked.write_text("a file where the output folder should be")
    reconfigure(OUTPUT_FOLDER=blocked / "sub", MAX_ATTEMPTS=1)
    demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])  # ERROR: the output folder could not be written
    reconfigure(OUTPUT_FOLDER=sendit_dirs["OUTPUT_FOLDER"], SEND_TO_ORTHANC=True, ORTHANC_PORT=closed_port)
    capsys.readouterr()
    assert main(["status"]) == 0
    plain = capsys.readouterr().out
    assert "destination folder: reachable" in plain
    assert "destination orthanc-dicom: UNREACHABLE: " in plain and f"127.0.0.1:{closed_port}" in plain
    assert "problems (files that did not end DONE, by reason):" in plain
    assert "ERROR" in plain and "folder write failed" in plain
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    states = {state["name"]: state for state in report["destinations"]}
    assert states["folder"] == {"name": "folder", "reachable": True, "problem": ""}
    assert not states["orthanc-dicom"]["reachable"] and f"127.0.0.1:{closed_port}" in states["orthanc-dicom"]["problem"]
    assert any(status == "ERROR" and "folder write failed" in reason for status, reason, _ in report["problems"])


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung PACS)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.mark.slow  # waits out the short time-out of the check
@pytest.mark.timeout(60)
@pytest.mark.django_db(transaction=True)
def test_status_does_not_hang_on_a_destination_that_never_answers(
    sendit_dirs: dict[str, Path], reconfigure: Any, silent_peer: int, capsys: pytest.CaptureFixture[str]
) -> None:
    reconfigure(SEND_TO_ORTHANC=True, ORTHANC_PORT=silent_peer, ORTHANC_TIMEOUT=600)
    assert main(["status", "--json"]) == 0
    states = {state["name"]: state for state in json.loads(capsys.readouterr().out)["destinations"]}
    assert states["folder"]["reachable"] and not states["orthanc-dicom"]["reachable"]
    assert states["orthanc-dicom"]["problem"]


@pytest.mark.django_db(transaction=True)
def test_import_without_a_running_worker_says_so(
    sendit_dirs: dict[str, Path], queued: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    from sendit.web.heartbeat import beat

    first, second = sendit_dirs["DATA_DIR"] / "first", sendit_dirs["DATA_DIR"] / "second"
    demo_into(first, patients=1, images=1)
    assert main(["import", str(first)]) == 0
    assert NO_WORKER in capsys.readouterr().err and queued
    beat("host:1234", timezone.now())  # a worker seen just now
    demo_into(second, patients=1, images=1)
    assert main(["import", str(second)]) == 0
    assert NO_WORKER not in capsys.readouterr().err


# --- the real commands ----------------------------------------------------------------------------


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    (tmp_path / "sendit.toml").write_text(f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\nRETRY_BASE_SECONDS = 0\n')
    return tmp_path


@pytest.mark.slow
def test_json_logs_of_a_real_import_parse_and_carry_no_dicom_value(configured: Path) -> None:
    written = demo_into(configured / "incoming", patients=2, images=2)
    secrets: set[str] = set()
    for path in written:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        secrets |= {str(ds.PatientID), str(ds.PatientName), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)}
    env = cli_env(configured, SENDIT_LOG_FORMAT="json", SENDIT_LOG_LEVEL="DEBUG")
    result = subprocess.run(
        [sys.executable, "-m", "sendit", "import", str(configured / "incoming"), "--wait"],
        cwd=configured,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    done = [e for e in entries if e["logger"] == "sendit.pipeline" and " DONE: " in e["message"]]
    assert done and all(e["level"] == "INFO" for e in done)
    shape = re.compile(r"series #\d+ DONE: (\d+) image\(s\), [\d.]+ s from first ingest")
    assert sum(int(shape.fullmatch(e["message"]).group(1)) for e in done) == len(written)  # type: ignore[union-attr]
    assert not [s for s in secrets if s in result.stderr + result.stdout]
    version_line = subprocess.run(
        [sys.executable, "-m", "sendit", "--version"], env=env, capture_output=True, text=True, timeout=60
    )
    assert version_line.stdout.strip() == f"sendit {VERSION}"


@pytest.mark.slow
def test_worker_says_when_it_starts_and_stops(configured: Path) -> None:
    out = configured / "worker.log"
    with open(out, "w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "sendit", "worker", "--workers", "1"],
            cwd=configured,
            env=cli_env(configured, SENDIT_LOG_FORMAT="json"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            assert wait_for(lambda: "worker started" in out.read_text(), 60, every=0.2), out.read_text()
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)
    entries = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    mine = [e["message"] for e in entries if e["logger"] == "sendit.worker"]
    assert mine[0].startswith(f"sendit {VERSION} worker started: 1 processes")
    assert mine[-1].startswith("sendit worker stopped")
    assert all(e["level"] == "INFO" for e in entries if e["logger"] == "sendit.worker")
