"""/metrics for Prometheus, computed from the database at scrape time (any number of processes, one truth).

Labels are bounded: statuses and stages are fixed sets, destinations come from the configuration,
and error reasons (PHI-free by design) are cut to the most frequent :data:`MAX_REASONS`, the rest
summed under "other".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Count
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sendit.relay.housekeeping import file_counts, status_counts
from sendit.relay.models import Event, Image, Series, Stage, Status
from sendit.web import heartbeat, overview

MAX_REASONS = 20
REASON_CHARS = 120
RECENT_IMAGES = 2000
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def recent_stage_seconds(limit: int = RECENT_IMAGES) -> dict[str, dict[str, float]]:
    """Per stage: mean and longest seconds per image, over the last ``limit`` images that reached DONE."""
    table = connection.ops.quote_name(Event._meta.db_table)
    recent = (
        f"image_id IN (SELECT image_id FROM {table} WHERE to_status = %s AND image_id IS NOT NULL "
        f"ORDER BY created DESC, id DESC LIMIT {int(limit)})"
    )
    per_status = overview.stage_seconds(recent, [Status.DONE.value])
    return {label: per_status[status] for status, label in overview.STAGES if status in per_status}


def bounded_reasons(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, int]]:
    merged: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["status"], (row["reason"] or "(none)")[:REASON_CHARS])
        merged[key] = merged.get(key, 0) + row["n"]
    ordered = sorted(merged.items(), key=lambda item: -item[1])
    kept = [(status, reason, n) for (status, reason), n in ordered[:MAX_REASONS]]
    rest: dict[str, int] = {}
    for (status, _), n in ordered[MAX_REASONS:]:
        rest[status] = rest.get(status, 0) + n
    return kept + [(status, "other", n) for status, n in rest.items()]


class SenditCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("sendit_build_info", "The running Sendit release (always 1).", labels=["version"])
        build.add_metric([settings.SENDIT_VERSION], 1)
        yield build

        images = GaugeMetricFamily("sendit_images", "Images per status.", labels=["status"])
        for status, n in status_counts().items():
            images.add_metric([status], n)
        yield images

        rejected = GaugeMetricFamily(
            "sendit_rejected_files",
            "Received files that did not become images, still open, per status.",
            labels=["status"],
        )
        for status, n in file_counts().items():
            rejected.add_metric([status], n)
        yield rejected

        series = GaugeMetricFamily("sendit_series", "Series per aggregate status.", labels=["status"])
        found = {r["status"]: r["n"] for r in Series.objects.values("status").annotate(n=Count("id"))}
        for status in Status:
            series.add_metric([status.value], found.get(status.value, 0))
        yield series

        done = CounterMetricFamily("sendit_images_done", "Images that reached DONE (events kept until pruning).")
        done.add_metric([], Event.objects.filter(to_status=Status.DONE, image__isnull=False).count())
        yield done

        retries = CounterMetricFamily(
            "sendit_retries", "Images sent back to NEW by an operator (retry or release).", labels=["from_status"]
        )
        manual = {
            r["from_status"]: r["n"]
            for r in Event.objects.filter(to_status=Status.NEW, from_status__in=(Status.ERROR, Status.QUARANTINED))
            .values("from_status")
            .annotate(n=Count("id"))
        }
        for status in (Status.ERROR, Status.QUARANTINED):
            retries.add_metric([status.value], manual.get(status.value, 0))
        yield retries

        retrying = GaugeMetricFamily("sendit_series_retrying", "Series waiting for an automatic retry (back-off).")
        # the stage too: a series the DICOM listener holds until it is idle has a due time, not a failure
        retrying.add_metric([], Series.objects.filter(next_attempt_at__isnull=False, stage=Stage.RETRYING).count())
        yield retrying

        problems = GaugeMetricFamily(
            "sendit_problem_images", "Images and files in ERROR or QUARANTINED, by reason.", labels=["status", "reason"]
        )
        rows = list(
            Image.objects.filter(status__in=overview.PROBLEMS).values("status", "reason").annotate(n=Count("id"))
        )
        for status, reason, n in bounded_reasons(rows):
            problems.add_metric([status, reason], n)
        yield problems

        stages = GaugeMetricFamily(
            "sendit_stage_duration_seconds",
            f"Seconds an image spent in each stage (mean, max) over the last {RECENT_IMAGES} images DONE.",
            labels=["stage", "stat"],
        )
        for stage, values in recent_stage_seconds().items():
            stages.add_metric([stage, "mean"], values["mean"])
            stages.add_metric([stage, "max"], values["max"])
        yield stages

        queue = overview.queue_depth()
        for name, key, text in (
            ("sendit_queue_pending_tasks", "pending_tasks", "Tasks waiting in the queue."),
            ("sendit_queue_scheduled_tasks", "scheduled_tasks", "Tasks scheduled for later (back-off)."),
            ("sendit_series_in_flight", "series_in_flight", "Series with images not yet in a final state."),
        ):
            if queue[key] is not None:
                family = GaugeMetricFamily(name, text)
                family.add_metric([], queue[key])
                yield family

        workers = GaugeMetricFamily(
            "sendit_workers_alive", f"Worker processes seen in the last {heartbeat.ALIVE_SECONDS} s."
        )
        workers.add_metric([], len(heartbeat.alive()))
        yield workers

        up = GaugeMetricFamily(
            "sendit_destination_up", "1 when the destination answered its check.", labels=["destination"]
        )
        for state in overview.destination_states():
            up.add_metric([state["name"]], 1 if state["reachable"] else 0)
        yield up

        yield from free_space_metrics(overview.free_space())
        yield from scan_metrics(overview.scan_states())


def free_space_metrics(space: dict[str, Any]) -> Iterator[Metric]:
    """Free bytes per folder Sendit writes (folders on one file system show the same figure)."""
    if space["free_bytes"] is not None:
        data = GaugeMetricFamily("sendit_data_free_bytes", "Free bytes on the file system of DATA_DIR.")
        data.add_metric([], space["free_bytes"])
        yield data
    free = GaugeMetricFamily(
        "sendit_free_bytes", "Free bytes on the file system of each folder Sendit writes.", labels=["folder"]
    )
    present = GaugeMetricFamily(
        "sendit_folder_present", "1 when the folder exists and its free space can be read.", labels=["folder"]
    )
    for fs in space["filesystems"]:
        for folder in fs["folders"]:
            free.add_metric([folder], fs["free_bytes"])
            present.add_metric([folder], 1)
    for entry in space["missing"]:
        present.add_metric([entry["folder"]], 0)
    yield free
    yield present
    threshold = GaugeMetricFamily(
        "sendit_low_space_threshold_bytes", "LOW_SPACE_MB in bytes: less free space is a warning (0 = off)."
    )
    threshold.add_metric([], space["low_space_bytes"])
    yield threshold


def _timestamp(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def scan_metrics(scans: list[dict[str, Any]]) -> Iterator[Metric]:
    """The last scan of each watcher (``host``), and the entries it left alone on purpose by reason."""
    ok = GaugeMetricFamily(
        "sendit_scan_ok", "1 when the watcher's last scan of the input folder succeeded.", labels=["host"]
    )
    stale = GaugeMetricFamily(
        "sendit_scan_stale", "1 when no scan finished within 3 x RESCAN_SECONDS.", labels=["host"]
    )
    failures = GaugeMetricFamily(
        "sendit_scan_consecutive_failures", "Failed scans in a row (0 after a good one).", labels=["host"]
    )
    finished = GaugeMetricFamily(
        "sendit_scan_last_finished_timestamp_seconds", "When the last scan ended, good or not.", labels=["host"]
    )
    success = GaugeMetricFamily(
        "sendit_scan_last_success_timestamp_seconds",
        "When the last scan ended, while it succeeded (absent while the last scan failed).",
        labels=["host"],
    )
    ignored = GaugeMetricFamily(
        "sendit_ignored_entries",
        "Entries of the input folder left alone on purpose at the last scan, by rule.",
        labels=["host", "reason"],
    )
    for scan in scans:
        host = scan["name"]
        ok.add_metric([host], 1 if scan["ok"] else 0)
        stale.add_metric([host], 1 if scan["stale"] else 0)
        failures.add_metric([host], scan["failures"])
        ended = _timestamp(scan["finished"])
        if ended is not None:
            finished.add_metric([host], ended)
            if scan["ok"]:
                success.add_metric([host], ended)
        for reason, n in sorted(scan["ignored"].items())[:MAX_REASONS]:
            ignored.add_metric([host, reason[:REASON_CHARS]], n)
    yield from (ok, stale, failures, finished, success, ignored)


def render() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SenditCollector())
    return generate_latest(registry)
