"""One series through identify → de-identify → deliver → verify → clean up, resumable at every step.

A series is worked on by one worker at a time (a lease in the database, renewed on time by a thread,
its expiry in database time). Each step picks up images by status, so a worker that dies leaves a
state the next one continues from: nothing lost, and deliveries already confirmed are not repeated.
Every write names the lease generation it holds (transitions.fenced): a worker that was paused past
its lease and woke up after another took the series over changes nothing and stops.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import close_old_connections, connections, transaction
from django.db.models import Count, F, Min, Q
from django.db.models.functions import Now
from django.utils import timezone

from sendit.destinations.base import Destination, DestinationError, OutgoingImage, OutgoingSeries, SeriesDestination
from sendit.dicomio import sop_class_and_syntax
from sendit.identifiers.base import IdentifierError, Identifiers, SeriesHeader
from sendit.relay import files, liveness, runtime
from sendit.relay.models import (
    IN_FLIGHT,
    Delivery,
    Event,
    Image,
    Series,
    SeriesIdentifiers,
    SeriesPart,
    Stage,
    Status,
    Study,
)
from sendit.relay.transitions import (
    Lease,
    LeaseLost,
    clip,
    database_time,
    fenced,
    move_images,
    refresh_series_status,
)
from sendit.storage import TRANSFERS, StoreError

log = logging.getLogger("sendit.pipeline")


class RetryableFailure(Exception):
    """A step failed for a reason that may pass (destination down, service busy, disk full)."""


class PermanentFailure(Exception):
    """A step failed for a reason that will not pass by waiting; the in-flight images go to ERROR."""


class WorkingCopiesLost(RetryableFailure):
    """De-identified working copies vanished before delivery (a wiped scratch folder, another host's
    restart): their images went back to NEW. The output is deterministic, so the same run makes them
    again; only a second loss in one run costs an attempt."""


@dataclass(frozen=True)
class NextStep:
    """What the caller should do next: nothing, or run the series again after ``retry_in`` seconds."""

    finished: bool
    retry_in: float | None = None
    busy: bool = False
    crashed: bool = False  # the step raised (database gone): the caller tries again, a bounded number of times
    spread: int = 1  # how many workers may run the series at once now (its parts)


# --- leases ---------------------------------------------------------------------------------------

# Owners of leases this process holds right now. A lease named after this process but not in here
# was left behind by a step that failed to release it (the database went away): it is taken at once.
_HELD: set[str] = set()


def lease_owner_name() -> str:
    """host:pid:namespace:random — its first three parts name this process's heartbeat row."""
    return f"{liveness.heartbeat_name()}:{uuid.uuid4().hex[:12]}"


def holder_is_dead(owner: str) -> bool:
    """Is the holder of a live lease gone, so that its series can be taken over before the lease runs out?

    1. This process: dead when it is no longer working on the series (a step failed before the release).
    2. Same host, kernel boot and PID namespace, and the PID has exited: dead (no query needed).
    3. Anywhere: dead when its heartbeat row is missing or silent for 3 periods, in database time —
       killed, paused, swapped out, or its host is gone.
    An owner name Sendit does not write is judged by the lease's expiry only.
    """
    parts = liveness.owner_parts(owner)
    if parts is None:
        return False
    host, pid, namespace = parts
    if host == socket.gethostname() and namespace == liveness.process_namespace():
        if pid == os.getpid():
            return owner not in _HELD
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return liveness.silent(f"{host}:{pid}:{namespace}")


def _expiry() -> Any:
    """Database time plus the lease period: hosts' clocks never decide who holds a series."""
    return database_time(runtime.config().LEASE_SECONDS)


def acquire_lease(series_id: int, owner: str) -> Lease | None:
    """Take the series if nobody holds it, the lease ran out, or its holder is visibly dead.

    Each acquisition increments the generation: the fencing token every later write names.
    """
    found = _take(Series.objects.filter(pk=series_id), owner, f"series #{series_id}")
    return None if found is None else Lease(series_id, owner, found)


def acquire_part(part: SeriesPart, owner: str) -> Lease | None:
    """Take an unfinished part as :func:`acquire_lease` takes a series: free, expired, or its holder
    visibly dead; each acquisition is a new generation of the part."""
    unfinished = SeriesPart.objects.filter(pk=part.pk, finished_at__isnull=True)
    found = _take(unfinished, owner, f"part #{part.pk} of series #{part.series_id}")
    if found is None:
        return None
    return Lease(
        part.series_id, owner, found, part_id=part.pk, first_id=part.first_image_id, last_id=part.last_image_id
    )


def _take(row: Any, owner: str, what: str) -> int | None:
    """The lease on ``row`` (one series or part row): taken when free, expired, or its holder is
    visibly dead; returns the new generation, or None when a live holder keeps it (or the row is gone)."""
    free = Q(lease_expires__isnull=True) | Q(lease_expires__lte=Now())
    taken = row.filter(free).update(
        lease_owner=owner, lease_expires=_expiry(), lease_generation=F("lease_generation") + 1
    )
    if taken != 1:
        holder = row.values_list("lease_owner", flat=True).first()
        if not holder or not holder_is_dead(holder):
            return None  # a live holder (or the row is gone): it keeps the lease
        log.warning("%s: its worker died; taking it over", what)
        # names the holder it saw: if another worker took the dead one's lease first, that worker won
        taken = row.filter(lease_owner=holder).update(
            lease_owner=owner, lease_expires=_expiry(), lease_generation=F("lease_generation") + 1
        )
        if taken != 1:
            return None
    found: int | None = row.filter(lease_owner=owner).values_list("lease_generation", flat=True).first()
    return found


def _lease_row(lease: Lease) -> Any:
    """The row a lease lives on: the series', or its part's."""
    if lease.part_id is None:
        return Series.objects.filter(pk=lease.series_id)
    return SeriesPart.objects.filter(pk=lease.part_id, finished_at__isnull=True)


def renew_lease(lease: Lease) -> bool:
    """Extend a lease that still holds; False when it ran out or was taken (the other worker won)."""
    held = _lease_row(lease).filter(lease_owner=lease.owner, lease_generation=lease.generation, lease_expires__gt=Now())
    return bool(held.update(lease_expires=_expiry()) == 1)


def release_lease(lease: Lease) -> None:
    # names owner and generation: a lease another worker took since is theirs and stays
    rows = (
        Series.objects.filter(pk=lease.series_id)
        if lease.part_id is None
        else SeriesPart.objects.filter(pk=lease.part_id)
    )
    rows.filter(lease_owner=lease.owner, lease_generation=lease.generation).update(lease_owner="", lease_expires=None)


class LeaseKeeper:
    """Renews the lease on time from a thread, whatever the main thread is waiting on.

    A paused process pauses this thread too, so its lease runs out and another worker may take the
    series; on waking, the first fenced write fails and :meth:`check` stops the work.
    """

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.every = max(1.0, runtime.config().LEASE_SECONDS / 3)
        self.beat_every = min(self.every, liveness.period_seconds())
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew_until_stopped, name=f"sendit-lease-{lease.series_id}-{lease.part_id or 0}", daemon=True
        )

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"{self.lease}: lease generation {self.lease.generation} was lost")

    def _renew_until_stopped(self) -> None:
        """Beats every heartbeat period (other hosts judge this process alive by it) and renews the
        lease every LEASE_SECONDS / 3, both in this thread."""
        renewed = time.monotonic()
        try:
            while not self._stop.wait(self.beat_every):
                try:
                    liveness.beat()
                except Exception as exc:  # the lease renewal below still runs; so does the next beat
                    log.warning("series #%s: heartbeat failed (%s)", self.lease.series_id, type(exc).__name__)
                    close_old_connections()
                try:
                    if time.monotonic() - renewed >= self.every - 0.01:
                        if not renew_lease(self.lease):
                            self.lost.set()
                            return
                        renewed = time.monotonic()
                except Exception as exc:  # a dropped connection: try again at the next tick
                    log.warning("series #%s: lease renewal failed (%s)", self.lease.series_id, type(exc).__name__)
                    close_old_connections()
        finally:
            connections.close_all()  # this thread's own connection


def backoff_seconds(attempts: int) -> float:
    cfg = runtime.config()
    return float(min(cfg.RETRY_CAP_SECONDS, cfg.RETRY_BASE_SECONDS * 2 ** max(0, attempts - 1)))


def no_space_reason(exc: OSError, writing: Path | None = None) -> str:
    """Which of Sendit's folders filled up ("no space left on the work folder"), never a file name.

    ``writing`` names the file being written when the error carries none (a failed write or close)."""
    cfg = runtime.config()
    where = str(exc.filename or writing or "")
    folders = [
        ("WORK_FOLDER", "the work folder"),
        ("QUARANTINE_FOLDER", "the quarantine folder"),
        ("OUTPUT_FOLDER", "the output folder"),
        ("INPUT_FOLDER", "the input folder"),
        ("DATA_DIR", "the data folder"),
    ]
    for key, label in folders:
        folder = cfg.values.get(key)
        if folder and where and Path(where).is_relative_to(Path(folder)):
            return f"no space left on {label}"
    return "no space left on a folder Sendit writes"


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


#: a run that finds every part finished but the series still held (its planner not yet out, or
#: another worker joining) tries again after this long, not at the next requeue
JOIN_RETRY_SECONDS = 1.0
#: how a part's finishing event names the process that ran it ("worker host:pid")
PART_WORKER = "worker"


def process_series(series_id: int, split: bool = True) -> NextStep:
    """Run whatever the series needs now: one of its unfinished parts if it is split, else the series
    itself under its lease (identify, then split it into parts when ``split`` and it is big, or
    de-identify, deliver, verify and clean up; for a split series whose parts are all finished, the
    join: verification once for the series, series destinations, clean-up)."""
    owner = lease_owner_name()
    liveness.beat()  # before the lease: a holder with no heartbeat row is dead to other hosts
    parts = list(SeriesPart.objects.filter(series_id=series_id, finished_at__isnull=True).order_by("id"))
    if parts:
        return _run_a_part(parts, owner)
    lease = acquire_lease(series_id, owner)
    if lease is None:
        if SeriesPart.objects.filter(series_id=series_id).exists():  # finished parts wait for their join
            return NextStep(finished=False, retry_in=JOIN_RETRY_SECONDS)
        return NextStep(finished=False, busy=True)
    _HELD.add(owner)
    try:
        with LeaseKeeper(lease) as keeper:
            return _work(series_id, lease, keeper, split)
    finally:
        _HELD.discard(owner)
        release_lease(lease)


def _work(series_id: int, lease: Lease, keeper: LeaseKeeper, split: bool = True) -> NextStep:
    series = Series.objects.select_related("study").get(pk=series_id)
    # Parts are written only under the series lease, which this run holds: what it sees now stays.
    if SeriesPart.objects.filter(series_id=series_id, finished_at__isnull=True).exists():
        return NextStep(finished=False, retry_in=0.0)  # split just before this run took the lease: parts first
    # the join: every part is finished (their images left in flight are this run's, which counts the
    # attempt). Finished parts only: a stale worker of an older generation deletes nothing else.
    joined = SeriesPart.objects.filter(series_id=series_id, finished_at__isnull=False).delete()[0] > 0
    in_flight = series.images.filter(status__in=IN_FLIGHT).exists()
    try:
        if in_flight:
            ids = ensure_identifiers(series)
            size = runtime.config().PART_SIZE
            # never split again in a join: what the parts left (a failure) is this run's, whose
            # failure counts an attempt, not a new round of parts
            if split and size and not joined and (parts := _plan_parts(series, lease, size)):
                return NextStep(finished=False, retry_in=0.0, spread=parts)
            written = deidentify_pending(series, ids, lease, keeper)
            try:
                deliver_and_verify(series, lease, keeper, written)
            except WorkingCopiesLost:
                log.warning("series #%s: working copies missing; de-identifying them again in this run", series_id)
                written.update(deidentify_pending(series, ids, lease, keeper))
                deliver_and_verify(series, lease, keeper, written)
        clean_up_done(series, lease, keeper)
    except LeaseLost as lost:
        log.warning("%s; leaving it to that worker", lost)
        _drop_generation_files(series.pk, lease)
        return NextStep(finished=False, busy=True)
    except RetryableFailure as failure:
        return _schedule_retry(series, lease, str(failure))
    except PermanentFailure as failure:
        _fail_in_flight(series, lease, str(failure))
        return NextStep(finished=True)
    except StoreError as exc:  # the storage bucket out of reach: the originals wait there
        return _schedule_retry(series, lease, str(exc))
    except OSError as exc:
        if is_no_space(exc):
            return _schedule_retry(series, lease, no_space_reason(exc))
        log.error("series #%s: unexpected %s", series_id, type(exc).__name__)
        return _schedule_retry(series, lease, f"unexpected error ({type(exc).__name__})")
    except Exception as exc:  # an unforeseen failure is retried and then shown, never left silent
        # only the type: an exception's text may quote a value (a provider's KeyError of an MRN)
        log.error("series #%s: unexpected %s", series_id, type(exc).__name__)
        return _schedule_retry(series, lease, f"unexpected error ({type(exc).__name__})")
    with fenced(lease):
        Series.objects.filter(pk=series.pk).update(attempts=0, last_error="", next_attempt_at=None)
        refresh_series_status(series)
    if in_flight and series.status == Status.DONE:  # this run finished it
        _log_done(series)
    return NextStep(finished=True)


def _plan_parts(series: Series, lease: Lease, size: int) -> int:
    """More than ``size`` images to de-identify: write parts over their ids (contiguous ranges of at
    most ``size``), the series' stage SPLIT, in one fenced transaction; returns how many (0: none).

    Ranges are fixed once written: an image recorded later has a larger id, falls in no part and is
    handled by the join (or a next split)."""
    todo = list(
        series.images.filter(status__in=(Status.NEW, Status.PROCESSING)).order_by("id").values_list("id", flat=True)
    )
    if len(todo) <= size:
        return 0
    chunks = [todo[start : start + size] for start in range(0, len(todo), size)]
    files.series_folder(series.pk).mkdir(parents=True, exist_ok=True)
    with fenced(lease):
        SeriesPart.objects.bulk_create(
            [SeriesPart(series=series, first_image_id=chunk[0], last_image_id=chunk[-1]) for chunk in chunks]
        )
        Series.objects.filter(pk=series.pk).update(stage=Stage.SPLIT)
        Event.objects.create(
            series=series, from_status="", to_status="", reason=f"split into {len(chunks)} parts of up to {size} images"
        )
    log.info("series #%s: %s images split into %s parts", series.pk, len(todo), len(chunks))
    return len(chunks)


def _run_a_part(parts: list[SeriesPart], owner: str) -> NextStep:
    """Take the first free unfinished part and run it; busy when every one is held by a live worker
    (each of them runs the series again when its part is over)."""
    for part in parts:
        lease = acquire_part(part, owner)
        if lease is None:
            continue
        _HELD.add(owner)
        try:
            with LeaseKeeper(lease) as keeper:
                return run_part(lease, keeper)
        finally:
            _HELD.discard(owner)
            release_lease(lease)
    return NextStep(finished=False, busy=True)


def run_part(lease: Lease, keeper: LeaseKeeper) -> NextStep:
    """One part: de-identify and deliver the images of its range up to SENT, on a connection of its
    own, then mark it finished (fenced). The series runs again next: another part, or the join.

    A failure ends the part too: its images stay in flight and go to the series' own run (the join),
    which retries them and counts the attempt."""
    series = Series.objects.select_related("study").get(pk=lease.series_id)
    try:
        ids = Identifiers.from_json(SeriesIdentifiers.objects.get(series=series).response)  # stored by the plan
        written = deidentify_pending(series, ids, lease, keeper)
        destinations = runtime.destinations()
        try:
            if destinations:
                deliver_pending(series, destinations, lease, keeper, written)
        finally:
            for destination in destinations:
                destination.close()
    except LeaseLost as lost:
        log.warning("%s; leaving it to that worker", lost)
        _drop_generation_files(series.pk, lease)
        return NextStep(finished=False, busy=True)
    except Exception as exc:  # the type only: an exception's text may quote a value
        log.warning("%s: %s; its images go to the series' own run", lease, type(exc).__name__)
    try:
        with fenced(lease):
            # the fence holds the part row, so this generation is the part's; names it all the same
            _lease_row(lease).filter(lease_generation=lease.generation).update(finished_at=timezone.now())
            Event.objects.create(
                series=series,
                from_status="",
                to_status="",
                reason=f"part #{lease.part_id} (images #{lease.first_id}–#{lease.last_id}) finished by"
                f" {PART_WORKER} {socket.gethostname()}:{os.getpid()}",
            )
    except LeaseLost as lost:
        log.warning("%s; leaving it to that worker", lost)
        return NextStep(finished=False, busy=True)
    return NextStep(finished=False, retry_in=0.0)


def _log_done(series: Series) -> None:
    """One INFO line per finished series: id, images and seconds since its first image was recorded."""
    span = series.images.aggregate(first=Min("created"), done=Count("id", filter=Q(status=Status.DONE)))
    seconds = (timezone.now() - span["first"]).total_seconds() if span["first"] is not None else 0.0
    log.info("series #%s DONE: %s image(s), %.1f s from first ingest", series.pk, span["done"], seconds)


def _drop_generation_files(series_id: int, lease: Lease) -> None:
    """Working files this lease generation wrote but never renamed into place."""
    folder = files.series_folder(series_id)
    for leftover in folder.glob(f"*.{lease.tag}.*") if folder.exists() else ():
        leftover.unlink(missing_ok=True)


def _schedule_retry(series: Series, lease: Lease, reason: str) -> NextStep:
    try:
        with fenced(lease):
            attempts = Series.objects.filter(pk=series.pk).values_list("attempts", flat=True).get() + 1
            if attempts >= runtime.config().MAX_ATTEMPTS:
                Series.objects.filter(pk=series.pk).update(attempts=attempts, next_attempt_at=None)
                _record_failed_attempt(series, f"attempt {attempts} failed: {reason}; giving up")
                _fail_in_flight(series, lease, f"{reason} (gave up after {attempts} attempts)")
                return NextStep(finished=True)
            delay = backoff_seconds(attempts)
            Series.objects.filter(pk=series.pk).update(
                attempts=attempts,
                last_error=clip(f"retrying: {reason}"),
                next_attempt_at=database_time(delay),  # due by the database's clock, not this host's
                stage=Stage.RETRYING,
            )
            _record_failed_attempt(series, f"attempt {attempts} failed: {reason}; next in {delay:.0f} s")
    except LeaseLost as lost:
        log.warning("%s; leaving it to that worker", lost)
        return NextStep(finished=False, busy=True)
    log.warning("series #%s: attempt %s failed (%s); retrying in %.0f s", series.pk, attempts, reason, delay)
    return NextStep(finished=False, retry_in=delay)


def _record_failed_attempt(series: Series, reason: str) -> None:
    """A series event (no status change: from and to empty) for each failed attempt, in the caller's
    fenced transaction, so the series page tells each attempt and its reason, not only the last."""
    Event.objects.create(series=series, from_status="", to_status="", reason=clip(reason))


def _fail_in_flight(series: Series, lease: Lease, reason: str) -> None:
    with fenced(lease):
        ids = list(series.images.filter(status__in=IN_FLIGHT).values_list("id", flat=True))
        move_images(series, ids, Status.ERROR, reason, expect=IN_FLIGHT, lease=lease)
        Series.objects.filter(pk=series.pk).update(last_error=clip(reason), stage=Stage.ERROR)
    log.error("series #%s: %s image(s) to ERROR: %s", series.pk, len(ids), reason)


# --- identify -------------------------------------------------------------------------------------


def ensure_identifiers(series: Series) -> Identifiers:
    """The stored identifiers, or one provider call for every series of the study still waiting."""
    stored = SeriesIdentifiers.objects.filter(series=series).first()
    if stored is None:
        # This series always: another worker may have stored its identifiers since the read above
        # (it asked for the whole study), and then the query below would leave it out.
        others = Series.objects.filter(study_id=series.study_id, identifiers__isnull=True).exclude(pk=series.pk)
        waiting = [series, *others]
        headers = [SeriesHeader(**item.header) for item in waiting]
        provider = runtime.identifier_provider()
        try:
            answers = provider.identify(headers)
        except IdentifierError as exc:
            if exc.retryable:
                raise RetryableFailure(f"identifier service: {exc}") from exc
            raise PermanentFailure(f"identifier service: {exc}") from exc
        if series.series_uid not in answers:
            raise PermanentFailure("identifier service: no answer for this series")
        name = type(provider).__name__
        with transaction.atomic():
            # One row lock per study, then the inserts in series order: two workers storing the answers
            # of one study wait for each other instead of deadlocking on opposite insert orders.
            list(Study.objects.select_for_update().filter(pk=series.study_id).values_list("pk", flat=True))
            have = set(SeriesIdentifiers.objects.filter(series__in=waiting).values_list("series_id", flat=True))
            SeriesIdentifiers.objects.bulk_create(
                [
                    SeriesIdentifiers(series=item, provider=name, response=answers[item.series_uid].to_json())
                    for item in sorted(waiting, key=lambda item: item.pk)
                    if item.series_uid in answers and item.pk not in have
                ],
                ignore_conflicts=True,
            )
        stored = SeriesIdentifiers.objects.get(series=series)
        Series.objects.filter(pk=series.pk).update(stage=Stage.IDENTIFIED)
    return Identifiers.from_json(stored.response)


# --- de-identify ----------------------------------------------------------------------------------


MISSING_COPY = "working copy missing; de-identifying again"

# image id → (SOPClassUID, TransferSyntaxUID) of the working copy written by this run
Written = dict[int, tuple[str, str]]


def deidentify_pending(series: Series, ids: Identifiers, lease: Lease, keeper: LeaseKeeper) -> Written:
    """De-identify every NEW/PROCESSING image; returns what it wrote, so delivery needn't re-read headers."""
    from sendit.deid import DeidError

    engine = runtime.deidentifier()
    batch_size = runtime.config().BATCH_SIZE
    written: Written = {}
    files.series_folder(series.pk).mkdir(parents=True, exist_ok=True)
    while True:
        keeper.check()
        todo = _in_scope(series.images.filter(status__in=(Status.NEW, Status.PROCESSING)), lease)
        batch = list(todo.order_by("id")[:batch_size])
        if not batch:
            break
        move_images(series, [image.id for image in batch], Status.PROCESSING, expect=(Status.NEW,), lease=lease)
        made: list[Image] = []
        notes: dict[int, str] = {}
        renames: list[tuple[Path, Path]] = []
        sources = fetch_originals(series.pk, batch, lease)
        for image in batch:
            keeper.check()  # a worker that lost its lease stops at once, not after the batch
            source = sources[image.pk]
            target = files.working_copy(series.pk, image.pk)
            # a name of this lease generation: a stale worker never writes into the new holder's file
            mine = target.with_name(f"{image.pk}.{lease.tag}.dcm")
            if not image.stored_key and source.is_symlink():  # swapped for a link since ingest: never followed
                _quarantine(series, image, lease, "original was replaced by a symbolic link; not followed")
                continue
            try:
                # one read of the original for both its parse and its SHA-256 (of exactly those bytes)
                result = engine.deidentify_file(source, mine, ids, digest=True)
                digest = result.sha256
                if image.stored_key and digest != image.sha256:  # fail closed: not the bytes ingested
                    mine.unlink(missing_ok=True)
                    _quarantine(series, image, lease, "original in the storage bucket differs from the one ingested")
                    continue
            except FileNotFoundError:
                mine.unlink(missing_ok=True)
                _quarantine(series, image, lease, "original file disappeared before de-identification")
                continue
            except OSError as exc:
                mine.unlink(missing_ok=True)
                if is_no_space(exc):
                    raise RetryableFailure(no_space_reason(exc, writing=mine)) from None
                _quarantine(series, image, lease, f"de-identification failed: {type(exc).__name__}")
                continue
            except DeidError as exc:
                _quarantine(series, image, lease, f"de-identification failed: {exc}")
                continue
            except Exception as exc:  # fail closed: whatever went wrong, this image is not delivered
                mine.unlink(missing_ok=True)
                _quarantine(series, image, lease, f"de-identification failed: {type(exc).__name__}")
                continue
            image.deid_sop_instance_uid, image.sha256 = result.sop_instance_uid, digest
            made.append(image)
            notes[image.pk] = result.pixels
            renames.append((mine, target))
            if not series.deid_series_uid:
                series.deid_series_uid = result.series_uid
                with fenced(lease):
                    Series.objects.filter(pk=series.pk).update(deid_series_uid=result.series_uid)
                    Study.objects.filter(pk=series.study_id).update(deid_study_uid=result.study_uid)
            written[image.pk] = (result.sop_class_uid, result.transfer_syntax_uid)
        for image in batch:
            if image.stored_key:  # the worker's local copy of the original; the store keeps its own
                sources[image.pk].unlink(missing_ok=True)
        with fenced(lease):
            # renamed into place only while the lease holds: a stale worker's files never take the
            # place of the new holder's (and are removed when it finds its lease gone)
            for mine, target in renames:
                os.replace(mine, target)
            Image.objects.bulk_update(made, ["deid_sop_instance_uid", "sha256"])
            for note, ids_with_note in _by_pixel_note(made, notes).items():  # OCR's decision on the event
                move_images(
                    series, ids_with_note, Status.DONEPROCESSING, note, expect=(Status.PROCESSING,), lease=lease
                )
    if lease.part_id is None:  # a part leaves the series' document and stage to the join
        write_series_metadata(series, ids)
        with fenced(lease):
            Series.objects.filter(pk=series.pk).update(stage=Stage.DEIDENTIFIED)
    return written


def _in_scope(images: Any, lease: Lease) -> Any:
    """A part's images only (its range of ids); all of the series' for the series' lease."""
    if lease.part_id is None:
        return images
    return images.filter(id__gte=lease.first_id, id__lte=lease.last_id)


def _deidentify_again(series: Series, image_ids: list[int], expect: Status, lease: Lease) -> None:
    """Images whose working copy is gone go back to NEW: the output is deterministic, so they are
    made again under the same UIDs (the caller ends the step; this costs no attempt)."""
    move_images(series, image_ids, Status.NEW, MISSING_COPY, expect=(expect,), lease=lease)


def _by_pixel_note(made: list[Image], notes: dict[int, str]) -> dict[str, list[int]]:
    """The images written, grouped by what the burned-in text step decided ("" for no rule)."""
    groups: dict[str, list[int]] = {}
    for image in made:
        groups.setdefault(notes.get(image.pk, ""), []).append(image.pk)
    return groups


def fetch_originals(series_id: int, batch: list[Image], lease: Lease) -> dict[int, Path]:
    """Each image's original as a local path: in the input folder, or fetched from the store.

    1. Images read in the input folder: their path there.
    2. Images whose original is in the store: downloaded into the series' working folder, a few at a
       time, under a name of this lease generation. One not in the store comes back as a path that
       does not exist: de-identification finds it gone and quarantines the image.
    3. The store out of reach: RetryableFailure, nothing moved; the next attempt fetches again.
    """
    sources = {image.pk: files.original(image.path) for image in batch if not image.stored_key}
    remote = [image for image in batch if image.stored_key]
    store = runtime.store()
    if not remote:
        return sources
    if store is None:
        raise PermanentFailure("images have originals in a storage bucket, but STORAGE_URL is not set")

    def fetch(image: Image) -> None:
        target = files.fetched_original(series_id, image.pk, lease.tag)
        try:
            store.get(image.stored_key, target)
        except FileNotFoundError:
            target.unlink(missing_ok=True)

    with ThreadPoolExecutor(max_workers=min(TRANSFERS, len(remote)), thread_name_prefix="sendit-fetch") as pool:
        failures = [exc for exc in pool.map(_failure_of(fetch), remote) if exc is not None]
    if failures:
        for image in remote:
            files.fetched_original(series_id, image.pk, lease.tag).unlink(missing_ok=True)
        raise RetryableFailure(str(failures[0])) from None
    for image in remote:
        sources[image.pk] = files.fetched_original(series_id, image.pk, lease.tag)
    return sources


def _failure_of(step: Any) -> Any:
    """``step`` for a thread pool's map: returns the StoreError it raised instead of raising it."""

    def run(item: Any) -> StoreError | None:
        try:
            step(item)
        except StoreError as exc:
            return exc
        return None

    return run


@contextmanager
def local_original(image: Image) -> Iterator[Path]:
    """One image's original as a local file for as long as the block runs (fetched from the store when
    it is there, removed afterwards)."""
    if not image.stored_key:
        yield files.original(image.path)
        return
    store = runtime.store()
    if store is None:
        raise PermanentFailure("images have originals in a storage bucket, but STORAGE_URL is not set")
    target = files.series_folder(image.series_id) / f"{image.pk}.meta.orig.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        store.get(image.stored_key, target)
        yield target
    finally:
        target.unlink(missing_ok=True)


def write_series_metadata(series: Series, ids: Identifiers) -> None:
    """WORK_FOLDER/series-<id>/metadata.json: the allow-listed, de-identified fields for researchers
    (sendit.deid.metadata), for the Google metadata store to pick up. A failure here is logged and
    does not hold the images back: the document carries no image and can be written again."""
    from sendit.deid.metadata import write_series_document

    made = series.images.exclude(deid_sop_instance_uid="")
    first = made.order_by("id").first()
    if first is None:
        return
    try:
        study_uid = Study.objects.filter(pk=series.study_id).values_list("deid_study_uid", flat=True).first()
        with local_original(first) as original:
            written = write_series_document(
                original,
                runtime.deidentifier().known_identifiers,
                files.series_folder(series.pk) / "metadata.json",
                pseudonym=ids.patient_id,
                study_uid=study_uid or "",
                series_uid=series.deid_series_uid,
                images=made.count(),
            )
        described = json.loads(written.read_text(encoding="utf-8")).get("series_description") or ""
        Series.objects.filter(pk=series.pk).update(description=str(described)[:200])  # the dashboard's
    except Exception as exc:
        log.warning("series #%s: metadata.json not written (%s)", series.pk, type(exc).__name__)


def _quarantine(series: Series, image: Image, lease: Lease, reason: str) -> None:
    hold_lease_now(lease)  # a stale worker must not move an original the new holder is working on
    files.working_copy(series.pk, image.pk).unlink(missing_ok=True)
    # an original in the store stays there under its key until released or discarded; a file now at
    # its old input path is a new arrival, not this image's
    stored = "" if image.stored_key else files.set_aside(image.path, "quarantine")
    with fenced(lease):
        Image.objects.filter(pk=image.pk, status=Status.PROCESSING).update(set_aside_at=stored)
        move_images(series, [image.pk], Status.QUARANTINED, reason, expect=(Status.PROCESSING,), lease=lease)
    log.warning("image #%s quarantined: %s", image.pk, reason)


def hold_lease_now(lease: Lease) -> None:
    """Before a step on files that cannot be undone: raises LeaseLost if the lease is gone."""
    with fenced(lease):
        pass


# --- deliver and verify ---------------------------------------------------------------------------


def _outgoing(series: Series, images: list[Image], ids: Identifiers, written: Written) -> list[OutgoingImage]:
    # One query per batch, not per image (the series' cached study predates de-identification).
    study_uid = Study.objects.filter(pk=series.study_id).values_list("deid_study_uid", flat=True).get()
    outgoing = []
    for image in images:
        path = files.working_copy(series.pk, image.pk)
        if image.pk in written:  # written by this run: we know what is in it
            sop_class_uid, transfer_syntax_uid = written[image.pk]
        else:  # resuming after a restart: read the header of the working copy
            sop_class_uid, transfer_syntax_uid = sop_class_and_syntax(path)
        outgoing.append(
            OutgoingImage(
                image_id=image.pk,
                path=path,
                patient_id=ids.patient_id,
                study_uid=study_uid,
                series_uid=series.deid_series_uid,
                sop_instance_uid=image.deid_sop_instance_uid,
                sop_class_uid=sop_class_uid,
                transfer_syntax_uid=transfer_syntax_uid,
            )
        )
    return outgoing


def _about(destination: Destination | SeriesDestination, exc: DestinationError, doing: str = "") -> str:
    """``name: [doing: ]reason``, naming the destination once (adapters already prefix their name)."""
    text = str(exc)
    prefix = f"{destination.name}: "
    if text.startswith(prefix):
        text = text[len(prefix) :]
    return prefix + (f"{doing}: " if doing else "") + text


def deliver_and_verify(series: Series, lease: Lease, keeper: LeaseKeeper, written: Written) -> None:
    """Deliver, then verify what was delivered; images that could not be delivered this time keep
    their siblings from nothing: those are verified and DONE, the rest retried with back-off.

    With series destinations (NIfTI, metadata) configured, verified images stay SENT until the whole
    series is delivered and those destinations answered (:func:`deliver_series_level`): a series is
    DONE only once everything made of it is where it belongs."""
    destinations = runtime.destinations()
    series_level = runtime.series_destinations()
    if not destinations:  # configuration forbids it; never call "delivered to nobody" DONE
        raise PermanentFailure("no destination is configured")
    try:
        retry_reasons: list[str] = []
        missing_at: set[str] = set()
        for _ in range(2):  # a second pass re-sends what verification found missing
            retry_reasons = deliver_pending(series, destinations, lease, keeper, written)
            missing_at = verify_sent(series, destinations, lease, finish=not series_level)
            if not missing_at:
                break
        if retry_reasons:
            more = f" (+{len(retry_reasons) - 1} more)" if len(retry_reasons) > 1 else ""
            raise RetryableFailure(retry_reasons[0] + more)
        if missing_at:
            raise RetryableFailure(f"{', '.join(sorted(missing_at))}: images still missing after a re-send")
        if series_level:
            deliver_series_level(series, series_level, lease, keeper)
    finally:
        for destination in destinations:
            destination.close()
        for other in series_level:
            other.close()


def deliver_series_level(
    series: Series, destinations: list[SeriesDestination], lease: Lease, keeper: LeaseKeeper
) -> None:
    """Every image is delivered and verified (SENT): hand the series to each series destination, in
    order, then SENT → DONE.

    1. Read the allow-listed metadata document (writing it again if it is gone).
    2. Each destination delivers and reads back its object(s); links pass on to the next, notes
       become series events, and each image gets a Delivery row for it (the dashboard's last success).
       A failure raises (retried, or ERROR with words), the images stay SENT.
    3. SENT → DONE, naming the status it expects.
    """
    sent = list(series.images.filter(status=Status.SENT).order_by("id"))
    if not sent:
        return
    ids = Identifiers.from_json(SeriesIdentifiers.objects.get(series=series).response)
    series.refresh_from_db(fields=["deid_series_uid"])
    images = tuple(_outgoing(series, sent, ids, {}))
    missing_copies = [image.image_id for image in images if not image.path.exists()]
    if missing_copies:  # the working copies are gone (a wiped work folder): de-identify again
        _deidentify_again(series, missing_copies, Status.SENT, lease)
        raise RetryableFailure("working copies missing; de-identifying again")
    metadata = _series_metadata(series, ids)
    links: tuple[str, ...] = ()
    for destination in destinations:
        keeper.check()
        outgoing = OutgoingSeries(
            patient_id=ids.patient_id,
            study_uid=images[0].study_uid,
            series_uid=series.deid_series_uid,
            images=images,
            metadata=metadata,
            links=links,
        )
        try:
            outcome = destination.deliver_series(outgoing)
        except DestinationError as exc:
            if exc.retryable:
                raise RetryableFailure(_about(destination, exc)) from exc
            raise PermanentFailure(_about(destination, exc)) from exc
        links += outcome.links
        with fenced(lease):  # its confirmation per image, as the image destinations' (dashboard, alerts)
            Delivery.objects.bulk_create(
                [Delivery(image_id=image.image_id, destination=destination.name) for image in images],
                ignore_conflicts=True,
            )
        if outcome.notes:
            with fenced(lease):
                Event.objects.bulk_create(
                    [
                        Event(series=series, from_status="", to_status="", reason=clip(f"{destination.name}: {note}"))
                        for note in outcome.notes
                    ]
                )
    with fenced(lease):
        move_images(series, [image.pk for image in sent], Status.DONE, "verified", expect=(Status.SENT,), lease=lease)
        Series.objects.filter(pk=series.pk).update(stage=Stage.VERIFIED)


def _series_metadata(series: Series, ids: Identifiers) -> dict[str, Any] | None:
    """The series' metadata.json (sendit.deid.metadata), written again when it is missing."""
    import json

    path = files.series_folder(series.pk) / "metadata.json"
    if not path.exists():
        write_series_metadata(series, ids)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def deliver_pending(
    series: Series, destinations: list[Destination], lease: Lease, keeper: LeaseKeeper, written: Written
) -> list[str]:
    """Send every DONEPROCESSING image; returns the reasons of images that failed in a retryable way."""
    ids = Identifiers.from_json(SeriesIdentifiers.objects.get(series=series).response)
    series.refresh_from_db(fields=["deid_series_uid"])
    pending = list(_in_scope(series.images.filter(status=Status.DONEPROCESSING), lease).order_by("id"))
    lost = [image.pk for image in pending if not files.working_copy(series.pk, image.pk).exists()]
    if lost:  # the working copy is gone (crash, wiped folder): de-identify again, same output UIDs
        _deidentify_again(series, lost, Status.DONEPROCESSING, lease)
        raise WorkingCopiesLost("working copies missing; de-identifying again")
    retry_reasons: list[str] = []
    batch_size = runtime.config().BATCH_SIZE
    for start in range(0, len(pending), batch_size):
        keeper.check()
        batch = pending[start : start + batch_size]
        outgoing = _outgoing(series, batch, ids, written)
        for destination in destinations:
            already = set(
                Delivery.objects.filter(image__in=batch, destination=destination.name).values_list(
                    "image_id", flat=True
                )
            )
            todo = [item for item in outgoing if item.image_id not in already]
            if not todo:
                continue
            keeper.check()
            try:
                results = destination.send(todo)
            except DestinationError as exc:
                if exc.retryable:
                    raise RetryableFailure(_about(destination, exc)) from exc
                raise PermanentFailure(_about(destination, exc)) from exc
            finally:
                _record_destination_events(series, destination)
            with fenced(lease):
                Delivery.objects.bulk_create(
                    [
                        Delivery(
                            image_id=r.image_id,
                            destination=destination.name,
                            status_code=r.status,
                            note=clip(r.message),
                        )
                        for r in results
                        if r.delivered
                    ],
                    ignore_conflicts=True,
                )
                for result in results:
                    if result.delivered:
                        continue
                    reason = f"{destination.name}: {result.message}"
                    if result.permanent:
                        move_images(
                            series,
                            [result.image_id],
                            Status.ERROR,
                            reason,
                            expect=(Status.DONEPROCESSING,),
                            lease=lease,
                        )
                    else:
                        retry_reasons.append(reason)
        wanted = {destination.name for destination in destinations}
        confirmed: dict[int, set[str]] = {}
        for image_id, name in Delivery.objects.filter(image__in=batch).values_list("image_id", "destination"):
            confirmed.setdefault(image_id, set()).add(name)
        delivered = [image.pk for image in batch if wanted <= confirmed.get(image.pk, set())]
        move_images(series, delivered, Status.SENT, expect=(Status.DONEPROCESSING,), lease=lease)
    if not retry_reasons and lease.part_id is None:  # a part leaves the series' stage to the join
        with fenced(lease):
            Series.objects.filter(pk=series.pk).update(stage=Stage.DELIVERED)
    return retry_reasons


def _record_destination_events(series: Series, destination: Destination) -> None:
    """What the adapter saw on the way (a reconnect after a lost association) as series events; the
    adapter's lines name image ids and causes, never a value."""
    lines = list(getattr(destination, "events", ()) or ())
    if lines:
        Event.objects.bulk_create(
            [
                Event(series=series, from_status="", to_status="", reason=clip(f"{destination.name}: {line}"))
                for line in lines
            ]
        )


def verify_sent(series: Series, destinations: list[Destination], lease: Lease, finish: bool = True) -> set[str]:
    """SENT → DONE when every destination holds every image; returns the destinations missing some.

    With ``finish`` false the verified images stay SENT (a series destination comes next)."""
    sent = list(series.images.filter(status=Status.SENT))
    if not sent:
        return set()
    by_uid = {image.deid_sop_instance_uid: image for image in sent}
    missing_ids: set[int] = set()
    missing_at: set[str] = set()
    for destination in destinations:
        try:
            missing = destination.missing(series.deid_series_uid, set(by_uid))
        except DestinationError as exc:
            if not exc.retryable:  # a refusal (the PACS does not let us ask) will not pass by waiting
                raise PermanentFailure(_about(destination, exc, "verification refused")) from exc
            raise RetryableFailure(_about(destination, exc, "verification failed")) from exc
        if missing:
            missing_at.add(destination.name)
        with fenced(lease):
            for uid in missing:
                image = by_uid[uid]
                missing_ids.add(image.pk)
                Delivery.objects.filter(image=image, destination=destination.name).delete()
    with fenced(lease):
        if missing_ids:
            move_images(
                series,
                missing_ids,
                Status.DONEPROCESSING,
                "not found at the destination; sending again",
                expect=(Status.SENT,),
                lease=lease,
            )
        if finish:
            found = [image.pk for image in sent if image.pk not in missing_ids]
            move_images(series, found, Status.DONE, "verified", expect=(Status.SENT,), lease=lease)
            Series.objects.filter(pk=series.pk).update(stage=Stage.VERIFIED)
    return missing_at


# --- clean up -------------------------------------------------------------------------------------


def _clean_up_stored(series: Series, lease: Lease, rows: list[tuple[int, str, str, str]]) -> None:
    """Clean-up of DONE images whose originals are in the store; ``rows`` are (id, path, sha256, key).

    1. In one fenced transaction (a worker that lost its lease removes nothing): mark them cleaned,
       naming the status expected; keep a copy (KEEP_ORIGINALS: kept/<its name>) and delete their
       keys, one request per 1,000. If the store fails, the marks roll back: cleaned next time.
    2. Remove their working copies, and a file that ingest left in the input folder (a crash between
       commit and removal) when its bytes are this original's.
    """
    cfg = runtime.config()
    store = runtime.store()
    if store is None:
        raise PermanentFailure("images have originals in a storage bucket, but STORAGE_URL is not set")
    now = timezone.now()
    with fenced(lease):
        # names the status it expects: an image another writer moved on since is left out
        Image.objects.filter(pk__in=[row[0] for row in rows], status=Status.DONE, cleaned_at__isnull=True).update(
            cleaned_at=now
        )
        marked = set(Image.objects.filter(pk__in=[row[0] for row in rows], cleaned_at=now).values_list("id", flat=True))
        mine = [row for row in rows if row[0] in marked]
        if cfg.KEEP_ORIGINALS:
            for _, path, _, key in mine:
                store.copy(key, files.kept_key(path))
        store.delete_many([key for *_, key in mine])
    for image_id, path, digest, _ in mine:
        original = files.original(path)
        if original.exists() and files.sha256_of(original) == digest:
            files.remove_original(path)
        if not cfg.KEEP_WORKING:
            files.working_copy(series.pk, image_id).unlink(missing_ok=True)


def _replaced(path: str, digest: str) -> bool:
    """Is the file now at an original's input path another one than the image was made from?"""
    if not digest or not files.inside_input(path):
        return False  # nothing Sendit would touch there
    original = files.original(path)
    return original.exists() and files.sha256_of(original) != digest


def clean_up_done(series: Series, lease: Lease, keeper: LeaseKeeper) -> None:
    """Originals and working copies of DONE images go away (unless configured to keep them), once each.

    Resumable: a worker killed half-way leaves DONE images with no ``cleaned_at``, and the periodic
    requeue finds the series by them. A file now at a cleaned image's path is a new arrival: it is
    removed only if its bytes are the ones this image was made from.
    """
    cfg = runtime.config()
    pending = series.images.filter(status=Status.DONE, cleaned_at__isnull=True)
    stored = list(pending.exclude(stored_key="").values_list("id", "path", "sha256", "stored_key"))
    if stored:
        keeper.check()
        _clean_up_stored(series, lease, stored)
    local = list(pending.filter(stored_key="").values_list("id", "path", "sha256"))
    for start in range(0, len(local), cfg.BATCH_SIZE):  # one transaction per batch, not per image
        keeper.check()
        rows = local[start : start + cfg.BATCH_SIZE]
        # Hashed only where Sendit would move or remove the file (inside the input folder; the
        # folder `sendit import` was given is the user's and left alone): another file at this
        # path since is a new arrival, not ours to remove.
        replaced = {image_id for image_id, path, digest in rows if _replaced(path, digest)}
        # The file operations run inside the fenced transaction: a worker that lost its lease (and
        # whose series was cleaned and perhaps received again meanwhile) removes nothing.
        with fenced(lease):
            now = timezone.now()
            ids = [row[0] for row in rows]
            # names the status it expects: an image another writer moved on since is left out
            Image.objects.filter(pk__in=ids, status=Status.DONE, cleaned_at__isnull=True).update(cleaned_at=now)
            marked = set(Image.objects.filter(pk__in=ids, cleaned_at=now).values_list("id", flat=True))
            for image_id, path, _ in rows:
                if image_id not in marked:
                    continue
                if image_id in replaced:
                    pass
                elif cfg.KEEP_ORIGINALS:
                    files.set_aside(path, "kept")
                else:
                    files.remove_original(path)
                if not cfg.KEEP_WORKING:
                    files.working_copy(series.pk, image_id).unlink(missing_ok=True)
    if not cfg.KEEP_WORKING and not series.images.exclude(status__in=(Status.DONE, Status.SKIPPED)).exists():
        folder = files.series_folder(series.pk)
        (folder / "metadata.json").unlink(missing_ok=True)  # delivered by a metadata store, if any (docs)
        for leftover in folder.glob("*.g*.dcm") if folder.exists() else ():
            leftover.unlink(missing_ok=True)  # a stale worker's file of an older lease generation
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
