"""Queue workers say they are alive: each worker process writes a row every few seconds.

`sendit worker` calls :func:`install` before the consumer starts; Huey runs the start-up hook in
every worker process, which starts a daemon thread. The dashboard and /metrics count the workers
seen within :data:`ALIVE_SECONDS`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Any

from django.db import close_old_connections
from django.utils import timezone

from sendit.relay.models import WorkerHeartbeat

log = logging.getLogger("sendit.heartbeat")

EVERY_SECONDS = 5.0
ALIVE_SECONDS = 30
FORGET_AFTER = timedelta(days=1)


def beat(name: str, started: Any) -> None:
    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(name=name, defaults={"seen": now, "started": started})


def _loop(name: str) -> None:
    started = timezone.now()
    stop = threading.Event()
    first = True
    while not stop.wait(0 if first else EVERY_SECONDS):
        try:
            beat(name, started)
            if first:
                WorkerHeartbeat.objects.filter(seen__lt=timezone.now() - FORGET_AFTER).delete()
            first = False
        except Exception:  # a busy database must not kill the worker; the dashboard shows it as silent
            log.warning("heartbeat of %s could not be written", name, exc_info=True)
        finally:
            close_old_connections()


def start_thread() -> threading.Thread:
    name = f"{socket.gethostname()}:{os.getpid()}"
    thread = threading.Thread(target=_loop, args=(name,), name="sendit-heartbeat", daemon=True)
    thread.start()
    return thread


def install(huey: Any) -> None:
    """Register the start-up hook that runs in each worker process of the Huey consumer."""

    @huey.on_startup("sendit-heartbeat")  # type: ignore[untyped-decorator]
    def _start() -> None:
        start_thread()


def alive() -> list[dict[str, Any]]:
    """Workers seen recently, newest first."""
    since = timezone.now() - timedelta(seconds=ALIVE_SECONDS)
    rows = WorkerHeartbeat.objects.filter(seen__gte=since).order_by("name").values("name", "started", "seen")[:200]
    return [dict(row) for row in rows]
