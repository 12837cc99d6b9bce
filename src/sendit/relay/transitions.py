"""Every status change goes through here: one UPDATE, one event row per image, in one transaction."""

from __future__ import annotations

from collections.abc import Iterable

from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from sendit.relay.models import Event, Image, Series, Status

REASON_LENGTH = 500


def clip(reason: str) -> str:
    return reason if len(reason) <= REASON_LENGTH else reason[: REASON_LENGTH - 1] + "…"


def move_images(
    series: Series, image_ids: Iterable[int], to: Status, reason: str = "", *, user_id: int | None = None
) -> int:
    """Move images of one series to ``to``; returns how many changed. Unchanged ones write no event."""
    ids = list(image_ids)
    if not ids:
        return 0
    reason = clip(reason)
    with transaction.atomic():
        rows = list(Image.objects.filter(series=series, id__in=ids).exclude(status=to).values_list("id", "status"))
        if not rows:
            return 0
        changed = [row[0] for row in rows]
        # QuerySet.update() skips auto_now: the time of the change is set here (pruning relies on it)
        Image.objects.filter(id__in=changed).update(status=to, reason=reason, updated=timezone.now())
        Event.objects.bulk_create(
            [
                Event(series=series, image_id=image_id, from_status=old, to_status=to, reason=reason, user_id=user_id)
                for image_id, old in rows
            ]
        )
        refresh_series_status(series)
    return len(changed)


def aggregate_status(counts: dict[str, int]) -> Status:
    """The series shows the least advanced state of its images; finished series show why they stopped."""
    if not counts:
        return Status.NEW
    for status in (Status.NEW, Status.PROCESSING, Status.DONEPROCESSING, Status.SENT):
        if counts.get(status):
            return Status.PROCESSING if status != Status.NEW or len(counts) > 1 else Status.NEW
    for status in (Status.ERROR, Status.QUARANTINED):
        if counts.get(status):
            return status
    if counts.get(Status.DONE):
        return Status.DONE
    return Status.SKIPPED


def image_counts(series: Series) -> dict[str, int]:
    rows = Image.objects.filter(series=series).values("status").annotate(n=Count("id"))
    return {row["status"]: row["n"] for row in rows}


def refresh_series_status(series: Series, reason: str = "") -> None:
    new = aggregate_status(image_counts(series))
    if new != series.status:
        Event.objects.create(series=series, from_status=series.status, to_status=new, reason=clip(reason))
        series.status = new
        Series.objects.filter(pk=series.pk).update(status=new, updated=timezone.now())
