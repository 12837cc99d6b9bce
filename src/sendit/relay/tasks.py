"""Huey tasks: one per series, plus the periodic requeue of series whose worker went away."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from django.db import close_old_connections
from django.db.models import Q
from django.utils import timezone
from huey import crontab

from sendit.relay import runtime
from sendit.relay.models import IN_FLIGHT, Series
from sendit.relay.pipeline import holder_is_dead, process_series
from sendit.relay.queue import make_huey

log = logging.getLogger("sendit.tasks")
huey = make_huey(runtime.config())


def enqueue(series_ids: Iterable[int]) -> int:
    ids = sorted(set(series_ids))
    Series.objects.filter(pk__in=ids).update(enqueued_at=timezone.now())
    for series_id in ids:
        run_series(series_id)
    return len(ids)


@huey.task()
def run_series(series_id: int) -> None:
    close_old_connections()
    try:
        outcome = process_series(series_id)
        if outcome.retry_in is not None:
            Series.objects.filter(pk=series_id).update(enqueued_at=timezone.now())
            run_series.schedule((series_id,), delay=outcome.retry_in)
    finally:
        close_old_connections()


def stale_series() -> list[int]:
    """Series with work in flight and due, whose worker is gone: lease expired or holder dead on this
    host, or never leased and not enqueued within a lease period (the queue lost it)."""
    now = timezone.now()
    lease = timedelta(seconds=runtime.config().LEASE_SECONDS)
    rows = (
        Series.objects.filter(images__status__in=IN_FLIGHT)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .values_list("id", "lease_owner", "lease_expires", "enqueued_at")
        .distinct()
    )
    stale = []
    for series_id, owner, expires, enqueued in rows:
        leased = expires is not None and expires >= now
        if leased:
            if holder_is_dead(owner):
                stale.append(series_id)
        elif enqueued is None or enqueued < now - lease or owner:
            stale.append(series_id)
    return sorted(set(stale))


def requeue_stale() -> int:
    ids = stale_series()
    if ids:
        log.info("requeueing %s series whose work was interrupted", len(ids))
    return enqueue(ids)


@huey.periodic_task(crontab(minute="*"))
def requeue_stale_periodically() -> None:
    close_old_connections()
    requeue_stale()
