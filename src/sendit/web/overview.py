"""What the operator sees, computed with a fixed number of indexed queries whatever the data size.

Every function returns plain JSON-ready values (ids, counts, PHI-free reasons, ISO times) that the
dashboard, the series page, the JSON API and /metrics share.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.core.paginator import Paginator
from django.db import connection
from django.db.models import CharField, Count, Max, Min, Q, QuerySet
from django.db.models.functions import Cast, Substr, TruncMinute
from django.utils import timezone

from sendit.relay import runtime
from sendit.relay.housekeeping import file_counts, problem_reasons, status_counts
from sendit.relay.models import (
    IN_FLIGHT,
    TERMINAL,
    Delivery,
    Event,
    Image,
    ScanState,
    Series,
    SeriesIdentifiers,
    Status,
)
from sendit.web import heartbeat

log = logging.getLogger("sendit.web")

MAX_PAGE_SIZE = 500
RECENT_SERIES = 15
ATTENTION_SERIES = 25
PROBLEMS = (Status.ERROR, Status.QUARANTINED)

# Names of the stages as an operator reads them: time from the first image entering a status to the
# last image leaving it.
STAGES: tuple[tuple[str, str], ...] = (
    (Status.NEW, "queued"),
    (Status.PROCESSING, "de-identifying"),
    (Status.DONEPROCESSING, "delivering"),
    (Status.SENT, "verifying"),
)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# --- pagination -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    items: list[Any]
    page: int
    pages: int
    count: int
    size: int

    def meta(self) -> dict[str, int]:
        return {"page": self.page, "pages": self.pages, "count": self.count, "size": self.size}


def paginate(queryset: QuerySet[Any], page: Any, size: Any = 50) -> Page:
    """One COUNT and one LIMIT/OFFSET query; a page number out of range gives the last page."""
    try:
        per_page = max(1, min(MAX_PAGE_SIZE, int(size)))
    except (TypeError, ValueError):
        per_page = 50
    paginator = Paginator(queryset, per_page)
    current = paginator.get_page(page)
    return Page(list(current.object_list), current.number, paginator.num_pages, paginator.count, per_page)


# --- series and images ----------------------------------------------------------------------------


def counts_by_series(series_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """Images per status for each series, in one grouped query over the (series, status) index."""
    ids = list(series_ids)
    result: dict[int, dict[str, int]] = {series_id: {} for series_id in ids}
    if not ids:
        return result
    rows = Image.objects.filter(series_id__in=ids).values("series_id", "status").annotate(n=Count("id"))
    for row in rows:
        result[row["series_id"]][row["status"]] = row["n"]
    return result


def progress(counts: dict[str, int]) -> dict[str, int]:
    total = sum(counts.values())
    finished = sum(n for status, n in counts.items() if status in TERMINAL)
    return {"total": total, "finished": finished, "done": counts.get(Status.DONE, 0)}


def series_row(series: Series, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": series.pk,
        "modality": series.modality,
        "description": series.description,  # scrubbed (sendit.deid.metadata), empty until de-identified
        "status": series.status,
        "stage": series.stage,
        "attempts": series.attempts,
        "last_error": series.last_error,
        "next_attempt_at": iso(series.next_attempt_at),  # set while retrying: when the next attempt is due
        "created": iso(series.created),
        "updated": iso(series.updated),
        "counts": counts,
        **progress(counts),
    }


SERIES_FIELDS = (
    "id",
    "modality",
    "description",
    "status",
    "stage",
    "attempts",
    "last_error",
    "next_attempt_at",
    "created",
    "updated",
)


def series_rows(series: list[Series]) -> list[dict[str, Any]]:
    """Rows with counts, plus for each series its study date as delivered (shifted), its duration, and
    for one that needs a person the reason of one of its images (three more queries per page)."""
    ids = [s.pk for s in series]
    counts = counts_by_series(ids)
    shifts = {
        series_id: response.get("jitter_days") if isinstance(response, dict) else None
        for series_id, response in SeriesIdentifiers.objects.filter(series_id__in=ids).values_list(
            "series_id", "response"
        )
    }
    dates = dict(Series.objects.filter(pk__in=ids).values_list("id", "header__study_date"))
    reasons = dict(
        Image.objects.filter(series_id__in=ids, status__in=PROBLEMS)
        .values("series_id")
        .annotate(reason=Min("reason"))
        .values_list("series_id", "reason")
    )
    rows = []
    for s in series:
        row = series_row(s, counts[s.pk])
        row["study_date"] = shifted_date(dates.get(s.pk), shifts.get(s.pk))
        row["duration"] = (s.updated - s.created).total_seconds() if s.status in TERMINAL else None
        if s.status in PROBLEMS:
            row["last_error"] = s.last_error or reasons.get(s.pk, "")
            if s.status == Status.QUARANTINED:
                row["stage"] = "quarantined"  # not "delivered": the rest may be, this needs a person
        rows.append(row)
    return rows


def shifted_date(original: Any, jitter_days: Any) -> str:
    """The study date as the de-identified copies carry it (YYYY-MM-DD), or "" when unknown."""
    try:
        day = datetime.strptime(str(original), "%Y%m%d")
        return (day + timedelta(days=int(jitter_days))).strftime("%Y-%m-%d")
    except (TypeError, ValueError):
        return ""


def series_queryset(status: str = "", modality: str = "", stage: str = "") -> QuerySet[Series]:
    queryset = Series.objects.only(*SERIES_FIELDS).order_by("-id")
    if status:
        queryset = queryset.filter(status=status)
    if modality:
        queryset = queryset.filter(modality=modality)
    if stage:
        queryset = queryset.filter(stage=stage)
    return queryset


IMAGE_FIELDS = ("id", "series_id", "status", "reason", "attempts", "size", "created", "updated")


def image_queryset(series_id: int | None = None, status: str = "") -> QuerySet[Image]:
    queryset = Image.objects.only(*IMAGE_FIELDS).order_by("id")
    if series_id is not None:
        queryset = queryset.filter(series_id=series_id)
    if status:
        queryset = queryset.filter(status=status)
    return queryset


def image_row(image: Image, requarantined: bool = False) -> dict[str, Any]:
    return {
        "id": image.pk,
        "series_id": image.series_id,
        "status": image.status,
        "reason": image.reason,
        "attempts": image.attempts,
        "size": image.size,
        "updated": iso(image.updated),
        # quarantined again although a person released it: the release did not remove the cause
        "requarantined": requarantined,
    }


def image_rows(images: list[Image]) -> list[dict[str, Any]]:
    """Rows for a page of images (one more query: which were quarantined again after a release)."""
    from sendit.web.actions import requarantined

    again = requarantined([i.pk for i in images if i.status == Status.QUARANTINED])
    return [image_row(i, i.pk in again) for i in images]


def event_row(event: Event) -> dict[str, Any]:
    return {
        "id": event.pk,
        "created": iso(event.created),
        "image_id": event.image_id,
        "from_status": event.from_status,
        "to_status": event.to_status,
        "reason": event.reason,
        "user": event.user.get_username() if event.user is not None else None,
    }


def event_queryset(series_id: int) -> QuerySet[Event]:
    return Event.objects.filter(series_id=series_id).select_related("user").order_by("-created", "-id")


def stage_seconds(where: str, params: list[Any]) -> dict[str, dict[str, float]]:
    """Per status: how many image visits, and their mean and longest seconds, from consecutive events.

    Each image's time in a status runs from the event that moved it there to its next event (a window
    function, one query); visits still under way are not counted. ``where`` filters the event table.
    """
    table = connection.ops.quote_name(Event._meta.db_table)
    if connection.vendor == "sqlite":
        seconds = "(julianday(LEAD(created) OVER w) - julianday(created)) * 86400.0"
    else:
        seconds = "EXTRACT(EPOCH FROM (LEAD(created) OVER w - created))"
    sql = (
        f"SELECT to_status, COUNT(*), AVG(d), MAX(d) FROM ("
        f"SELECT to_status, {seconds} AS d FROM {table} WHERE image_id IS NOT NULL AND ({where}) "
        f"WINDOW w AS (PARTITION BY image_id ORDER BY created, id)) visits "
        f"WHERE d IS NOT NULL GROUP BY to_status"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return {status: {"images": n, "mean": float(avg), "max": float(top)} for status, n, avg, top in rows}


def stage_times(series: Series) -> list[dict[str, Any]]:
    """Time the series' images spent in each stage (mean and longest per image), and the wall-clock total."""
    per_status = stage_seconds("series_id = %s", [series.pk])
    rows: list[dict[str, Any]] = [
        {"stage": label, "status": status, **per_status[status]} for status, label in STAGES if status in per_status
    ]
    span = Event.objects.filter(series_id=series.pk, image__isnull=False).aggregate(
        first=Min("created"), last=Max("created")
    )
    if span["first"] is not None:
        finished = series.status in TERMINAL
        end = span["last"] if finished else timezone.now()
        rows.append(
            {
                "stage": "total" if finished else "so far",
                "status": "",
                "images": None,
                "mean": None,
                "max": (end - span["first"]).total_seconds(),
            }
        )
    return rows


def series_detail(series: Series) -> dict[str, Any]:
    counts = counts_by_series([series.pk])[series.pk]
    return {**series_row(series, counts), "stages": stage_times(series)}


# --- the dashboard --------------------------------------------------------------------------------


def _minute() -> Any:
    """The event time cut to the minute, in SQL. SQLite stores UTC text ("YYYY-MM-DD HH:MM:SS…"): its
    prefix is exact and runs in C, where Django's Trunc calls Python once per row (200k rows: ~4 s)."""
    if connection.vendor == "sqlite":
        return Substr(Cast("created", CharField()), 1, 16)
    return TruncMinute("created")


def _minute_time(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite's prefix "YYYY-MM-DD HH:MM"
        return datetime.fromisoformat(value.replace(" ", "T")).replace(tzinfo=UTC)
    return trunc_to(value, timedelta(minutes=1))


THROUGHPUT_CACHE_SECONDS = 10.0
_throughput_cache: tuple[float, dict[str, list[dict[str, Any]]]] | None = None


def throughput(now: datetime | None = None) -> dict[str, list[dict[str, Any]]]:
    """Images that reached DONE per minute over the last hour and per hour over the last day.

    One grouped query over the (to_status, created) index, reused for 10 s by this process: the
    chart moves by the minute, while the dashboard polls every 2 s.
    """
    global _throughput_cache
    if now is None and _throughput_cache and time.monotonic() - _throughput_cache[0] < THROUGHPUT_CACHE_SECONDS:
        return _throughput_cache[1]
    moment = now or timezone.now()
    minute, hour = timedelta(minutes=1), timedelta(hours=1)
    first_hour = trunc_to(moment, hour) - hour * 23
    rows = (
        Event.objects.filter(to_status=Status.DONE, image__isnull=False, created__gte=first_hour)
        .annotate(b=_minute())
        .values("b")
        .annotate(n=Count("id"))
    )
    per_minute: dict[datetime, int] = {}
    per_hour: dict[datetime, int] = {}
    for row in rows:
        at = _minute_time(row["b"])
        per_minute[at] = per_minute.get(at, 0) + row["n"]
        per_hour[trunc_to(at, hour)] = per_hour.get(trunc_to(at, hour), 0) + row["n"]
    first_minute = trunc_to(moment, minute) - minute * 59
    result = {
        "hour": [{"t": iso(t), "n": per_minute.get(t, 0)} for t in (first_minute + minute * i for i in range(60))],
        "day": [{"t": iso(t), "n": per_hour.get(t, 0)} for t in (first_hour + hour * i for i in range(24))],
    }
    if now is None:
        _throughput_cache = (time.monotonic(), result)
    return result


def trunc_to(value: datetime, step: timedelta) -> datetime:
    value = value.astimezone(UTC) if timezone.is_aware(value) else value.replace(tzinfo=UTC)
    if step >= timedelta(hours=1):
        return value.replace(minute=0, second=0, microsecond=0)
    return value.replace(second=0, microsecond=0)


def queue_depth() -> dict[str, Any]:
    """Tasks waiting in the Huey queue (None when it cannot be read) and series with work in flight."""
    pending: int | None
    scheduled: int | None
    try:
        from sendit.relay.tasks import huey

        pending, scheduled = int(huey.pending_count()), int(huey.scheduled_count())
    except Exception:
        pending = scheduled = None
    in_flight = Image.objects.filter(status__in=IN_FLIGHT).values("series_id").distinct().count()
    return {"pending_tasks": pending, "scheduled_tasks": scheduled, "series_in_flight": in_flight}


_destinations_lock = threading.Lock()
_destinations_cache: tuple[float, list[dict[str, Any]]] | None = None
DESTINATION_CHECK_SECONDS = 30.0


def destination_states(max_age: float = DESTINATION_CHECK_SECONDS) -> list[dict[str, Any]]:
    """Each destination's ``check()`` (at most once per ``max_age`` seconds per process), with its
    target and its deliveries (always fresh: two indexed queries per destination)."""
    global _destinations_cache
    with _destinations_lock:
        if _destinations_cache is None or time.monotonic() - _destinations_cache[0] >= max_age:
            states = []
            for destination in runtime.all_destinations():
                try:
                    problem = destination.check()
                except Exception as exc:  # a check must answer, not raise; the class name says enough
                    problem = f"check failed: {type(exc).__name__}"
                finally:
                    destination.close()
                states.append(
                    {
                        "name": destination.name,
                        # host and port with AE titles, the URL without its password, or the folder
                        "target": str(getattr(destination, "where", "") or getattr(destination, "root", "")),
                        "reachable": problem is None,
                        "problem": problem or "",
                    }
                )
            _destinations_cache = (time.monotonic(), states)
        checked = _destinations_cache[1]
    return [{**state, **delivery_stats(str(state["name"]))} for state in checked]


def delivery_stats(name: str) -> dict[str, Any]:
    """When the destination last confirmed an image, and how many it confirmed in the last hour
    (two queries on the (destination, created) index)."""
    deliveries = Delivery.objects.filter(destination=name)
    last = deliveries.order_by("-created").values_list("created", flat=True).first()
    hour = deliveries.filter(created__gte=timezone.now() - timedelta(hours=1)).count()
    return {"last_success": iso(last), "last_hour": hour}


# --- free space ------------------------------------------------------------------------------------

# Every folder Sendit writes, in the order the dashboard lists them (OUTPUT_FOLDER may be off).
FOLDERS = ("DATA_DIR", "INPUT_FOLDER", "WORK_FOLDER", "QUARANTINE_FOLDER", "OUTPUT_FOLDER")
MIB = 1 << 20


def _device(path: Path) -> int:
    """The file system a folder is on (folders sharing one are measured and shown once)."""
    return os.stat(path).st_dev


def _usage(path: Path) -> Any:
    return shutil.disk_usage(path)


def low_space_bytes() -> int:
    return int(runtime.config().LOW_SPACE_MB) * MIB


def free_space() -> dict[str, Any]:
    """Free space on each file system holding a folder Sendit writes, and the folders it cannot measure.

    Never raises: a folder that does not exist (yet) is listed as "missing", one that cannot be read
    as "unreadable (<type>)". ``low`` is true below LOW_SPACE_MB (0 turns the warning off).
    """
    cfg = runtime.config()
    threshold = low_space_bytes()
    by_device: dict[int, dict[str, Any]] = {}
    missing: list[dict[str, str]] = []
    data_dir: dict[str, Any] | None = None
    for name in FOLDERS:
        value = getattr(cfg, name, None)
        if value is None:
            continue
        path = Path(value)
        try:
            device = _device(path)
            group = by_device.get(device)
            if group is None:
                usage = _usage(path)
                group = by_device[device] = {
                    "folders": [],
                    "paths": [],
                    "free_bytes": int(usage.free),
                    "total_bytes": int(usage.total),
                    "low": threshold > 0 and usage.free < threshold,
                }
        except FileNotFoundError:
            missing.append({"folder": name, "path": str(path), "problem": "missing"})
            continue
        except OSError as exc:
            missing.append({"folder": name, "path": str(path), "problem": f"unreadable ({type(exc).__name__})"})
            continue
        group["folders"].append(name)
        group["paths"].append(str(path))
        if name == "DATA_DIR":
            data_dir = group
    return {
        # DATA_DIR's file system, as the dashboard showed it before every folder was measured
        "free_bytes": data_dir["free_bytes"] if data_dir else None,
        "total_bytes": data_dir["total_bytes"] if data_dir else None,
        "low_space_bytes": threshold,
        "filesystems": list(by_device.values()),
        "missing": missing,
    }


def human_bytes(n: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.1f} {units[i]}" if i else f"{int(n)} {units[i]}"


def space_lines(space: dict[str, Any]) -> list[str]:
    """Free space as text lines (for `sendit status`): one per file system, then the missing folders."""
    lines = [
        f"{human_bytes(fs['free_bytes'])} free of {human_bytes(fs['total_bytes'])}"
        + (" LOW SPACE" if fs["low"] else "")
        + f": {', '.join(fs['folders'])}"
        for fs in space["filesystems"]
    ]
    lines.extend(f"{entry['problem']}: {entry['folder']} ({entry['path']})" for entry in space["missing"])
    return lines


# --- scans of the input folder --------------------------------------------------------------------

STALE_RESCANS = 3  # a watcher with no finished scan in 3 x RESCAN_SECONDS has stopped scanning
MAX_WATCHERS = 50


def scan_states(now: datetime | None = None) -> list[dict[str, Any]]:
    """The last scan of each watcher (one row per host, written by the watcher after every scan).

    ``stale`` is true when no scan finished within 3 x RESCAN_SECONDS: the watcher is hung, stopped
    or dead. A retired host keeps its row until someone deletes it (admin), so it keeps warning.
    """
    moment = now or timezone.now()
    limit = timedelta(seconds=STALE_RESCANS * int(runtime.config().RESCAN_SECONDS))
    rows = []
    for state in ScanState.objects.order_by("name")[:MAX_WATCHERS]:
        ignored = state.ignored if isinstance(state.ignored, dict) else {}
        rows.append(
            {
                "name": state.name,
                "started": iso(state.started),
                "finished": iso(state.finished),
                "ok": bool(state.ok),
                "error": state.error,
                "failures": state.failures,
                "ignored": {str(k): int(v) for k, v in ignored.items() if isinstance(v, int)},
                "stale": state.finished is None or state.finished < moment - limit,
            }
        )
    return rows


# --- health ---------------------------------------------------------------------------------------


def health_problems(
    scans: list[dict[str, Any]] | None, space: dict[str, Any] | None, consumer_down: bool = False
) -> list[str]:
    """Problem codes, PHI- and host-free (``/health`` answers anyone): consumer_down, scan_failed,
    scan_stale, low_space."""
    problems = ["consumer_down"] if consumer_down else []
    if scans is None:
        problems.append("scan_state_unreadable")
    else:
        if any(not s["ok"] for s in scans):
            problems.append("scan_failed")
        if any(s["stale"] for s in scans):
            problems.append("scan_stale")
    if space is not None and any(fs["low"] for fs in space["filesystems"]):
        problems.append("low_space")
    return problems


def health() -> list[str]:
    """What /health reports beyond "the database answers"; [] when all is well."""
    try:
        scans: list[dict[str, Any]] | None = scan_states()
    except Exception as exc:  # the table unreadable: say so, do not fail the probe
        _note_unavailable("health.scans", exc)
        scans = None
    return health_problems(scans, free_space(), heartbeat.consumer_down())


def warnings(scans: list[dict[str, Any]] | None, space: dict[str, Any] | None) -> list[str]:
    """Sentences for the top of the dashboard: failed or stalled scans, file systems low on space."""
    lines = []
    if heartbeat.consumer_down():
        lines.append("The queue consumer has stopped: nothing is processed until sendit run has started it again")
    rescan = int(runtime.config().RESCAN_SECONDS)
    for scan in scans or []:
        if not scan["ok"]:
            lines.append(
                f"The last scan of the input folder by {scan['name']} failed "
                f"({scan['failures']} in a row): {scan['error'] or 'no reason recorded'}"
            )
        if scan["stale"]:
            since = (scan["finished"] or "")[:19].replace("T", " ")
            lines.append(
                f"No scan of the input folder by {scan['name']} finished "
                + (f"since {since} UTC" if since else "yet")
                + f" (expected every {rescan} s)"
            )
    if space is not None:
        for fs in space["filesystems"]:
            if fs["low"]:
                lines.append(
                    f"Low space: {human_bytes(fs['free_bytes'])} free for {', '.join(fs['folders'])} "
                    f"(warning below {human_bytes(space['low_space_bytes'])})"
                )
    return lines


def attention(limit: int = ATTENTION_SERIES) -> dict[str, Any]:
    """Series with images in ERROR or QUARANTINED, newest first, with counts and one reason each."""
    problems = Image.objects.filter(status__in=PROBLEMS)
    rows = list(
        problems.values("series_id")
        .annotate(
            errors=Count("id", filter=Q(status=Status.ERROR)),
            quarantined=Count("id", filter=Q(status=Status.QUARANTINED)),
            reason=Max("reason"),
        )
        .order_by("-series_id")[:limit]
    )
    total = problems.values("series_id").distinct().count()
    modality = dict(Series.objects.filter(pk__in=[r["series_id"] for r in rows]).values_list("id", "modality"))
    return {
        "count": total,
        "series": [
            {
                "id": r["series_id"],
                "modality": modality.get(r["series_id"], ""),
                "errors": r["errors"],
                "quarantined": r["quarantined"],
                "reason": r["reason"],
            }
            for r in rows
        ],
    }


# --- the dashboard --------------------------------------------------------------------------------

_unavailable_logged: dict[tuple[str, str], float] = {}
LOG_UNAVAILABLE_EVERY = 300.0


def _note_unavailable(panel: str, exc: BaseException) -> None:
    """Log a panel that failed, once per panel and error type every 5 minutes (the page polls every 2 s).

    The type only: a database message may quote a query's values.
    """
    key = (panel, type(exc).__name__)
    now = time.monotonic()
    if now - _unavailable_logged.get(key, -LOG_UNAVAILABLE_EVERY) >= LOG_UNAVAILABLE_EVERY:
        _unavailable_logged[key] = now
        log.warning("dashboard: %s unavailable (%s)", panel, type(exc).__name__)


def _problem_rows() -> list[dict[str, Any]]:
    return [{"status": s, "reason": r, "n": n} for s, r, n in problem_reasons()]


def _recent() -> list[dict[str, Any]]:
    return series_rows(list(Series.objects.only(*SERIES_FIELDS).order_by("-id")[:RECENT_SERIES]))


def _workers() -> dict[str, Any]:
    return {"alive": heartbeat.alive(), "alive_seconds": heartbeat.ALIVE_SECONDS}


def dashboard(check_destinations: bool = True) -> dict[str, Any]:
    """Every panel of the dashboard, each computed on its own.

    A panel whose query fails (a full or locked database) is None and named in ``unavailable`` with
    the error's type; the others are still shown. Never raises for a panel.
    """
    unavailable: dict[str, str] = {}

    def panel(name: str, compute: Callable[[], Any]) -> Any:
        try:
            return compute()
        except Exception as exc:
            unavailable[name] = type(exc).__name__
            _note_unavailable(name, exc)
            return None

    counts = panel("counts", status_counts)
    rejected = panel("files", file_counts)
    scans = panel("scans", scan_states)
    space = panel("disk", free_space)
    return {
        "now": iso(timezone.now()),
        "counts": counts,  # images only
        "files": rejected,  # received files that did not become images, still open
        "total": sum(counts.values()) if counts is not None else None,
        "throughput": panel("throughput", throughput),
        "queue": panel("queue", queue_depth),
        "workers": panel("workers", _workers),
        "destinations": panel("destinations", destination_states) if check_destinations else [],
        "disk": space,
        "scans": scans,
        "warnings": panel("warnings", lambda: warnings(scans, space)) or [],
        "recent": panel("recent", _recent),
        "attention": panel("attention", attention),
        "problems": panel("problems", _problem_rows),
        "unavailable": unavailable,
    }
