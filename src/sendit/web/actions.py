"""The operator's actions on a series: retry, release, discard — each an event with the user who did it.

- **retry**: images in ERROR, and in QUARANTINED, go back to NEW and the series is queued again. A
  quarantined original is put back where it arrived first. Retrying a quarantine only helps after a
  person fixed its cause (a recipe, a corrupt file replaced); otherwise the image is quarantined again.
- **release**: the same for QUARANTINED images only: de-identification runs again on them. It never
  delivers an image as it is — fail closed: an image that cannot be de-identified is quarantined again.
- **discard**: images in ERROR or QUARANTINED become SKIPPED with the reason "discarded by <user>";
  the quarantined file, the working copy and an original left in the input folder are deleted.

With a storage bucket (STORAGE_URL) a quarantined original stays in the bucket under its key, so
any host can act on it: release and retry check that it is there, discard deletes it.

The dashboard's buttons, the review page, `sendit retry | release | discard` and the API's
``POST /api/series/<id>/<action>`` all call :func:`perform`, which checks the role
(:mod:`sendit.relay.roles`): retry, release and retry now need the operator's permission, discard the
reviewer's. A release only sends images back to de-identification: its message says so, and an image
that fails again shows "quarantined again after release" (:func:`requarantined`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sendit.relay import files, roles, runtime
from sendit.relay.models import Event, Image, Series, Stage, Status
from sendit.relay.transitions import move_images
from sendit.storage import StoreError

log = logging.getLogger("sendit.web.actions")

ACTIONS = ("retry", "release", "discard")
#: for a series waiting out a back-off after a failed attempt: its next attempt now
RETRY_NOW = "retry-now"
RETRY_NOW_PERMISSION = roles.CHANGE
PERMISSIONS = {"retry": roles.CHANGE, "release": roles.CHANGE, "discard": roles.DISCARD, RETRY_NOW: roles.CHANGE}
ROLE_NEEDED = {"retry": "operator", "release": "operator", "discard": "reviewer", RETRY_NOW: "operator"}
RELEASE_REASON = "release by "


class Forbidden(Exception):
    """The user's role does not allow this action; the text names the role needed."""


def allowed(user: Any) -> list[str]:
    """The actions of :data:`ACTIONS` this user may take (the buttons the pages show)."""
    return [action for action in ACTIONS if user.has_perm(PERMISSIONS[action])]


def check(user: Any, action: str) -> None:
    if not user.has_perm(PERMISSIONS[action]):
        raise Forbidden(f"{action} needs the {ROLE_NEEDED[action]} role")


class CommandLineUser:
    """Who acts for `sendit retry | release | discard`: the host account that runs the command (it can
    read the database and the files anyway), recorded by name in the event's reason."""

    pk = None
    is_active = True
    is_superuser = True

    def __init__(self, name: str) -> None:
        self.name = name

    def get_username(self) -> str:
        return f"cli:{self.name}"

    def has_perm(self, perm: str) -> bool:
        return True


def requarantined(image_ids: list[int]) -> set[int]:
    """Images among ``image_ids`` that are QUARANTINED although a person released them since they
    were quarantined before: the release did not help, and the pages say so."""
    ids = list(Image.objects.filter(pk__in=image_ids, status=Status.QUARANTINED).values_list("pk", flat=True))
    if not ids:
        return set()
    released = set(
        Event.objects.filter(image_id__in=ids, reason__startswith=RELEASE_REASON).values_list("image_id", flat=True)
    )
    return {pk for pk in ids if pk in released}


@dataclass
class ActionResult:
    action: str
    series_id: int
    changed: int = 0
    problems: list[str] = field(default_factory=list)

    def message(self) -> str:
        if self.action == RETRY_NOW:
            text = f"series #{self.series_id}: " + ("next attempt now" if self.changed else "not waiting for a retry")
        else:
            verb = {"retry": "retried", "release": "released", "discard": "discarded"}[self.action]
            text = f"series #{self.series_id}: {verb} {self.changed} image(s)"
            if self.action == "release" and self.changed:
                text += " (de-identified again now; an image that still fails is quarantined again)"
        if self.problems:
            text += "; " + "; ".join(self.problems)
        return text

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "series_id": self.series_id, "changed": self.changed, "problems": self.problems}


def quarantined_copy(image: Image) -> Path:
    """Where the pipeline moved a quarantined original (recorded; files.set_aside may add a suffix)."""
    if image.set_aside_at:
        return Path(image.set_aside_at)
    return Path(runtime.config().QUARANTINE_FOLDER) / image.path


def _restore(image: Image) -> str | None:
    """Put a quarantined original back for de-identification; returns a problem, or None when it is in place."""
    if image.stored_key:
        return _in_store(image)
    target = files.original(image.path)
    if target.exists():
        return None
    if not files.inside_input(image.path):
        return f"image #{image.pk}: its original is gone"
    source = quarantined_copy(image)
    if not source.exists():
        return f"image #{image.pk}: the quarantined file is gone"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))  # a rename: the watcher skips a path it knows
    Image.objects.filter(pk=image.pk).update(set_aside_at="")
    return None


def _in_store(image: Image) -> str | None:
    """An original in the storage bucket needs no moving back: only to be there still."""
    store = runtime.store()
    if store is None:
        return f"image #{image.pk}: its original is in a storage bucket, but STORAGE_URL is not set"
    try:
        return None if store.exists(image.stored_key) else f"image #{image.pk}: its original is gone from the bucket"
    except StoreError as exc:
        return f"image #{image.pk}: {exc}; try again"


def _targets(series: Series, statuses: tuple[str, ...], image_ids: list[int] | None) -> list[Image]:
    queryset = (
        series.images.filter(status__in=statuses)
        .only("id", "path", "status", "set_aside_at", "stored_key", "series_id")
        .order_by("id")
    )
    if image_ids is not None:
        queryset = queryset.filter(pk__in=image_ids)
    return list(queryset)


def _requeue(series: Series, images: list[Image], action: str, user: Any, outcome: ActionResult) -> None:
    ready = []
    for image in images:
        problem = _restore(image) if image.status == Status.QUARANTINED else None
        if problem:
            outcome.problems.append(problem)
        else:
            ready.append(image.pk)
    reason = f"{action} by {user.get_username()}"
    # names the statuses the person saw: an image a worker or another person moved since is left alone
    outcome.changed = move_images(
        series, ready, Status.NEW, reason, expect=(Status.ERROR, Status.QUARANTINED), user_id=user.pk
    )
    if outcome.changed:
        Series.objects.filter(pk=series.pk).update(
            attempts=0, last_error="", next_attempt_at=None, stage=Stage.REQUEUED
        )
        from sendit.relay import tasks

        tasks.enqueue([series.pk])


def retry(series: Series, user: Any, image_ids: list[int] | None = None) -> ActionResult:
    outcome = ActionResult("retry", series.pk)
    _requeue(series, _targets(series, (Status.ERROR, Status.QUARANTINED), image_ids), "retry", user, outcome)
    return outcome


def release(series: Series, user: Any, image_ids: list[int] | None = None) -> ActionResult:
    outcome = ActionResult("release", series.pk)
    _requeue(series, _targets(series, (Status.QUARANTINED,), image_ids), "release", user, outcome)
    return outcome


def discard(series: Series, user: Any, image_ids: list[int] | None = None) -> ActionResult:
    outcome = ActionResult("discard", series.pk)
    images = _targets(series, (Status.ERROR, Status.QUARANTINED), image_ids)
    outcome.changed = move_images(
        series,
        [i.pk for i in images],
        Status.SKIPPED,
        f"discarded by {user.get_username()}",
        expect=(Status.ERROR, Status.QUARANTINED),
        user_id=user.pk,
    )
    # only the images this discard moved: one a worker took back into the pipeline keeps its files
    discarded = set(
        series.images.filter(pk__in=[i.pk for i in images], status=Status.SKIPPED).values_list("pk", flat=True)
    )
    store = runtime.store()
    for image in images:
        if image.pk not in discarded:
            continue
        files.working_copy(series.pk, image.pk).unlink(missing_ok=True)
        if image.stored_key:  # the only copy is in the bucket; a file at its input path is a new arrival
            try:
                if store is None:
                    raise StoreError("STORAGE_URL is not set")
                store.delete(image.stored_key)
            except StoreError as exc:  # SKIPPED already; retention deletes the object later
                outcome.problems.append(f"image #{image.pk}: its original stays in the bucket for now ({exc})")
            continue
        if files.inside_input(image.path):
            quarantined_copy(image).unlink(missing_ok=True)
        files.remove_original(image.path)
    log.info("series #%s: %s image(s) discarded by user #%s", series.pk, outcome.changed, user.pk)
    return outcome


def retry_now(series: Series, user: Any) -> ActionResult:
    """The series' next attempt now (housekeeping.retry_now, as the CLI and the API); ``changed`` is 1
    when it was waiting out a back-off, else 0."""
    from sendit.relay.housekeeping import retry_now as due_now

    check(user, RETRY_NOW)
    outcome = ActionResult(RETRY_NOW, series.pk)
    outcome.changed = len(due_now([series.pk], who=user.get_username(), user_id=user.pk))
    return outcome


def perform(action: str, series: Series, user: Any, image_ids: list[int] | None = None) -> ActionResult:
    """The one entry for retry, release and discard (web, API, CLI); raises Forbidden for a user
    whose role does not allow it."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    check(user, action)
    result: ActionResult = {"retry": retry, "release": release, "discard": discard}[action](series, user, image_ids)
    return result
