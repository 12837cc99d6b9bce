"""The JSON API (django-ninja; OpenAPI at /api/docs): series, images, counts, the dashboard, actions.

Authentication: a bearer token (``Authorization: Bearer sndt_…``, made with `sendit createuser
--token`) for scripts, or the browser's session (then unsafe methods need the CSRF token). Every
list is paginated (``page``, ``size`` ≤ 500). No identifier response is ever served here.
"""

from __future__ import annotations

from functools import wraps
from typing import Annotated, Any

from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from ninja import Field, NinjaAPI, Path, Query, Schema
from ninja.errors import HttpError
from ninja.security import HttpBearer, django_auth

from sendit.relay.models import ReceivedFile, Series, Status
from sendit.web import actions, overview, rejected, search, throttle, tokens

# Database ids are 64-bit: a larger number is a client error (422), not an overflow in the database.
MAX_ID = 2**63 - 1
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
SERIES_ID = Path(..., ge=1, le=MAX_ID, description="Database id of the series")


def too_many_attempts(locked: throttle.Locked) -> JsonResponse:
    response = JsonResponse({"detail": f"Too many failed attempts; try again in {locked.seconds} s"}, status=429)
    response["Retry-After"] = str(locked.seconds)
    return response


class TokenAuth(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> Any | None:
        user = tokens.authenticate(request, token)  # raises throttle.Locked after repeated wrong tokens
        if user is not None:
            request.user = user
        return user


def login_or_token_required(view: Any) -> Any:
    """For plain Django views (docs, /metrics): a session or a bearer token; else login page or 401."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            try:
                user = tokens.bearer_user(request)
            except throttle.Locked as locked:
                return too_many_attempts(locked)
            if user is None:
                if "text/html" in request.headers.get("Accept", ""):
                    return redirect_to_login(request.get_full_path())
                response = JsonResponse({"detail": "Unauthorized"}, status=401)
                response["WWW-Authenticate"] = "Bearer"
                return response
            request.user = user
        result: HttpResponse = view(request, *args, **kwargs)
        return result

    return wrapped


api = NinjaAPI(
    title="Sendit",
    version="1",
    description=__doc__ or "",
    auth=[TokenAuth(), django_auth],
    docs_decorator=login_or_token_required,
    urls_namespace="api",
)


@api.exception_handler(throttle.Locked)
def locked(request: HttpRequest, exc: throttle.Locked) -> HttpResponse:
    return too_many_attempts(exc)


class PageMeta(Schema):
    page: int
    pages: int
    count: int
    size: int


class SeriesOut(Schema):
    id: int
    modality: str
    description: str
    status: str
    stage: str
    attempts: int
    last_error: str
    next_attempt_at: str | None
    created: str | None
    updated: str | None
    counts: dict[str, int]
    total: int
    finished: int
    done: int
    study_date: str = ""  # as delivered (shifted); lists only
    duration: float | None = None  # seconds from arrival to the last change, once finished; lists only


class StageOut(Schema):
    stage: str
    status: str
    images: int | None
    mean: float | None
    max: float | None


class SeriesDetailOut(SeriesOut):
    stages: list[StageOut]


class SeriesPage(PageMeta):
    items: list[SeriesOut]


class ImageOut(Schema):
    id: int
    series_id: int
    status: str
    reason: str
    attempts: int
    size: int
    updated: str | None
    requarantined: bool


class ImagePage(PageMeta):
    items: list[ImageOut]


class EventOut(Schema):
    id: int
    created: str | None
    image_id: int | None
    from_status: str
    to_status: str
    reason: str
    user: str | None


class EventPage(PageMeta):
    items: list[EventOut]


class ActionOut(Schema):
    action: str
    series_id: int
    changed: int
    problems: list[str]


def _status(value: str) -> str:
    return value if value in Status.values else ""


@api.get("/status", response=dict[str, int], summary="Images per status (rejected files: /api/files/status)")
def status(request: HttpRequest) -> dict[str, int]:
    from sendit.relay.housekeeping import status_counts

    return status_counts()


class FileOut(Schema):
    id: int
    status: str
    reason: str
    image_id: int | None
    conflict: bool
    stored: bool
    resolved: str
    created: str | None


class FilePage(PageMeta):
    items: list[FileOut]


class FileActionOut(Schema):
    action: str
    file_id: int
    changed: int
    problems: list[str]


FILE_ID = Path(..., ge=1, le=MAX_ID, description="Database id of the received file")


@api.get("/files/status", response=dict[str, int], summary="Open rejected files (not images) per status")
def file_status(request: HttpRequest) -> dict[str, int]:
    from sendit.relay.housekeeping import file_counts

    return file_counts()


@api.get("/files", response=FilePage, summary="Received files that did not become images, newest first")
def list_files(request: HttpRequest, resolved: bool = False, page: int = 1, size: int = 50) -> dict[str, Any]:
    queryset = ReceivedFile.objects.order_by("-id")
    if not resolved:
        queryset = queryset.filter(resolved="")
    result = overview.paginate(queryset, page, size)
    return {**result.meta(), "items": [rejected.file_row(r) for r in result.items]}


def _file_act(action: str, request: HttpRequest, file_id: int, winner: str = "") -> dict[str, Any]:
    row = get_object_or_404(ReceivedFile, pk=file_id)
    try:
        return rejected.perform(action, row, request.user, winner).as_json()
    except actions.Forbidden as refused:
        raise HttpError(403, str(refused)) from None
    except ValueError as wrong:
        raise HttpError(422, str(wrong)) from None


@api.post("/files/{file_id}/retry", response=FileActionOut, summary="Back into the input folder (operator)")
def retry_file(request: HttpRequest, file_id: int = FILE_ID) -> dict[str, Any]:
    return _file_act("retry", request, file_id)


@api.post("/files/{file_id}/discard", response=FileActionOut, summary="Delete the set-aside file (reviewer)")
def discard_file(request: HttpRequest, file_id: int = FILE_ID) -> dict[str, Any]:
    return _file_act("discard", request, file_id)


@api.post(
    "/files/{file_id}/resolve",
    response=FileActionOut,
    summary="A conflicting copy: winner=processed keeps the processed image (reviewer), winner=this makes this"
    " copy the image's original and processes it again (operator)",
)
def resolve_file(request: HttpRequest, winner: str, file_id: int = FILE_ID) -> dict[str, Any]:
    return _file_act("resolve", request, file_id, winner)


@api.get("/files/{file_id}/download", summary="The file's bytes (reviewer); an event with the user")
def download_file(request: HttpRequest, file_id: int = FILE_ID) -> HttpResponse:
    row = get_object_or_404(ReceivedFile, pk=file_id)
    try:
        data = rejected.download(row, request.user)
    except actions.Forbidden as refused:
        raise HttpError(403, str(refused)) from None
    except OSError:
        raise HttpError(404, "the file is gone") from None
    response = HttpResponse(data, content_type="application/octet-stream")
    response["Content-Disposition"] = f'attachment; filename="received-file-{row.pk}.bin"'
    return response


@api.get("/dashboard", summary="Everything the dashboard shows, for its live updates")
def dashboard(request: HttpRequest) -> dict[str, Any]:
    return overview.dashboard()


@api.get(
    "/series",
    response=SeriesPage,
    summary="Series, newest first; filter by status, modality, stage, pseudonym or de-identified accession (q),"
    " image reason (part of it) and arrival dates (since, until: YYYY-MM-DD)",
)
def list_series(
    request: HttpRequest,
    status: str = "",
    modality: str = "",
    stage: str = "",
    q: str = "",
    reason: str = "",
    since: str = "",
    until: str = "",
    page: int = 1,
    size: int = 50,
) -> dict[str, Any]:
    flt = search.Filter(q=q, modality=modality, status=_status(status), reason=reason, since=since, until=until)
    queryset = search.series_matching(flt)
    if stage:
        queryset = queryset.filter(stage=stage)
    result = overview.paginate(queryset, page, size)
    return {**result.meta(), "items": overview.series_rows(result.items)}


@api.get("/series/{series_id}", response=SeriesDetailOut, summary="One series: counts and time in each stage")
def get_series(request: HttpRequest, series_id: int = SERIES_ID) -> dict[str, Any]:
    return overview.series_detail(get_object_or_404(Series.objects.only(*overview.SERIES_FIELDS), pk=series_id))


@api.get("/series/{series_id}/events", response=EventPage, summary="The event log of one series, newest first")
def series_events(request: HttpRequest, series_id: int = SERIES_ID, page: int = 1, size: int = 50) -> dict[str, Any]:
    get_object_or_404(Series.objects.only("id"), pk=series_id)
    result = overview.paginate(overview.event_queryset(series_id), page, size)
    return {**result.meta(), "items": [overview.event_row(e) for e in result.items]}


@api.get("/images", response=ImagePage, summary="Images in id order; filter by series and status")
def list_images(
    request: HttpRequest,
    series: int | None = Query(None, ge=1, le=MAX_ID, description="Database id of the series"),
    status: str = "",
    page: int = 1,
    size: int = 50,
) -> dict[str, Any]:
    result = overview.paginate(overview.image_queryset(series, _status(status)), page, size)
    return {**result.meta(), "items": overview.image_rows(result.items)}


def _act(action: str, request: HttpRequest, series_id: int, image_ids: list[int] | None) -> dict[str, Any]:
    series = get_object_or_404(Series, pk=series_id)
    try:
        return actions.perform(action, series, request.user, image_ids or None).as_json()
    except actions.Forbidden as refused:
        raise HttpError(403, str(refused)) from None


ONLY = Query(None, description="Only these images of the series (repeat the parameter); default all that apply")


@api.post(
    "/series/{series_id}/retry", response=ActionOut, summary="ERROR and QUARANTINED images back to NEW (operator)"
)
def retry(request: HttpRequest, series_id: int = SERIES_ID, image_ids: list[Id] | None = ONLY) -> dict[str, Any]:
    return _act("retry", request, series_id, image_ids)


@api.post("/series/{series_id}/release", response=ActionOut, summary="De-identify QUARANTINED images again (operator)")
def release(request: HttpRequest, series_id: int = SERIES_ID, image_ids: list[Id] | None = ONLY) -> dict[str, Any]:
    return _act("release", request, series_id, image_ids)


@api.post(
    "/series/{series_id}/discard", response=ActionOut, summary="ERROR and QUARANTINED images to SKIPPED (reviewer)"
)
def discard(request: HttpRequest, series_id: int = SERIES_ID, image_ids: list[Id] | None = ONLY) -> dict[str, Any]:
    return _act("discard", request, series_id, image_ids)


@api.post(
    "/series/{series_id}/retry-now",
    response=ActionOut,
    summary="A series waiting out a back-off (stage retrying): its next attempt now (operator role)",
)
def retry_now(request: HttpRequest, series_id: int = SERIES_ID) -> dict[str, Any]:
    try:
        return actions.retry_now(get_object_or_404(Series, pk=series_id), request.user).as_json()
    except actions.Forbidden as refused:
        raise HttpError(403, str(refused)) from None
