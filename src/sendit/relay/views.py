"""The status page (counts, recent series, problems) and a health check; no patient values shown."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from sendit.relay.housekeeping import problem_reasons, status_counts
from sendit.relay.models import Series


@login_required
def status_page(request: HttpRequest) -> HttpResponse:
    recent = Series.objects.select_related("study").order_by("-updated")[:50]
    return render(
        request,
        "relay/status.html",
        {"counts": status_counts(), "recent": recent, "problems": problem_reasons()},
    )


def health(request: HttpRequest) -> JsonResponse:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        return JsonResponse({"status": "error", "database": "unreachable"}, status=503)
    return JsonResponse({"status": "ok"})
