"""Alerts: a webhook receiver on loopback and Django's in-memory mail backend get one PHI-free alert
per series that goes to ERROR or QUARANTINED, per destination silence and per low-space episode."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.core import mail
from django.utils import timezone

from sendit.relay import alerts
from sendit.relay.models import AlertState, Image, Series, Status
from sendit.web import actions
from tests.helpers import WebhookReceiver, demo_into, ingest_and_run

pytestmark = pytest.mark.django_db


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_quarantined_series_alerts_once_by_webhook_and_mail_without_phi(
    sendit_dirs: dict[str, Path], reconfigure: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sendit.relay.tasks.enqueue", lambda ids: len(ids))
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    ds = pydicom.dcmread(written[0])
    phi = [str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber)]
    ds.StudyDate = "2021-13-45"
    ds.save_as(written[0])
    with WebhookReceiver() as hook:
        reconfigure(
            ALERT_WEBHOOK_URL=hook.url, ALERT_EMAIL_TO="pacs-team@example.org", SITE_URL="https://sendit.example"
        )
        ingest_and_run(sendit_dirs["INPUT_FOLDER"])
        series = Series.objects.get(status=Status.QUARANTINED)
        assert alerts.series_alerts() == [series.pk]
        assert alerts.series_alerts() == []  # once per change
        (alert,) = hook.received
        assert alert["event"] == "series_quarantined" and alert["series_id"] == series.pk
        assert alert["url"] == f"https://sendit.example/series/{series.pk}/"
        assert "StudyDate" in str(alert["reason"]) and alert["counts"] == {"DONE": 1, "QUARANTINED": 1}
        (message,) = mail.outbox
        assert message.to == ["pacs-team@example.org"] and f"series #{series.pk} is QUARANTINED" in message.subject
        for value in phi:
            assert value not in json.dumps(alert) and value not in message.body + message.subject
        # a retry takes it out of quarantine; when it is quarantined again, that alerts again
        reviewer = actions.CommandLineUser("ops")
        actions.perform("retry", series, reviewer)
        alerts.series_alerts()
        Image.objects.filter(series=series, status=Status.NEW).update(status=Status.QUARANTINED)
        Series.objects.filter(pk=series.pk).update(status=Status.QUARANTINED)
        assert alerts.series_alerts([series.pk]) == [series.pk]
        assert len(hook.received) == 2


def test_no_channel_configured_sends_nothing(sendit_dirs: dict[str, Path]) -> None:
    demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=1)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    Series.objects.update(status=Status.ERROR)
    assert alerts.series_alerts() == [] and alerts.condition_alerts() == [] and mail.outbox == []


def test_a_silent_destination_alerts_after_the_minutes_once_per_episode(
    sendit_dirs: dict[str, Path], reconfigure: Any
) -> None:
    with WebhookReceiver() as hook:
        reconfigure(ALERT_WEBHOOK_URL=hook.url, ORTHANC_URL=f"http://127.0.0.1:{closed_port()}", ORTHANC_TIMEOUT=2)
        assert alerts.condition_alerts() == []  # the episode starts; not yet N minutes
        AlertState.objects.filter(name="destination:orthanc-rest").update(since=timezone.now() - timedelta(minutes=11))
        assert alerts.condition_alerts() == ["destination:orthanc-rest"]
        assert alerts.condition_alerts() == []
        (alert,) = hook.received
        assert alert["event"] == "destination_unreachable" and alert["destination"] == "orthanc-rest"
        reconfigure(ORTHANC_URL="")  # it is gone (or answers again): the episode ends
        alerts.condition_alerts()
        assert not AlertState.objects.filter(name="destination:orthanc-rest").exists()


def test_low_space_alerts_once(sendit_dirs: dict[str, Path], reconfigure: Any) -> None:
    with WebhookReceiver() as hook:
        reconfigure(ALERT_WEBHOOK_URL=hook.url, LOW_SPACE_MB=1 << 30)  # more than any disk here
        assert alerts.condition_alerts() == ["disk"]
        assert alerts.condition_alerts() == []
        assert hook.received[0]["event"] == "disk_low" and "DATA_DIR" in hook.received[0]["folders"]
