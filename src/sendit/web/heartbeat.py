"""Queue workers say they are alive: each worker process writes a row every HEARTBEAT_SECONDS.

`sendit worker` calls :func:`install` before the consumer starts; Huey runs the start-up hook in
every worker process, which starts a daemon thread. The dashboard and /metrics count the workers
seen within :data:`ALIVE_SECONDS`; any host judges a lease holder by the same rows
(sendit.relay.liveness). `sendit run` also records whether the consumer it supervises is running,
for /health.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from django.db import close_old_connections
from django.db.models import DateTimeField, ExpressionWrapper
from django.db.models.functions import Now
from django.utils import timezone

from sendit.relay import liveness
from sendit.relay.models import WorkerHeartbeat

log = logging.getLogger("sendit.heartbeat")

ALIVE_SECONDS = 30
FORGET_AFTER = timedelta(days=1)
REQUEUE_EVERY_BEATS = 3  # 15 s with the default HEARTBEAT_SECONDS


def beat(name: str, started: Any) -> None:
    """One worker heartbeat under ``name`` (the dashboard's tests name a made-up worker)."""
    liveness.beat(name, worker=True, started=started)


def _loop(name: str) -> None:
    started = timezone.now()
    every = liveness.period_seconds()
    stop = threading.Event()
    first = True
    beats = 0
    while not stop.wait(0 if first else every):
        try:
            beat(name, started)
            if first:
                WorkerHeartbeat.objects.filter(seen__lt=timezone.now() - FORGET_AFTER).delete()
            first = False
        except Exception as exc:  # a busy database must not kill the worker; the dashboard shows it as silent
            log.warning("heartbeat of %s could not be written (%s)", name, type(exc).__name__)
        finally:
            close_old_connections()
        beats += 1
        if beats % REQUEUE_EVERY_BEATS == 0:
            _requeue_if_my_turn()


def _requeue_if_my_turn() -> None:
    """Between the queue's once-a-minute ticks, by one worker of all hosts per period: a series whose
    task was lost with a dropped queue connection is found within about 30 s, and series waiting out
    a back-off go as soon as every destination answers again."""
    from sendit.relay.tasks import my_turn, requeue_stale, wake_when_destinations_are_back

    try:
        if my_turn("requeue-between-ticks", REQUEUE_EVERY_BEATS * liveness.period_seconds() - 1):
            requeue_stale()
            wake_when_destinations_are_back()
    except Exception as exc:
        log.warning("requeue check failed (%s)", type(exc).__name__)
    finally:
        close_old_connections()


def start_thread() -> threading.Thread:
    name = liveness.heartbeat_name()
    thread = threading.Thread(target=_loop, args=(name,), name="sendit-heartbeat", daemon=True)
    thread.start()
    return thread


def install(huey: Any) -> None:
    """Register the start-up hook that runs in each worker process of the Huey consumer."""

    @huey.on_startup("sendit-heartbeat")  # type: ignore[untyped-decorator]
    def _start() -> None:
        start_thread()


#: In `sendit run`'s process: is the queue consumer it started running? None in any other process
#: (a standalone `sendit worker`, tests, another web server): it has no consumer of its own to judge.
_consumer_running: bool | None = None


def set_consumer_running(running: bool) -> None:
    """Called by `sendit run`'s supervisor when its consumer starts and when it dies."""
    global _consumer_running
    _consumer_running = running


def consumer_down() -> bool:
    """True while the consumer of this `sendit run` is dead and waiting to be started again."""
    return _consumer_running is False


def alive() -> list[dict[str, Any]]:
    """Workers seen recently, newest first."""
    since = ExpressionWrapper(Now() - timedelta(seconds=ALIVE_SECONDS), output_field=DateTimeField())
    recent = WorkerHeartbeat.objects.filter(worker=True, seen__gte=since).order_by("name")
    rows = recent.values("name", "started", "seen")[:200]
    return [dict(row) for row in rows]
