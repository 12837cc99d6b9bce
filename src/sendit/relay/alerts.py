"""Alerts by webhook (a JSON POST) and e-mail (Django's mail backends) when a person is needed:

- a series goes to ERROR or QUARANTINED (once per change of its status, whichever worker sees it);
- a destination has not answered for ALERT_UNREACHABLE_MINUTES;
- a file system Sendit writes has less than LOW_SPACE_MB free.

No PHI: an alert names the series by its database id, its counts per status and the reason of one
image (reasons are written PHI-free), a destination by its name, a file system by its folder keys;
the link goes to the series page (SITE_URL + path), which needs a login. The webhook URL is a secret
(it often holds a token) and is never logged.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.db.models import Count, F
from django.utils import timezone

from sendit.relay import runtime
from sendit.relay.models import AlertState, Image, Series, Status

log = logging.getLogger("sendit.alerts")

ALERTING = (Status.ERROR, Status.QUARANTINED)
WEBHOOK_TIMEOUT_SECONDS = 5.0
WEBHOOK_ATTEMPTS = 2
MIB = 1 << 20


def enabled() -> bool:
    cfg = runtime.config()
    return bool(cfg.ALERT_WEBHOOK_URL or cfg.ALERT_EMAIL_TO.strip())


def link(path: str) -> str:
    return runtime.config().SITE_URL.rstrip("/") + path


def send(alert: dict[str, Any]) -> list[str]:
    """Deliver one alert to every configured channel; returns what failed (no URLs, no values)."""
    cfg = runtime.config()
    problems: list[str] = []
    if cfg.ALERT_WEBHOOK_URL:
        import httpx

        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                response = httpx.post(cfg.ALERT_WEBHOOK_URL, json=alert, timeout=WEBHOOK_TIMEOUT_SECONDS)
                if response.status_code < 300:
                    break
                problem = f"webhook answered HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"webhook failed ({type(exc).__name__})"
            if attempt == WEBHOOK_ATTEMPTS:
                problems.append(problem)
            else:
                time.sleep(1)
    recipients = [address.strip() for address in cfg.ALERT_EMAIL_TO.split(",") if address.strip()]
    if recipients:
        from django.core.mail import send_mail

        body = "\n".join(f"{key}: {value}" for key, value in alert.items() if key != "title")
        try:
            send_mail(f"[sendit] {alert['title']}", body, cfg.ALERT_EMAIL_FROM, recipients)
        except Exception as exc:
            problems.append(f"e-mail failed ({type(exc).__name__})")
    for problem in problems:
        log.warning("alert %s not delivered: %s", alert["event"], problem)
    if not problems:
        log.info("alert %s sent", alert["event"])
    return problems


def _series_alert(series: Series) -> dict[str, Any]:
    counts = dict(
        Image.objects.filter(series=series).values_list("status").annotate(n=Count("id")).values_list("status", "n")
    )
    reason = (
        Image.objects.filter(series=series, status=series.status)
        .order_by("id")
        .values_list("reason", flat=True)
        .first()
    )
    return {
        "source": "sendit",
        "event": f"series_{series.status.lower()}",
        "title": f"series #{series.pk} is {series.status}",
        "series_id": series.pk,
        "status": series.status,
        "counts": counts,
        "reason": reason or series.last_error,
        "url": link(f"/series/{series.pk}/"),
        "time": timezone.now().isoformat(),
    }


def series_alerts(series_ids: list[int] | None = None) -> list[int]:
    """Alert for series that went to ERROR or QUARANTINED; returns the series alerted here.

    1. Forget the alert of series that left those statuses (a retry): the next failure alerts again.
    2. Find series (of ``series_ids``, or all) in ERROR or QUARANTINED not yet alerted for that status.
    3. For each, an UPDATE naming the status seen and the alert status seen: one process wins.
    4. The winner sends the alert.
    """
    if not enabled():
        return []
    scope = Series.objects.all() if series_ids is None else Series.objects.filter(pk__in=series_ids)
    scope.exclude(status__in=ALERTING).exclude(alerted_status="").update(alerted_status="")
    due = list(scope.filter(status__in=ALERTING).exclude(alerted_status=F("status")))
    sent = []
    for series in due:
        won = Series.objects.filter(pk=series.pk, status=series.status, alerted_status=series.alerted_status).update(
            alerted_status=series.status
        )
        if won != 1:
            continue  # another worker alerted (or the status moved on): nothing to do here
        send(_series_alert(series))
        sent.append(series.pk)
    return sent


def _episode(name: str, active: bool, after: timedelta, alert: dict[str, Any]) -> bool:
    """One alert per episode of a lasting condition: it must hold for ``after``; only the process
    whose UPDATE marks it sent sends it. An episode ends (its row is deleted) when the condition does."""
    if not active:
        AlertState.objects.filter(name=name).delete()
        return False
    now = timezone.now()
    AlertState.objects.bulk_create([AlertState(name=name, since=now)], ignore_conflicts=True)
    # names "not sent yet": of two processes, the first UPDATE wins and the other changes nothing
    if AlertState.objects.filter(name=name, sent__isnull=True, since__lte=now - after).update(sent=now) != 1:
        return False
    send(alert)
    return True


def low_file_systems() -> list[list[str]]:
    """The folder keys of each file system below LOW_SPACE_MB (0 = never low)."""
    cfg = runtime.config()
    threshold = int(cfg.LOW_SPACE_MB) * MIB
    if threshold <= 0:
        return []
    low: dict[int, bool] = {}
    folders: dict[int, list[str]] = {}
    for name in ("DATA_DIR", "INPUT_FOLDER", "WORK_FOLDER", "QUARANTINE_FOLDER", "OUTPUT_FOLDER"):
        value = getattr(cfg, name, None)
        if value is None:
            continue
        try:
            device = os.stat(Path(value)).st_dev
            if device not in low:
                low[device] = shutil.disk_usage(value).free < threshold
        except OSError:
            continue  # a missing folder is the dashboard's warning, not a space alert
        if low[device]:
            folders.setdefault(device, []).append(name)
    return list(folders.values())


def condition_alerts() -> list[str]:
    """Destinations silent for ALERT_UNREACHABLE_MINUTES and file systems low on space; returns the
    names of the alerts sent here."""
    if not enabled():
        return []
    cfg = runtime.config()
    sent = []
    minutes = int(cfg.ALERT_UNREACHABLE_MINUTES)
    destinations = runtime.all_destinations() if minutes > 0 else []
    names = [f"destination:{destination.name}" for destination in destinations]
    # a destination no longer configured ends its episode
    AlertState.objects.filter(name__startswith="destination:").exclude(name__in=names).delete()
    if destinations:
        for destination in destinations:
            try:
                problem = destination.check()
            except Exception as exc:
                problem = f"check failed: {type(exc).__name__}"
            finally:
                destination.close()
            name = f"destination:{destination.name}"
            alert: dict[str, Any] = {
                "source": "sendit",
                "event": "destination_unreachable",
                "title": f"destination {destination.name} has not answered for {minutes} min",
                "destination": destination.name,
                "problem": problem or "",
                "url": link("/"),
                "time": timezone.now().isoformat(),
            }
            if _episode(name, problem is not None, timedelta(minutes=minutes), alert):
                sent.append(name)
    low = low_file_systems()
    disk: dict[str, Any] = {
        "source": "sendit",
        "event": "disk_low",
        "title": f"less than {cfg.LOW_SPACE_MB} MiB free for {', '.join(', '.join(f) for f in low)}",
        "folders": [name for folders in low for name in folders],
        "url": link("/"),
        "time": timezone.now().isoformat(),
    }
    if _episode("disk", bool(low), timedelta(0), disk):
        sent.append("disk")
    return sent
