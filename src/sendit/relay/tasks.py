"""Huey tasks: one per series, plus the periodic requeue of series whose worker or task went away.

A step that fails because the database or the queue dropped its connection is retried in seconds;
a series with work in flight and no task at all (a push that failed, a task lost with its worker)
is found by the requeue within a minute.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.db import close_old_connections
from django.db.models import BooleanField, ExpressionWrapper, Q
from django.db.models.functions import Now
from django.utils import timezone
from huey import crontab

from sendit.relay import alerts, runtime
from sendit.relay.models import IN_FLIGHT, PeriodicRun, Series, Stage, Status
from sendit.relay.pipeline import holder_is_dead, process_series
from sendit.relay.queue import make_huey
from sendit.relay.transitions import database_time

log = logging.getLogger("sendit.tasks")
huey = make_huey(runtime.config())

#: a step that raised (connection dropped) runs again after this many seconds
FAILED_STEP_RETRY_SECONDS = 5
#: a series not leased, with work to do and no task in the queue for this long, is requeued
ORPHAN_AFTER_SECONDS = 10
#: the requeue runs once a minute on one consumer; a little less than 60 s, so the next minute is due
REQUEUE_PERIOD_SECONDS = 50


class StepFailed(Exception):
    """Raised to Huey (which retries the task) in place of an error whose text could quote a value."""


def enqueue(series_ids: Iterable[int]) -> int:
    """Push one task per series. The time is written after the push: a failed push leaves the old
    time, so the requeue sees a series with no task."""
    ids = sorted(set(series_ids))
    for series_id in ids:
        run_series(series_id)
    if ids:
        Series.objects.filter(pk__in=ids).update(enqueued_at=database_time())
    return len(ids)


@huey.task(retries=100, retry_delay=FAILED_STEP_RETRY_SECONDS)
def run_series(series_id: int) -> None:
    """Process one series. An exception here (the database or the queue went away mid-step) makes
    Huey run the task again in a few seconds; the lease left behind by this process is taken back
    at once (pipeline.holder_is_dead)."""
    close_old_connections()
    try:
        outcome = process_series(series_id, split=runtime.config().WORKERS > 1)
        if outcome.retry_in is not None:
            for _ in range(outcome.spread):  # a split series: one task per part, for any free worker
                run_series.schedule((series_id,), delay=outcome.retry_in)
            Series.objects.filter(pk=series_id).update(enqueued_at=database_time())
    except Exception as exc:
        log.warning(
            "series #%s: step failed (%s); retrying in %s s", series_id, type(exc).__name__, FAILED_STEP_RETRY_SECONDS
        )
        # Huey logs what the task raised: the type only, since a database error's text can quote a value
        raise StepFailed(f"series #{series_id}: {type(exc).__name__}") from None
    finally:
        _alert_after(series_id)
        close_old_connections()


def _alert_after(series_id: int) -> None:
    """An alert if this step left the series in ERROR or QUARANTINED; never fails the task."""
    try:
        alerts.series_alerts([series_id])
    except Exception as exc:  # the periodic check sends it later
        log.warning("series #%s: alert check failed (%s)", series_id, type(exc).__name__)


def _queued_series() -> set[int] | None:
    """Series that have a task waiting (now or scheduled); None when the queue cannot be read."""
    try:
        tasks: list[Any] = [*huey.pending(), *huey.scheduled()]
    except Exception as exc:
        log.warning("the queue cannot be read (%s); requeue check skipped", type(exc).__name__)
        return None
    found = set()
    for task in tasks:
        if getattr(task, "name", "").endswith("run_series") and task.args:
            found.add(int(task.args[0]))
    return found


def stale_series() -> list[int]:
    """Series with work to do and due, whose worker or task is gone: lease expired or holder dead, or
    not leased and no task queued for it (the queue lost it, a push failed). Work to do includes a
    clean-up a killed worker left half-way (DONE images not yet cleaned)."""
    lease = runtime.config().LEASE_SECONDS
    to_do = Q(images__status__in=IN_FLIGHT) | Q(images__status=Status.DONE, images__cleaned_at__isnull=True)
    # whether a lease still runs is the database's clock's call, never this host's
    running = ExpressionWrapper(Q(lease_expires__gte=Now()), output_field=BooleanField())
    queued_before = {  # how long ago the series was last queued, also by the database's clock
        name: ExpressionWrapper(
            Q(enqueued_at__isnull=True) | Q(enqueued_at__lt=database_time(-seconds)), output_field=BooleanField()
        )
        for name, seconds in (("orphaned", ORPHAN_AFTER_SECONDS), ("silent", lease))
    }
    rows = (
        Series.objects.filter(to_do)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=Now()))
        .annotate(leased=running, **queued_before)
        .values_list("id", "lease_owner", "leased", "orphaned", "silent")
        .distinct()
    )
    stale: set[int] = set()
    unleased: list[tuple[int, bool]] = []
    for series_id, owner, leased, orphaned, silent in rows:
        if leased:
            if holder_is_dead(owner):
                stale.add(series_id)
        elif owner:
            stale.add(series_id)  # a lease that ran out: its worker is gone
        elif orphaned:
            unleased.append((series_id, bool(silent)))
    if unleased:
        queued = _queued_series()
        if queued is not None:
            stale |= {series_id for series_id, _ in unleased if series_id not in queued}
        else:  # cannot tell: only those silent for a whole lease period
            stale |= {series_id for series_id, silent in unleased if silent}
    return sorted(stale)


def wake_when_destinations_are_back() -> list[int]:
    """Series waiting out a back-off after a destination failure go at once when every destination
    answers again, instead of after the rest of their back-off (up to RETRY_CAP_SECONDS)."""
    waiting = list(
        Series.objects.filter(stage=Stage.RETRYING, next_attempt_at__gt=Now(), images__status__in=IN_FLIGHT)
        .values_list("id", flat=True)
        .distinct()
    )
    if not waiting:
        return []
    destinations = runtime.all_destinations()
    try:
        if any(destination.check() is not None for destination in destinations):
            return []
    finally:
        for destination in destinations:
            destination.close()
    # names the back-off it expects: a series that ran meanwhile keeps what its worker wrote
    Series.objects.filter(pk__in=waiting, stage=Stage.RETRYING, next_attempt_at__gt=Now()).update(next_attempt_at=Now())
    log.info("destinations answer again: %s waiting series go now", len(waiting))
    enqueue(waiting)
    return waiting


def requeue_stale() -> int:
    ids = stale_series()
    if ids:
        log.info("requeueing %s series whose work was interrupted", len(ids))
    return enqueue(ids)


def my_turn(name: str, period_seconds: float) -> bool:
    """True for exactly one caller per period across every consumer on every host."""
    now = timezone.now()
    PeriodicRun.objects.bulk_create([PeriodicRun(name=name, last_run=now - timedelta(days=1))], ignore_conflicts=True)
    # names the time it expects to be older than the period: of two consumers, the first UPDATE wins;
    # the other changes nothing and skips this period
    due = database_time(-period_seconds)
    return (
        PeriodicRun.objects.filter(name=name, last_run__lte=due).update(last_run=Now(), host=socket.gethostname()) == 1
    )


@huey.periodic_task(crontab(minute="*"))
def requeue_stale_periodically() -> None:
    close_old_connections()
    try:
        if my_turn("requeue", REQUEUE_PERIOD_SECONDS):
            requeue_stale()
    except Exception as exc:  # the next minute tries again; the type only (the text can quote a value)
        log.warning("requeue check failed (%s)", type(exc).__name__)
    finally:
        close_old_connections()


@huey.periodic_task(crontab(minute="*"))
def alert_periodically() -> None:
    """Once a minute on one consumer: series alerts a worker missed, destinations and free space."""
    close_old_connections()
    try:
        if alerts.enabled() and my_turn("alerts", REQUEUE_PERIOD_SECONDS):
            alerts.series_alerts()
            alerts.condition_alerts()
    except Exception as exc:
        log.warning("alert check failed (%s)", type(exc).__name__)
    finally:
        close_old_connections()
