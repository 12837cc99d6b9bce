"""Every status change goes through here: one conditional UPDATE, one event row per image, in one transaction.

Two writers can race on an image: workers (a paused one waking up after another took its series
over), a person's action, and ingest (a finished instance arriving again). Every change therefore
names, in its UPDATE's WHERE, the statuses it expects; a worker's change also names the lease
generation it holds (fencing). The series row is locked first in every path — by the lease check for
a worker, by ``lock_series`` otherwise — so all writers take locks in one order.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.db.models import Count, DateTimeField, Exists, ExpressionWrapper, F
from django.db.models.functions import Now
from django.utils import timezone

from sendit.relay.models import Event, Image, Series, SeriesPart, Status

REASON_LENGTH = 500


def database_time(seconds: float = 0.0) -> ExpressionWrapper:
    """The database's clock plus ``seconds`` (minus, when negative), for every time two hosts compare
    — leases, heartbeats, back-offs, queue times: a host's skewed clock never decides what is due."""
    return ExpressionWrapper(Now() + timedelta(seconds=seconds), output_field=DateTimeField())


def clip(reason: str) -> str:
    return reason if len(reason) <= REASON_LENGTH else reason[: REASON_LENGTH - 1] + "…"


class LeaseLost(Exception):
    """This worker's lease ran out or was taken over: it must not write on, and stops at once."""


@dataclass(frozen=True)
class Lease:
    """A worker's hold on one series, or on one part of a split series (``part_id``: the images with
    ids ``first_id``..``last_id``); ``generation`` is the fencing token (+1 at each acquisition)."""

    series_id: int
    owner: str
    generation: int
    part_id: int | None = None
    first_id: int = 0
    last_id: int = 0

    @property
    def tag(self) -> str:
        """What names this lease's files: ``g<generation>``, or ``gp<part>-<generation>`` for a part
        (never matching a series worker's leftover pattern ``*.g<generation>.*``)."""
        return f"g{self.generation}" if self.part_id is None else f"gp{self.part_id}-{self.generation}"

    def __str__(self) -> str:
        if self.part_id is None:
            return f"series #{self.series_id}"
        return f"part #{self.part_id} of series #{self.series_id}"


def hold(lease: Lease) -> None:
    """Inside a transaction: confirm the lease still holds, in database time, and lock the series row.

    An UPDATE rather than a SELECT, so that it takes the row's write lock until commit: a takeover
    waits for this transaction, and this one sees a takeover that committed first.

    A part's lease is held on its part row (parts of one series do not wait for one another's
    work), then the series row is locked as every other writer locks it first, before any image.
    """
    if lease.part_id is not None:
        held = SeriesPart.objects.filter(
            pk=lease.part_id,
            lease_owner=lease.owner,
            lease_generation=lease.generation,
            lease_expires__gt=Now(),
            finished_at__isnull=True,
        ).update(lease_expires=F("lease_expires"))
        if held != 1:  # the part's lease ran out, another worker took it, or the part is over: they won
            raise LeaseLost(f"{lease}: lease generation {lease.generation} is no longer held")
        lock_series(lease.series_id)
        return
    held = Series.objects.filter(
        pk=lease.series_id, lease_owner=lease.owner, lease_generation=lease.generation, lease_expires__gt=Now()
    ).update(lease_expires=F("lease_expires"))
    if held != 1:  # changed nothing: the lease ran out or another worker took it; that worker won
        raise LeaseLost(f"series #{lease.series_id}: lease generation {lease.generation} is no longer held")


def lock_series(series_id: int) -> None:
    """Inside a transaction, for writers without a lease (a person, ingest): the same lock order."""
    list(Series.objects.select_for_update().filter(pk=series_id).values_list("pk", flat=True))


@contextmanager
def fenced(lease: Lease) -> Iterator[None]:
    """A transaction whose writes count only while ``lease`` holds; raises LeaseLost otherwise."""
    with transaction.atomic():
        hold(lease)
        yield


def move_images(
    series: Series,
    image_ids: Iterable[int],
    to: Status,
    reason: str = "",
    *,
    expect: Collection[str],
    lease: Lease | None = None,
    user_id: int | None = None,
) -> int:
    """Move those images of ``series`` that are in one of the ``expect`` statuses to ``to``.

    Returns how many changed; the others (another writer moved them first) are left alone and get no
    event. With a ``lease``, nothing changes unless it still holds (LeaseLost).
    """
    ids = list(image_ids)
    if not ids:
        return 0
    reason = clip(reason)
    expected = [status for status in expect if status != to]
    with transaction.atomic():
        if lease is not None:
            hold(lease)
        else:
            lock_series(series.pk)
        candidates = Image.objects.select_for_update().filter(series=series, id__in=ids, status__in=expected)
        if lease is not None and lease.part_id is not None:  # a part moves the images of its range only
            candidates = candidates.filter(id__gte=lease.first_id, id__lte=lease.last_id)
        rows = list(candidates.values_list("id", "status"))
        if not rows:
            return 0
        changed = [row[0] for row in rows]
        guarded = Image.objects.filter(id__in=changed, status__in=expected)
        if lease is not None and lease.part_id is not None:
            # a part's images only, while its generation holds (the part row is locked by hold above)
            part = SeriesPart.objects.filter(pk=lease.part_id, lease_generation=lease.generation)
            guarded = guarded.filter(id__gte=lease.first_id, id__lte=lease.last_id).filter(Exists(part))
        elif lease is not None:
            guarded = guarded.filter(series__lease_generation=lease.generation)
        # QuerySet.update() skips auto_now: the time of the change is set here (pruning relies on it).
        # The rows are locked above, so this changes exactly them; a row another writer moved in
        # between would not match the WHERE and keep that writer's status (that writer won).
        guarded.update(status=to, reason=reason, updated=timezone.now())
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
    """Recompute the series' aggregate from its images; an event only when it changed."""
    with transaction.atomic():
        new = aggregate_status(image_counts(series))
        current = Series.objects.filter(pk=series.pk).values_list("status", flat=True).first()
        if current is None or new == current:
            series.status = new
            return
        # names the status it read: a concurrent refresh that already wrote ``new`` wins, no double event
        if Series.objects.filter(pk=series.pk, status=current).update(status=new, updated=timezone.now()) == 1:
            Event.objects.create(series=series, from_status=current, to_status=new, reason=clip(reason))
        series.status = new
