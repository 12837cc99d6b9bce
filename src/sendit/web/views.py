"""The operator's pages: dashboard, series list, series page, actions, /metrics and /health.

Every page needs a login (the API and /metrics also take a bearer token); only /health answers
anyone, with a status and problem codes only. URLs carry database ids only, never a patient value.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import LoginView
from django.db import connection
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseForbidden, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from sendit.relay import roles
from sendit.relay.models import Event, ReceivedFile, Series, SeriesIdentifiers, Status
from sendit.relay.transitions import clip
from sendit.web import actions, metrics, overview, rejected, search, throttle
from sendit.web.api import login_or_token_required

IDENTIFIER_PERMISSION = "relay.view_identifier_response"
IMAGES_PER_PAGE = 50
EVENTS_PER_PAGE = 50


@login_required
def status_page(request: HttpRequest) -> HttpResponse:
    """The dashboard; its script renders the embedded snapshot, then polls /api/dashboard."""
    return render(
        request,
        "web/dashboard.html",
        {"snapshot": overview.dashboard(), "statuses": [s.value for s in Status]},
    )


@login_required
def series_list(request: HttpRequest) -> HttpResponse:
    """Series, filtered (sendit.web.search); a POST by a reviewer searches by an original identifier."""
    flt = search.Filter.from_query(request.GET)
    original = ""
    if request.method == "POST":
        if not request.user.has_perm(roles.REVIEW):
            return HttpResponseForbidden("a search by original identifiers needs the reviewer role")
        original = str(request.POST.get("original", "")).strip()
        if not original:
            return HttpResponseBadRequest("give an accession number or a patient ID")
        queryset = search.by_original(original, request.user)
    else:
        queryset = search.series_matching(flt)
    page = overview.paginate(queryset, request.GET.get("page", 1), 50)
    problems = bool(flt) and not original
    return render(
        request,
        "web/series_list.html",
        {
            "page": page,
            "rows": overview.series_rows(page.items),
            "filter": flt,
            "query": flt.query_string(),
            "status": flt.status,
            "statuses": Status.values,
            "by_original": bool(original),
            "bulk": problems and page.count > 0,
            "bulk_limit": search.BULK_LIMIT,
        },
    )


@login_required
@require_POST
def series_bulk(request: HttpRequest, action: str) -> HttpResponse:
    """retry / release / discard every image the filter selects (ERROR and QUARANTINED for retry and
    discard, QUARANTINED for release), after the confirmation the page asks for."""
    if action not in actions.ACTIONS:
        return HttpResponseBadRequest("unknown action")
    try:
        actions.check(request.user, action)
    except actions.Forbidden as refused:
        return HttpResponseForbidden(str(refused))
    flt = search.Filter.from_query(request.POST)
    back = "/series/?" + flt.query_string()
    if not flt:
        messages.warning(request, "a bulk action needs a filter")
        return redirect(back)
    if request.POST.get("confirm") != "yes":
        messages.warning(request, f"{action} not done: it needs your confirmation")
        return redirect(back)
    statuses = (Status.QUARANTINED,) if action == "release" else (Status.ERROR, Status.QUARANTINED)
    changed, problems, count = 0, 0, 0
    for series, image_ids in search.bulk_targets(flt, statuses):
        outcome = actions.perform(action, series, request.user, image_ids)
        changed += outcome.changed
        problems += len(outcome.problems)
        count += 1
    text = f"{action}: {changed} image(s) in {count} series" + (f"; {problems} problem(s)" if problems else "")
    (messages.warning if problems or not changed else messages.info)(request, text)
    return redirect(back)


@login_required
def series_page(request: HttpRequest, series_id: int) -> HttpResponse:
    series = get_object_or_404(Series.objects.only(*overview.SERIES_FIELDS), pk=series_id)
    images = overview.paginate(overview.image_queryset(series.pk), request.GET.get("page", 1), IMAGES_PER_PAGE)
    events = overview.paginate(overview.event_queryset(series.pk), request.GET.get("events", 1), EVENTS_PER_PAGE)
    detail = overview.series_detail(series)
    identifiers: dict[str, Any] | None = None
    may_see = request.user.has_perm(IDENTIFIER_PERMISSION)
    if may_see:
        stored = SeriesIdentifiers.objects.filter(series=series).only("provider", "response", "created").first()
        if stored is not None:
            # it may hold the original identifiers the service was asked about: a look is an event
            Event.objects.create(
                series=series,
                from_status=series.status,
                to_status=series.status,
                reason=clip(f"identifier response viewed by {request.user.get_username()}"),
                user_id=request.user.pk,
            )
            identifiers = {
                "provider": stored.provider,
                "created": stored.created,
                "response": json.dumps(stored.response, indent=2, sort_keys=True),
            }
    return render(
        request,
        "web/series.html",
        {
            "series": series,
            "detail": detail,
            "images": images,
            "image_rows": overview.image_rows(images.items),
            "events": events,
            "event_rows": [overview.event_row(e) for e in events.items],
            "may_see_identifiers": may_see,
            "identifiers": identifiers,
            "actions": actions.ACTIONS,
            "may_retry_now": request.user.has_perm(actions.RETRY_NOW_PERMISSION),
        },
    )


@login_required
@require_POST
def series_action(request: HttpRequest, series_id: int, action: str) -> HttpResponse:
    """retry / release / discard / retry-now from a form (CSRF-checked by the middleware); back to
    where it came from. Retry now needs the permission to change series."""
    if action != actions.RETRY_NOW and action not in actions.ACTIONS:
        return HttpResponseBadRequest("unknown action")
    try:
        if action == actions.RETRY_NOW:
            outcome = actions.retry_now(get_object_or_404(Series, pk=series_id), request.user)
        else:
            outcome = actions.perform(action, get_object_or_404(Series, pk=series_id), request.user)
    except actions.Forbidden as refused:
        return HttpResponseForbidden(str(refused))
    say_result(request, outcome)
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        target = f"/series/{outcome.series_id}/"
    return redirect(target)


def say_result(request: HttpRequest, outcome: actions.ActionResult) -> None:
    """A banner: green only when something was done as asked; a release is never green (it only
    sends images back to de-identification, which may quarantine them again)."""
    if outcome.problems or not outcome.changed:
        messages.warning(request, outcome.message())
    elif outcome.action == "release":
        messages.info(request, outcome.message())
    else:
        messages.success(request, outcome.message())


@login_required
def file_list(request: HttpRequest) -> HttpResponse:
    """Received files that did not become images; open ones first (``?all=1`` also resolved ones)."""
    show_all = request.GET.get("all", "") == "1"
    queryset = ReceivedFile.objects.order_by("-id")
    if not show_all:
        queryset = queryset.filter(resolved="")
    page = overview.paginate(queryset, request.GET.get("page", 1), 50)
    return render(
        request,
        "web/files.html",
        {"page": page, "rows": [rejected.file_row(r) for r in page.items], "show_all": show_all},
    )


@login_required
@require_POST
def file_action(request: HttpRequest, file_id: int, action: str) -> HttpResponse:
    if action not in rejected.FILE_ACTIONS:
        return HttpResponseBadRequest("unknown action")
    row = get_object_or_404(ReceivedFile, pk=file_id)
    try:
        outcome = rejected.perform(action, row, request.user, str(request.POST.get("winner", "")))
    except actions.Forbidden as refused:
        return HttpResponseForbidden(str(refused))
    except ValueError as wrong:
        return HttpResponseBadRequest(str(wrong))
    (messages.warning if outcome.problems or not outcome.changed else messages.success)(request, outcome.message())
    return redirect("/files/")


@login_required
def file_download(request: HttpRequest, file_id: int) -> HttpResponse:
    """The file as an attachment named by its id (its own name may hold a patient's name)."""
    row = get_object_or_404(ReceivedFile, pk=file_id)
    try:
        data = rejected.download(row, request.user)
    except actions.Forbidden as refused:
        return HttpResponseForbidden(str(refused))
    except OSError:
        return HttpResponse("the file is gone", status=404, content_type="text/plain")
    response = HttpResponse(data, content_type="application/octet-stream")
    response["Content-Disposition"] = f'attachment; filename="received-file-{row.pk}.bin"'
    response["Cache-Control"] = "no-store"
    return response


@login_or_token_required
def metrics_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(metrics.render(), content_type=metrics.CONTENT_TYPE)


def health(request: HttpRequest) -> JsonResponse:
    """For load balancers and monitors: no login, no data.

    503 {"status": "error"} when the database does not answer. Otherwise 200, with {"status": "ok"},
    or {"status": "degraded", "problems": [...]} (codes: consumer_down, scan_failed, scan_stale,
    low_space, scan_state_unreadable) when the service runs but needs a person. ``?strict=1`` answers 503 for
    degraded too, for monitors that read only the code. A load balancer keeps the plain form: the
    dashboard must stay reachable exactly when something is wrong.
    """
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        return JsonResponse({"status": "error", "database": "unreachable"}, status=503)
    problems = overview.health()
    if not problems:
        return JsonResponse({"status": "ok"})
    strict = request.GET.get("strict", "") not in ("", "0", "false", "no")
    return JsonResponse({"status": "degraded", "problems": problems}, status=503 if strict else 200)


class ThrottledLoginView(LoginView):
    """Django's login form; while the name or the address is locked out (sendit.web.throttle) it answers
    429 with the form and the wait, without checking the password. Failures are counted by the
    authentication backend, so the admin's login is throttled as well."""

    template_name = "web/login.html"
    redirect_authenticated_user = True

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            throttle.check(throttle.login_counters(request, str(request.POST.get("username", ""))))
        except throttle.Locked as locked:
            context = self.get_context_data(form=self.form_class(request=request), locked_seconds=locked.seconds)
            response = self.render_to_response(context, status=429)
            response["Retry-After"] = str(locked.seconds)
            return response
        result: HttpResponse = super().post(request, *args, **kwargs)
        return result
