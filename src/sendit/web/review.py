"""The review page of one quarantined (or failed) image, for the reviewer role.

It shows the original's header (sequences folded), a windowed preview of each frame, the
de-identified working copy's header where one exists, and the rule that fired (the image's reason).
Actions: release, discard, and a blanking rule drawn on the preview (sendit.relay.blanking).

Every look at original data and every action is an event with the user, on the series' log (the
image's id in the reason: a look changes no status). Originals are read through
``files.read_original`` only.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseForbidden
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from sendit.dicomio import preview
from sendit.relay import blanking, files, roles
from sendit.relay.models import Event, Image, Status
from sendit.relay.transitions import clip
from sendit.web import actions
from sendit.web.views import say_result

REVIEWABLE = (Status.QUARANTINED, Status.ERROR)
SESSION_KEY = "reviewed-images"


def record(image: Image, user: Any, what: str) -> None:
    """An event on the series' log: who looked at or acted on the original of which image."""
    Event.objects.create(
        series_id=image.series_id,
        image=None,  # a look is no status change: it must not split the image's time in a status
        from_status=image.status,
        to_status=image.status,
        reason=clip(f"review: {what} of image #{image.pk} by {user.get_username()}"),
        user=user if getattr(user, "pk", None) else None,
    )


def _refuse(request: HttpRequest) -> HttpResponse | None:
    if not request.user.has_perm(roles.REVIEW):
        return HttpResponseForbidden("the review page needs the reviewer role")
    return None


def _original(image: Image) -> tuple[Any, str]:
    """(data set, problem): the original read through files.read_original, or why it cannot be shown."""
    try:
        return preview.read(files.read_original(image.path, image.set_aside_at, image.stored_key)), ""
    except FileNotFoundError:
        return None, "the original is gone"
    except OSError as exc:
        return None, f"the original cannot be read ({type(exc).__name__})"
    except Exception as exc:  # not DICOM after all: say what kind of failure, never its text
        return None, f"the original cannot be parsed ({type(exc).__name__})"


def _mark_seen(request: HttpRequest, image_id: int) -> None:
    seen = list(request.session.get(SESSION_KEY, []))
    if image_id not in seen:
        request.session[SESSION_KEY] = (seen + [image_id])[-200:]


@login_required
def review_page(request: HttpRequest, image_id: int) -> HttpResponse:
    refused = _refuse(request)
    if refused:
        return refused
    image = get_object_or_404(Image, pk=image_id)
    ds, problem = _original(image)
    copy_rows: list[preview.HeaderRow] = []
    copy = files.working_copy(image.series_id, image.pk)
    if copy.is_file():
        try:
            copy_rows = preview.header_rows(preview.read(copy.read_bytes()))
        except Exception:
            copy_rows = []
    record(image, request.user, "original header and preview viewed")
    _mark_seen(request, image.pk)
    frames = preview.frame_count(ds) if ds is not None else 0
    layout = {}
    if ds is not None:
        layout = {
            "rows": ds.get("Rows", ""),
            "columns": ds.get("Columns", ""),
            "modality": ds.get("Modality", ""),
        }
    rules = [
        {"rule": rule, "text": blanking.label_text(rule)}
        for rule in blanking.BlankingRule.objects.filter(image_id_was=image.pk).order_by("id")
    ]
    return render(
        request,
        "web/review.html",
        {
            "image": image,
            "problem": problem,
            "rows": preview.header_rows(ds) if ds is not None else [],
            "copy_rows": copy_rows,
            "frames": frames,
            "frame_range": range(frames),
            "layout": layout,
            "has_pixels": ds is not None and "PixelData" in ds,
            "actionable": image.status in REVIEWABLE,
            "requarantined": image.pk in actions.requarantined([image.pk]),
            "rules": rules,
            "filter_header": blanking.HEADER,
        },
    )


@login_required
def preview_png(request: HttpRequest, image_id: int) -> HttpResponse:
    """One frame as a PNG (``?frame=N``, from 0; ``?copy=1`` the de-identified working copy)."""
    refused = _refuse(request)
    if refused:
        return refused
    image = get_object_or_404(Image, pk=image_id)
    try:
        frame = int(request.GET.get("frame", "0"))
    except ValueError:
        return HttpResponseBadRequest("frame is a number")
    if request.GET.get("copy"):
        path = files.working_copy(image.series_id, image.pk)
        if not path.is_file():
            return HttpResponse("no working copy", status=404, content_type="text/plain")
        ds = preview.read(path.read_bytes())
    else:
        ds, problem = _original(image)
        if ds is None:
            return HttpResponse(problem, status=404, content_type="text/plain")
        if image.pk not in request.session.get(SESSION_KEY, []):  # not seen through the page: its own event
            record(image, request.user, "original preview viewed")
            _mark_seen(request, image.pk)
    try:
        png = preview.render_png(ds, frame)
    except preview.PreviewError as exc:
        return HttpResponse(str(exc), status=422, content_type="text/plain")
    response = HttpResponse(png, content_type="image/png")
    response["Cache-Control"] = "no-store"  # original pixels: not in any cache
    return response


@login_required
@require_POST
def review_action(request: HttpRequest, image_id: int, action: str) -> HttpResponse:
    """release / discard (this image only, as the series' buttons) or blank (a rule from a rectangle)."""
    refused = _refuse(request)
    if refused:
        return refused
    image = get_object_or_404(Image, pk=image_id)
    back = f"/images/{image.pk}/review"
    if action in ("release", "discard"):
        try:
            outcome = actions.perform(action, image.series, request.user, [image.pk])
        except actions.Forbidden as exc:
            return HttpResponseForbidden(str(exc))
        record(image, request.user, f"{action} ({outcome.changed} changed)")
        say_result(request, outcome)
        return redirect(back if action == "release" else f"/series/{image.series_id}/")
    if action != "blank":
        return HttpResponseBadRequest("unknown action")
    try:
        region = tuple(int(request.POST.get(name, "")) for name in ("x0", "y0", "x1", "y1"))
    except ValueError:
        return HttpResponseBadRequest("x0, y0, x1 and y1 are whole numbers")
    ds, problem = _original(image)
    if ds is None:
        messages.warning(request, f"no rule made: {problem}")
        return redirect(back)
    try:
        rule = blanking.create(ds, region, request.user, image.pk)  # type: ignore[arg-type]
    except blanking.RuleError as exc:
        messages.warning(request, f"no rule made: {exc}")
        return redirect(back)
    record(image, request.user, f"blanking rule #{rule.pk} drawn")
    messages.info(request, f"blanking rule #{rule.pk} stored: it applies to every image of this layout from now on")
    return redirect(back)
