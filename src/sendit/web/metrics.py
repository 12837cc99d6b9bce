"""/metrics for Prometheus, computed from the database at scrape time (any number of processes, one truth).

Labels are bounded: statuses and stages are fixed sets, destinations come from the configuration,
and error reasons (PHI-free by design) are cut to the most frequent :data:`MAX_REASONS`, the rest
summed under "other".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from django.db import connection
from django.db.models import Count
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sendit.relay.housekeeping import status_counts
from sendit.relay.models import Event, Image, Series, Status
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
        images = GaugeMetricFamily("sendit_images", "Images (and rejected files) per status.", labels=["status"])
        for status, n in status_counts().items():
            images.add_metric([status], n)
        yield images

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
        retrying.add_metric([], Series.objects.filter(next_attempt_at__isnull=False).count())
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

        free = overview.disk()["free_bytes"]
        if free is not None:
            disk = GaugeMetricFamily("sendit_data_free_bytes", "Free bytes on the file system of DATA_DIR.")
            disk.add_metric([], free)
            yield disk


def render() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SenditCollector())
    return generate_latest(registry)
