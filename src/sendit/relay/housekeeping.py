"""Counts for status displays, manual retry, and pruning of old rows into PHI-free summaries."""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta

from django.db import transaction
from django.db.models import Count, Max, Min, QuerySet
from django.utils import timezone

from sendit.relay.models import IN_FLIGHT, Image, ReceivedFile, Series, Status, Summary
from sendit.relay.transitions import move_images


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
    """Images per status, plus files that never became images (rejected, duplicates)."""
    counts = {status.value: 0 for status in Status}
    for status, n in images_per_status().items():
        counts[status] += n
    for row in ReceivedFile.objects.values("status").annotate(n=Count("id")).order_by():
        counts[row["status"]] += row["n"]
    return counts


def problem_reasons(limit: int = 20) -> list[tuple[str, str, int]]:
    """(status, reason, count) for everything that did not end DONE, most frequent first."""
    merged = reasons_per_status((Status.ERROR, Status.QUARANTINED, Status.SKIPPED))
    for row in ReceivedFile.objects.values("status", "reason").annotate(n=Count("id")).order_by():
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
