"""Is a lease's holder alive? Judged from heartbeat rows in database time, from any host.

Every process that holds a lease writes a ``WorkerHeartbeat`` row named after the start of its lease
owner names (``host:pid:namespace``) before it takes the lease and every ``HEARTBEAT_SECONDS`` while
it holds one; queue workers write theirs all the time (sendit.web.heartbeat). A holder whose row is
missing, or whose last beat is older than :data:`SILENT_PERIODS` periods by the database's clock, is
dead — killed, paused, cut off, or on a host that crashed — wherever it ran, and its series may be
taken over before the lease runs out. A series taken over that way is still safe from its old holder
waking up: every write names the lease generation (transitions.fenced).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path

from django.db import IntegrityError, transaction
from django.db.models import DateTimeField, ExpressionWrapper
from django.db.models.functions import Now
from django.utils import timezone

from sendit.relay import runtime
from sendit.relay.models import WorkerHeartbeat

log = logging.getLogger("sendit.liveness")

#: a holder silent for this many heartbeat periods is dead (one late beat is not enough)
SILENT_PERIODS = 3


@cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


@cache
def _pid_namespace_link() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "?"


def process_namespace() -> str:
    """Tells apart processes with one host name but different kernels or PID namespaces (containers)."""
    return hashlib.sha256(f"{_boot_id()}|{_pid_namespace_link()}".encode()).hexdigest()[:8]


def heartbeat_name(pid: int | None = None) -> str:
    """``host:pid:namespace`` of this process: its heartbeat row and the start of its lease owner names."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}:{process_namespace()}"


def period_seconds() -> float:
    return float(runtime.config().HEARTBEAT_SECONDS)


def _silent_since() -> ExpressionWrapper:
    """Database time minus the silence bound: a row seen before it is a dead process's."""
    bound = timedelta(seconds=SILENT_PERIODS * period_seconds())
    return ExpressionWrapper(Now() - bound, output_field=DateTimeField())


_started: dict[int, datetime] = {}  # pid → when this process first beat (a forked child starts afresh)


def beat(name: str | None = None, *, worker: bool = False, started: datetime | None = None) -> None:
    """Write this process's heartbeat, ``seen`` in database time. ``worker`` marks a queue worker
    (shown on the dashboard); a process that only holds leases keeps the flag a worker row has."""
    pid = os.getpid()
    name = name or heartbeat_name()
    since = started or _started.setdefault(pid, timezone.now())
    fields: dict[str, object] = {"seen": Now()}
    if worker:  # the worker thread's beat: a row left by an earlier process of the same pid is now its
        fields |= {"worker": True, "started": since}
    if not WorkerHeartbeat.objects.filter(name=name).update(**fields):
        try:
            with transaction.atomic():
                WorkerHeartbeat.objects.create(
                    name=name,
                    host=socket.gethostname(),
                    boot_id=_boot_id()[:64],
                    pid_namespace=process_namespace(),
                    pid=pid,
                    worker=worker,
                    started=since,
                    seen=Now(),
                )
        except IntegrityError:  # another thread of this process inserted it first: its row stands
            WorkerHeartbeat.objects.filter(name=name).update(**fields)


def silent(name: str) -> bool:
    """True when the process of heartbeat row ``name`` wrote nothing within the bound, in database time."""
    return not WorkerHeartbeat.objects.filter(name=name, seen__gte=_silent_since()).exists()


def owner_parts(owner: str) -> tuple[str, int, str] | None:
    """(host, pid, namespace) of a lease owner name; None for a name Sendit does not write."""
    host, pid_text, namespace, *_ = [*owner.split(":"), "", "", ""]
    if not host or not pid_text.isdigit() or not namespace:
        return None
    return host, int(pid_text), namespace
