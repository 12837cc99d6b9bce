"""Counts for status displays, manual retry, and pruning of old rows into PHI-free summaries."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Sequence
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import Count, Max, Min, QuerySet
from django.db.models.functions import Now
from django.utils import timezone

from sendit.destinations.base import Destination, SeriesDestination
from sendit.relay.models import IN_FLIGHT, Event, Image, ReceivedFile, Series, Stage, Status, Summary
from sendit.relay.transitions import clip, move_images
from sendit.storage import StoreError

log = logging.getLogger("sendit.housekeeping")


def _images(series_ids: Collection[int] | None) -> QuerySet[Image]:
    return Image.objects.all() if series_ids is None else Image.objects.filter(series_id__in=series_ids)


def images_per_status(series_ids: Collection[int] | None = None) -> dict[str, int]:
    """Images per status (only statuses that have any), of these series or of all: the one tally
    that `sendit status`, `sendit import --wait`, the dashboard and /metrics show."""
    rows = _images(series_ids).values("status").annotate(n=Count("id")).order_by()
    return {row["status"]: row["n"] for row in rows}


def reasons_per_status(
    statuses: Collection[str], series_ids: Collection[int] | None = None
) -> dict[tuple[str, str], int]:
    """How many images of these series (or all) are in one of ``statuses``, by (status, reason)."""
    rows = _images(series_ids).filter(status__in=statuses).values("status", "reason").annotate(n=Count("id"))
    return {(row["status"], row["reason"]): row["n"] for row in rows.order_by()}


def status_counts() -> dict[str, int]:
    """Images per status (files that never became images are counted apart: ``file_counts``)."""
    counts = {status.value: 0 for status in Status}
    for status, n in images_per_status().items():
        counts[status] += n
    return counts


def file_counts() -> dict[str, int]:
    """Received files that did not become images and no one has resolved yet, per status:
    QUARANTINED (not DICOM, truncated, a conflicting copy, missing UIDs) and SKIPPED (duplicates)."""
    counts = {Status.QUARANTINED.value: 0, Status.SKIPPED.value: 0}
    for row in ReceivedFile.objects.filter(resolved="").values("status").annotate(n=Count("id")).order_by():
        counts[row["status"]] = counts.get(row["status"], 0) + row["n"]
    return counts


def problem_reasons(limit: int = 20) -> list[tuple[str, str, int]]:
    """(status, reason, count) for everything that did not end DONE, most frequent first."""
    merged = reasons_per_status((Status.ERROR, Status.QUARANTINED, Status.SKIPPED))
    for row in ReceivedFile.objects.filter(resolved="").values("status", "reason").annotate(n=Count("id")).order_by():
        key = (row["status"], row["reason"])
        merged[key] = merged.get(key, 0) + row["n"]
    ordered = sorted(merged.items(), key=lambda item: -item[1])[:limit]
    return [(status, reason, n) for (status, reason), n in ordered]


def retry_errors(series_ids: list[int] | None = None, user_id: int | None = None) -> list[int]:
    """ERROR images go back to NEW (de-identification is deterministic; confirmed deliveries are not
    repeated); returns the series to enqueue."""
    queryset = Series.objects.filter(images__status=Status.ERROR).distinct()
    if series_ids:
        queryset = queryset.filter(pk__in=series_ids)
    touched = []
    for series in queryset:
        errors = list(series.images.filter(status=Status.ERROR).values_list("id", flat=True))
        # deterministic: redo all; names ERROR, so an image another writer moved since is left alone
        move_images(series, errors, Status.NEW, "retry requested", expect=(Status.ERROR,), user_id=user_id)
        Series.objects.filter(pk=series.pk).update(attempts=0, last_error="", next_attempt_at=None)
        touched.append(series.pk)
    return touched


def retry_now(series_ids: Collection[int] | None = None, who: str = "", user_id: int | None = None) -> list[int]:
    """Retry now, the same from the web, the API and `sendit retry --now`: series waiting out a
    back-off (stage retrying, images in flight) are due at once instead of at ``next_attempt_at``.

    1. Find the waiting series (of ``series_ids``, or all).
    2. Set their next attempt to now, each in an UPDATE that names the stage and the back-off it saw:
       a series whose worker ran meanwhile keeps what that worker wrote.
    3. Record an event on each series moved (from and to empty: no status changes), with the user.
    4. Queue them; returns their ids.
    """
    waiting = Series.objects.filter(stage=Stage.RETRYING, next_attempt_at__gt=Now(), images__status__in=IN_FLIGHT)
    if series_ids is not None:
        waiting = waiting.filter(pk__in=list(series_ids))
    reason = clip("retry now requested" + (f" by {who}" if who else ""))
    moved: list[int] = []
    with transaction.atomic():
        for series_id in list(waiting.values_list("id", flat=True).distinct()):
            due = Series.objects.filter(pk=series_id, stage=Stage.RETRYING, next_attempt_at__gt=Now())
            if due.update(next_attempt_at=Now()) == 1:
                moved.append(series_id)
        Event.objects.bulk_create(
            [Event(series_id=i, from_status="", to_status="", reason=reason, user_id=user_id) for i in moved]
        )
    if moved:
        from sendit.relay import tasks  # the queue: only when there is something to push

        tasks.enqueue(moved)
    return moved


def check_destinations(destinations: Sequence[Destination | SeriesDestination], seconds: float) -> list[dict[str, Any]]:
    """Each destination's ``check()``, all at once, waiting at most ``seconds`` in all; each is closed.

    For `sendit status` during an outage: a destination that does not answer in time is reported as
    such, and its check runs on in a daemon thread that ends with the process. Rows like the
    dashboard's: name, reachable, problem.
    """
    answers: dict[int, str | None] = {}

    def ask(index: int, destination: Destination | SeriesDestination) -> None:
        try:
            answers[index] = destination.check()
        except Exception as exc:  # a check must answer, not raise; the class name says enough
            answers[index] = f"check failed: {type(exc).__name__}"
        finally:
            destination.close()

    threads = [
        threading.Thread(target=ask, args=(index, destination), name=f"sendit-check-{index}", daemon=True)
        for index, destination in enumerate(destinations)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    rows = []
    for index, destination in enumerate(destinations):
        problem = answers.get(index, f"no answer within {seconds:g} s")
        rows.append({"name": destination.name, "reachable": problem is None, "problem": problem or ""})
    return rows


def _drop_stored_originals(series: Series) -> bool:
    """Delete what the storage bucket still holds for a series about to be pruned (a discarded image's
    original whose delete failed); False when the bucket cannot be reached."""
    left = series.images.exclude(stored_key="").filter(cleaned_at__isnull=True)
    keys = list(left.values_list("stored_key", flat=True))
    if not keys:
        return True
    from sendit.relay import runtime

    store = runtime.store()
    if store is None:
        return True  # no bucket configured any more: nothing this host can delete
    try:
        for key in keys:
            store.delete(key)
    except StoreError as exc:
        log.warning("series #%s: not pruned yet (%s)", series.pk, exc)
        return False
    return True


def prune(retention_days: int) -> int:
    """Replace finished series older than the retention period by a Summary (counts and times only).

    Only series whose images all ended DONE or SKIPPED, with no change within the period: ERROR and
    QUARANTINED images wait for a person, however old.
    """
    cutoff = timezone.now() - timedelta(days=retention_days)
    old = (
        Series.objects.exclude(images__status__in=(*IN_FLIGHT, Status.ERROR, Status.QUARANTINED))
        .annotate(first=Min("images__created"), last=Max("images__updated"))
        .filter(last__lt=cutoff)
    )
    pruned = 0
    for series in old:
        if not _drop_stored_originals(series):
            continue  # the bucket is out of reach: this series is pruned next time, with its objects
        counts = images_per_status([series.pk])
        with transaction.atomic():
            Summary.objects.create(
                series_id_was=series.pk,
                modality=series.modality,
                images=sum(counts.values()),
                counts=counts,
                first_seen=series.first or series.created,
                finished=series.last or series.updated,
            )
            study = series.study
            series.delete()
            if not study.series.exists():
                study.delete()
        pruned += 1
    ReceivedFile.objects.filter(status=Status.SKIPPED, created__lt=cutoff).delete()  # rejected ones wait
    return pruned
