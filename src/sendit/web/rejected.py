"""What a person can do with a received file that did not become an image (not DICOM, truncated,
a conflicting copy, missing UIDs, a duplicate): the same in the web, the API and the CLI.

- **download** (reviewer): its bytes, read through ``files.read_original``; an event.
- **retry** (operator): back into the input folder where it arrived (or, left in place, taken by
  the next scan): ingest decides again — after a person replaced or repaired it.
- **resolve** a conflict (two files with one SOPInstanceUID and different content): ``processed``
  keeps the image that was processed and deletes this copy (reviewer, as discard); ``this`` makes
  this copy the image's original and processes the image again (operator).
- **discard** (reviewer): the set-aside file is deleted.

Each action resolves the row (``resolved`` says what and by whom): it leaves the open counts but is
kept for the record. A row's status change is a conditional UPDATE naming ``resolved=""``: of two
people acting at once, the first wins and the second is told nothing changed.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.utils import timezone

from sendit.relay import files, roles
from sendit.relay.models import IN_FLIGHT, Event, Image, ReceivedFile, Status
from sendit.relay.transitions import clip
from sendit.web import actions

log = logging.getLogger("sendit.web.rejected")

FILE_ACTIONS = ("retry", "discard", "resolve")
WINNERS = ("processed", "this")
CONFLICT = "conflict:"


@dataclass
class FileResult:
    action: str
    file_id: int
    changed: int = 0
    problems: list[str] = field(default_factory=list)

    def message(self) -> str:
        verb = {"retry": "retried", "discard": "discarded", "resolve": "resolved"}[self.action]
        text = f"received file #{self.file_id}: " + (verb if self.changed else f"not {verb}")
        return text + ("; " + "; ".join(self.problems) if self.problems else "")

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "file_id": self.file_id, "changed": self.changed, "problems": self.problems}


def file_row(row: ReceivedFile) -> dict[str, Any]:
    """PHI-free: the id, status, reason and the image it names; never the path (folder names may be
    patient names)."""
    return {
        "id": row.pk,
        "status": row.status,
        "reason": row.reason,
        "image_id": row.image_id,
        "conflict": row.reason.startswith(CONFLICT),
        "stored": bool(row.stored_at),
        "resolved": row.resolved,
        "created": row.created.isoformat() if row.created else None,
    }


def _event(row: ReceivedFile, user: Any, what: str) -> None:
    series_id = None
    if row.image_id is not None:
        series_id = Image.objects.filter(pk=row.image_id).values_list("series_id", flat=True).first()
    Event.objects.create(
        series_id=series_id,
        image=None,
        from_status=row.status,
        to_status=row.status,
        reason=clip(f"received file #{row.pk}: {what} by {user.get_username()}"),
        user=user if getattr(user, "pk", None) else None,
    )


def _resolve(row: ReceivedFile, text: str) -> bool:
    # names "still open": of two people acting at once the first wins; the other changes nothing
    return (
        ReceivedFile.objects.filter(pk=row.pk, resolved="").update(
            resolved=clip(text)[:200], resolved_at=timezone.now()
        )
        == 1
    )


def _need(user: Any, permission: str, role: str) -> None:
    if not user.has_perm(permission):
        raise actions.Forbidden(f"this needs the {role} role")


def download(row: ReceivedFile, user: Any) -> bytes:
    """The file's bytes for a reviewer; raises Forbidden, FileNotFoundError or OSError."""
    _need(user, roles.REVIEW, "reviewer")
    data = files.read_original(row.path, row.stored_at)
    _event(row, user, "downloaded")
    return data


def _back_to_input(row: ReceivedFile) -> str | None:
    """Move a set-aside file back to where it arrived; returns a problem or None."""
    if not row.stored_at:
        return None  # left in place: the next scan takes it once the row is resolved
    if not files.inside_input(row.path):
        return "it arrived outside the input folder: import it again with `sendit import`"
    source, target = Path(row.stored_at), files.original(row.path)
    if not os.path.lexists(source):
        return "the set-aside file is gone"
    if os.path.lexists(target):
        return "another file is in its place in the input folder"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))  # the watcher takes it like a new arrival
    return None


def retry(row: ReceivedFile, user: Any) -> FileResult:
    _need(user, roles.CHANGE, "operator")
    outcome = FileResult("retry", row.pk)
    if row.resolved:
        outcome.problems.append(f"already resolved ({row.resolved})")
        return outcome
    problem = _back_to_input(row)
    if problem:
        outcome.problems.append(problem)
        return outcome
    if _resolve(row, f"retried by {user.get_username()}"):
        outcome.changed = 1
        _event(row, user, "retried")
    return outcome


def discard(row: ReceivedFile, user: Any, text: str = "discarded") -> FileResult:
    _need(user, roles.DISCARD, "reviewer")
    outcome = FileResult("discard", row.pk)
    if row.resolved:
        outcome.problems.append(f"already resolved ({row.resolved})")
        return outcome
    if not _resolve(row, f"{text} by {user.get_username()}"):
        return outcome
    if row.stored_at:  # a file left in place (or outside the input folder) is never deleted here
        Path(row.stored_at).unlink(missing_ok=True)
    outcome.changed = 1
    _event(row, user, text)
    return outcome


def resolve(row: ReceivedFile, user: Any, winner: str) -> FileResult:
    """A conflict: ``processed`` keeps the processed image, ``this`` makes this copy its original."""
    if winner not in WINNERS:
        raise ValueError(f"winner is one of {', '.join(WINNERS)}")
    outcome = FileResult("resolve", row.pk)
    if not row.reason.startswith(CONFLICT) or row.image_id is None:
        outcome.problems.append("not a conflict")
        return outcome
    if winner == "processed":
        result = discard(row, user, "conflict resolved: processed copy kept")
        outcome.changed, outcome.problems = result.changed, result.problems
        return outcome
    _need(user, roles.CHANGE, "operator")
    if row.resolved:
        outcome.problems.append(f"already resolved ({row.resolved})")
        return outcome
    image = Image.objects.select_related("series").get(pk=row.image_id)
    source = Path(row.stored_at) if row.stored_at else files.original(row.path)
    if not source.is_file():
        outcome.problems.append("this copy is gone")
        return outcome
    if image.status in IN_FLIGHT:
        outcome.problems.append(f"image #{image.pk} is being processed; try again when it has finished")
        return outcome
    if image.status in (Status.ERROR, Status.QUARANTINED) and image.stored_key:
        problem = _into_store(image, source)
        if problem:
            outcome.problems.append(problem)
            return outcome
        if not _resolve(row, f"conflict resolved: this copy chosen by {user.get_username()}"):
            return outcome
        actions.perform("retry", image.series, user, [image.pk])
    elif image.status in (Status.ERROR, Status.QUARANTINED):
        # this copy becomes the image's original, then the image is retried (the dashboard's Retry)
        target = Path(image.set_aside_at) if image.set_aside_at else files.original(image.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        Image.objects.filter(pk=image.pk).update(sha256=files.sha256_of(target), size=target.stat().st_size)
        if not _resolve(row, f"conflict resolved: this copy chosen by {user.get_username()}"):
            return outcome
        actions.perform("retry", image.series, user, [image.pk])
    else:  # DONE or SKIPPED: it arrives again and is processed again under the same output UIDs
        if image.status == Status.DONE and image.cleaned_at is None:
            outcome.problems.append(f"image #{image.pk} awaits clean-up; try again in a minute")
            return outcome
        # ingest re-processes a finished image only when the arriving bytes are the recorded ones:
        # record this copy's digest (naming the status seen: a person or worker who moved it since wins)
        digest = files.sha256_of(source)
        if not Image.objects.filter(pk=image.pk, status=image.status).update(sha256=digest):
            outcome.problems.append(f"image #{image.pk} changed meanwhile; look again")
            return outcome
        problem = _back_to_input(row)
        if problem:
            outcome.problems.append(problem)
            return outcome
        if not _resolve(row, f"conflict resolved: this copy chosen by {user.get_username()}"):
            return outcome
    outcome.changed = 1
    _event(row, user, "conflict resolved, this copy chosen")
    return outcome


def _into_store(image: Image, source: Path) -> str | None:
    """With a storage bucket: this copy becomes the image's original there, under its own SHA-256
    (create-only), recorded on the image (naming the key it had: a person who acted since wins); the
    old original's key and the local copy are removed. Returns a problem, or None."""
    from sendit.relay import runtime
    from sendit.storage import StoreError

    store = runtime.store()
    if store is None:
        return f"image #{image.pk}: its original is in a storage bucket, but STORAGE_URL is not set"
    digest = files.sha256_of(source)
    key = files.original_key(digest)
    try:
        store.put_new(key, source, digest)
    except StoreError as exc:
        return f"image #{image.pk}: {exc}; try again"
    moved = Image.objects.filter(pk=image.pk, stored_key=image.stored_key, status=image.status).update(
        stored_key=key, sha256=digest, size=source.stat().st_size, set_aside_at=""
    )
    if not moved:
        return f"image #{image.pk} changed meanwhile; look again"
    try:
        store.delete(image.stored_key)
    except StoreError as exc:  # left behind in the bucket: logged, harmless (nothing refers to it)
        log.warning("image #%s: its former original stays in the bucket (%s)", image.pk, exc)
    source.unlink(missing_ok=True)
    return None


def perform(action: str, row: ReceivedFile, user: Any, winner: str = "") -> FileResult:
    """The one entry for the web, the API and the CLI; raises actions.Forbidden or ValueError."""
    if action == "retry":
        return retry(row, user)
    if action == "discard":
        return discard(row, user)
    if action == "resolve":
        return resolve(row, user, winner)
    raise ValueError(f"unknown action {action!r}")
