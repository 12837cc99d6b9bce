"""One series through identify → de-identify → deliver → verify → clean up, resumable at every step.

A series is worked on by one worker at a time (a lease in the database). Each step picks up images
by status, so a worker that dies leaves a state the next one continues from: nothing lost, and
deliveries already confirmed are not repeated.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from sendit.destinations.base import Destination, DestinationError, OutgoingImage
from sendit.identifiers.base import IdentifierError, Identifiers, SeriesHeader
from sendit.relay import files, runtime
from sendit.relay.models import IN_FLIGHT, Delivery, Image, Series, SeriesIdentifiers, Status, Study
from sendit.relay.transitions import clip, move_images, refresh_series_status

log = logging.getLogger("sendit.pipeline")


class RetryableFailure(Exception):
    """A step failed for a reason that may pass (destination down, service busy)."""


class LeaseLost(Exception):
    """This worker's lease expired and another worker holds the series: it must not write on."""


class PermanentFailure(Exception):
    """A step failed for a reason that will not pass by waiting; the in-flight images go to ERROR."""


@dataclass(frozen=True)
class Outcome:
    """What the caller should do next: nothing, or run the series again after ``retry_in`` seconds."""

    finished: bool
    retry_in: float | None = None
    busy: bool = False


def lease_owner_name() -> str:
    """host:pid:random, so that a lease left by a dead process on this host can be taken at once."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def holder_is_dead(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's worker: only the expiry can tell
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire_lease(series_id: int, owner: str) -> bool:
    """Take the series if nobody holds it, the lease expired, or its holder died on this host."""
    now = timezone.now()
    expires = now + timedelta(seconds=runtime.config().LEASE_SECONDS)
    free = Q(lease_expires__isnull=True) | Q(lease_expires__lt=now)
    if Series.objects.filter(Q(pk=series_id) & free).update(lease_owner=owner, lease_expires=expires) == 1:
        return True
    holder = Series.objects.filter(pk=series_id).values_list("lease_owner", flat=True).first()
    if holder and holder_is_dead(holder):
        log.warning("series #%s: its worker died; taking it over", series_id)
        taken = Series.objects.filter(pk=series_id, lease_owner=holder).update(lease_owner=owner, lease_expires=expires)
        return taken == 1
    return False


def renew_lease(series_id: int, owner: str) -> None:
    """Extend the lease after each batch; if another worker took the series meanwhile, stop here."""
    expires = timezone.now() + timedelta(seconds=runtime.config().LEASE_SECONDS)
    if Series.objects.filter(pk=series_id, lease_owner=owner).update(lease_expires=expires) != 1:
        raise LeaseLost(f"series #{series_id}: lease taken over by another worker")


def release_lease(series_id: int, owner: str) -> None:
    Series.objects.filter(pk=series_id, lease_owner=owner).update(lease_owner="", lease_expires=None)


def backoff_seconds(attempts: int) -> float:
    cfg = runtime.config()
    return float(min(cfg.RETRY_CAP_SECONDS, cfg.RETRY_BASE_SECONDS * 2 ** max(0, attempts - 1)))


def process_series(series_id: int) -> Outcome:
    owner = lease_owner_name()
    if not acquire_lease(series_id, owner):
        return Outcome(finished=False, busy=True)
    try:
        series = Series.objects.select_related("study").get(pk=series_id)
        try:
            if series.images.filter(status__in=IN_FLIGHT).exists():
                ids = ensure_identifiers(series)
                written = deidentify_pending(series, ids, owner)
                deliver_and_verify(series, owner, written)
            clean_up_done(series)
        except LeaseLost as lost:
            log.warning("%s; leaving it to that worker", lost)
            return Outcome(finished=False, busy=True)
        except RetryableFailure as failure:
            return _schedule_retry(series, str(failure))
        except PermanentFailure as failure:
            _fail_in_flight(series, str(failure))
            return Outcome(finished=True)
        except Exception as exc:  # an unforeseen failure is retried and then shown, never left silent
            # only the type: an exception's text may quote a value (a provider's KeyError of an MRN)
            log.error("series #%s: unexpected %s", series_id, type(exc).__name__)
            return _schedule_retry(series, f"unexpected error ({type(exc).__name__})")
        Series.objects.filter(pk=series.pk).update(attempts=0, last_error="", next_attempt_at=None)
        refresh_series_status(series)
        return Outcome(finished=True)
    finally:
        release_lease(series_id, owner)


def _schedule_retry(series: Series, reason: str) -> Outcome:
    attempts = series.attempts + 1
    if attempts >= runtime.config().MAX_ATTEMPTS:
        Series.objects.filter(pk=series.pk).update(attempts=attempts, next_attempt_at=None)
        _fail_in_flight(series, f"{reason} (gave up after {attempts} attempts)")
        return Outcome(finished=True)
    delay = backoff_seconds(attempts)
    Series.objects.filter(pk=series.pk).update(
        attempts=attempts,
        last_error=clip(f"retrying: {reason}"),
        next_attempt_at=timezone.now() + timedelta(seconds=delay),
        stage="retrying",
    )
    log.warning("series #%s: attempt %s failed (%s); retrying in %.0f s", series.pk, attempts, reason, delay)
    return Outcome(finished=False, retry_in=delay)


def _fail_in_flight(series: Series, reason: str) -> None:
    ids = list(series.images.filter(status__in=IN_FLIGHT).values_list("id", flat=True))
    move_images(series, ids, Status.ERROR, reason)
    Series.objects.filter(pk=series.pk).update(last_error=clip(reason), stage="error")
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
            for item in waiting:
                if item.series_uid in answers:
                    SeriesIdentifiers.objects.get_or_create(
                        series=item, defaults={"provider": name, "response": answers[item.series_uid].to_json()}
                    )
        stored = SeriesIdentifiers.objects.get(series=series)
        Series.objects.filter(pk=series.pk).update(stage="identified")
    return Identifiers.from_json(stored.response)


# --- de-identify ----------------------------------------------------------------------------------


# image id → (SOPClassUID, TransferSyntaxUID) of the working copy written by this run
Written = dict[int, tuple[str, str]]


def deidentify_pending(series: Series, ids: Identifiers, owner: str) -> Written:
    """De-identify every NEW/PROCESSING image; returns what it wrote, so delivery needn't re-read headers."""
    from sendit.deid import DeidError

    engine = runtime.deidentifier()
    batch_size = runtime.config().BATCH_SIZE
    written: Written = {}
    files.working_copy(series.pk, 0).parent.mkdir(parents=True, exist_ok=True)
    while True:
        batch = list(series.images.filter(status__in=(Status.NEW, Status.PROCESSING)).order_by("id")[:batch_size])
        if not batch:
            break
        move_images(series, [image.id for image in batch], Status.PROCESSING)
        done: list[int] = []
        for image in batch:
            source = files.original(image.path)
            target = files.working_copy(series.pk, image.pk)
            try:
                digest = files.sha256_of(source)
                result = engine.deidentify_file(source, target, ids)
            except FileNotFoundError:
                _quarantine(series, image, "original file disappeared before de-identification")
                continue
            except DeidError as exc:
                _quarantine(series, image, f"de-identification failed: {exc}")
                continue
            except Exception as exc:  # fail closed: whatever went wrong, this image is not delivered
                _quarantine(series, image, f"de-identification failed: {type(exc).__name__}")
                continue
            Image.objects.filter(pk=image.pk).update(deid_sop_instance_uid=result.sop_instance_uid, sha256=digest)
            if not series.deid_series_uid:
                series.deid_series_uid = result.series_uid
                Series.objects.filter(pk=series.pk).update(deid_series_uid=result.series_uid)
                Study.objects.filter(pk=series.study_id).update(deid_study_uid=result.study_uid)
            done.append(image.pk)
            written[image.pk] = (result.sop_class_uid, result.transfer_syntax_uid)
        move_images(series, done, Status.DONEPROCESSING)
        renew_lease(series.pk, owner)
    write_series_metadata(series, ids)
    Series.objects.filter(pk=series.pk).update(stage="deidentified")
    return written


def write_series_metadata(series: Series, ids: Identifiers) -> None:
    """WORK_FOLDER/series-<id>/metadata.json: the allow-listed, de-identified fields for researchers
    (sendit.deid.metadata), for the Google metadata store to pick up. A failure here is logged and
    does not hold the images back: the document carries no image and can be written again."""
    from sendit.deid.engine import read_dicom
    from sendit.deid.metadata import describe_series, series_document, write_document

    made = series.images.exclude(deid_sop_instance_uid="")
    first = made.order_by("id").first()
    if first is None:
        return
    try:
        header = read_dicom(files.original(first.path), headers_only=True)
        described = describe_series(header, runtime.deidentifier().known_identifiers(header))
        study_uid = Study.objects.filter(pk=series.study_id).values_list("deid_study_uid", flat=True).first()
        document = series_document(
            described,
            pseudonym=ids.patient_id,
            study_uid=study_uid or "",
            series_uid=series.deid_series_uid,
            images=made.count(),
        )
        write_document(document, files.working_copy(series.pk, first.pk).parent / "metadata.json")
    except Exception as exc:
        log.warning("series #%s: metadata.json not written (%s)", series.pk, type(exc).__name__)


def _quarantine(series: Series, image: Image, reason: str) -> None:
    files.working_copy(series.pk, image.pk).unlink(missing_ok=True)
    stored = files.set_aside(image.path, "quarantine")
    Image.objects.filter(pk=image.pk).update(set_aside_at=stored)
    move_images(series, [image.pk], Status.QUARANTINED, reason)
    log.warning("image #%s (%s) quarantined: %s", image.pk, image.path, reason)


# --- deliver and verify ---------------------------------------------------------------------------


def _outgoing(series: Series, images: list[Image], ids: Identifiers, written: Written) -> list[OutgoingImage]:
    from pydicom import dcmread

    # One query per batch, not per image (the series' cached study predates de-identification).
    study_uid = Study.objects.filter(pk=series.study_id).values_list("deid_study_uid", flat=True).get()
    outgoing = []
    for image in images:
        path = files.working_copy(series.pk, image.pk)
        if image.pk in written:  # written by this run: we know what is in it
            sop_class_uid, transfer_syntax_uid = written[image.pk]
        else:  # resuming after a restart: read the header of the working copy
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            sop_class_uid = str(meta.get("SOPClassUID", ""))
            transfer_syntax_uid = str(meta.file_meta.TransferSyntaxUID)
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


def _about(destination: Destination, exc: DestinationError, doing: str = "") -> str:
    """``name: [doing: ]reason``, naming the destination once (adapters already prefix their name)."""
    text = str(exc)
    prefix = f"{destination.name}: "
    if text.startswith(prefix):
        text = text[len(prefix) :]
    return prefix + (f"{doing}: " if doing else "") + text


def deliver_and_verify(series: Series, owner: str, written: Written) -> None:
    destinations = runtime.destinations()
    if not destinations:  # configuration forbids it; never call "delivered to nobody" DONE
        raise PermanentFailure("no destination is configured")
    try:
        for _ in range(2):  # a second pass re-sends what verification found missing
            deliver_pending(series, destinations, owner, written)
            if not verify_sent(series, destinations):
                return
        raise RetryableFailure("destination is missing images after a re-send")
    finally:
        for destination in destinations:
            destination.close()


def deliver_pending(series: Series, destinations: list[Destination], owner: str, written: Written) -> None:
    ids = Identifiers.from_json(SeriesIdentifiers.objects.get(series=series).response)
    series.refresh_from_db(fields=["deid_series_uid"])
    pending = list(series.images.filter(status=Status.DONEPROCESSING).order_by("id"))
    lost = [image.pk for image in pending if not files.working_copy(series.pk, image.pk).exists()]
    if lost:  # the working copy is gone (crash, wiped folder): de-identify again, same output UIDs
        move_images(series, lost, Status.NEW, "working copy missing; de-identifying again")
        raise RetryableFailure("working copies missing; de-identifying again")
    retry_reasons: list[str] = []
    batch_size = runtime.config().BATCH_SIZE
    for start in range(0, len(pending), batch_size):
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
            try:
                results = destination.send(todo)
            except DestinationError as exc:
                if exc.retryable:
                    raise RetryableFailure(_about(destination, exc)) from exc
                raise PermanentFailure(_about(destination, exc)) from exc
            Delivery.objects.bulk_create(
                [
                    Delivery(
                        image_id=r.image_id, destination=destination.name, status_code=r.status, note=clip(r.message)
                    )
                    for r in results
                    if r.delivered
                ],
                ignore_conflicts=True,
            )
            for result in results:
                if result.delivered:
                    continue
                if result.permanent:
                    move_images(series, [result.image_id], Status.ERROR, f"{destination.name}: {result.message}")
                else:
                    retry_reasons.append(f"{destination.name}: {result.message}")
        renew_lease(series.pk, owner)
        wanted = {destination.name for destination in destinations}
        confirmed: dict[int, set[str]] = {}
        for image_id, name in Delivery.objects.filter(image__in=batch).values_list("image_id", "destination"):
            confirmed.setdefault(image_id, set()).add(name)
        delivered = [image.pk for image in batch if wanted <= confirmed.get(image.pk, set())]
        move_images(series, delivered, Status.SENT)
    if retry_reasons:
        raise RetryableFailure(
            retry_reasons[0] + (f" (+{len(retry_reasons) - 1} more)" if len(retry_reasons) > 1 else "")
        )
    Series.objects.filter(pk=series.pk).update(stage="delivered")


def verify_sent(series: Series, destinations: list[Destination]) -> bool:
    """SENT → DONE when every destination holds every image; returns True when some were missing."""
    sent = list(series.images.filter(status=Status.SENT))
    if not sent:
        return False
    by_uid = {image.deid_sop_instance_uid: image for image in sent}
    missing_ids: set[int] = set()
    for destination in destinations:
        try:
            missing = destination.missing(series.deid_series_uid, set(by_uid))
        except DestinationError as exc:
            raise RetryableFailure(_about(destination, exc, "verification failed")) from exc
        for uid in missing:
            image = by_uid[uid]
            missing_ids.add(image.pk)
            Delivery.objects.filter(image=image, destination=destination.name).delete()
    if missing_ids:
        move_images(series, missing_ids, Status.DONEPROCESSING, "not found at the destination; sending again")
    move_images(series, [image.pk for image in sent if image.pk not in missing_ids], Status.DONE, "verified")
    Series.objects.filter(pk=series.pk).update(stage="verified")
    return bool(missing_ids)


# --- clean up -------------------------------------------------------------------------------------


def clean_up_done(series: Series) -> None:
    """Originals and working copies of DONE images go away (unless configured to keep them), once each.

    A file now at a cleaned image's path is a new arrival: it is removed only if its bytes are the
    ones this image was made from.
    """
    cfg = runtime.config()
    pending = series.images.filter(status=Status.DONE, cleaned_at__isnull=True)
    for image_id, path, digest in pending.values_list("id", "path", "sha256"):
        original = files.original(path)
        replaced = original.exists() and bool(digest) and files.sha256_of(original) != digest
        if replaced:
            pass  # another file arrived at this path since: a new arrival, not ours to remove
        elif cfg.KEEP_ORIGINALS:
            files.set_aside(path, "kept")
        else:
            files.remove_original(path)
        if not cfg.KEEP_WORKING:
            files.working_copy(series.pk, image_id).unlink(missing_ok=True)
        Image.objects.filter(pk=image_id).update(cleaned_at=timezone.now())
    if not cfg.KEEP_WORKING and not series.images.exclude(status__in=(Status.DONE, Status.SKIPPED)).exists():
        folder = files.working_copy(series.pk, 0).parent
        (folder / "metadata.json").unlink(missing_ok=True)  # until a metadata store takes it (docs)
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
