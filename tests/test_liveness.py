"""Liveness across hosts (issue 13, item 2): a lease holder is judged by its heartbeat row, in database
time, from any host — not only by a signal to a PID of this host's namespace.

Each test sets heartbeat rows as another host's worker would leave them and asks what a worker here
does: take the series over before its lease runs out, or leave it alone.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db.models.functions import Now
from django.utils import timezone

from sendit.relay import liveness, pipeline
from sendit.relay.ingest import ingest_folder
from sendit.relay.models import Image, Series, Status, WorkerHeartbeat
from sendit.relay.tasks import stale_series
from sendit.web import heartbeat
from tests.helpers import demo_into

pytestmark = pytest.mark.django_db(transaction=True)

OTHER_HOST = "worker-b:7:0badc0de"  # host:pid:namespace of a worker on another host


def _one_series(input_folder: Path, images: int = 2) -> int:
    demo_into(input_folder, patients=1, images=images)
    return sorted(ingest_folder(input_folder).series_ids)[0]


def _held_by(series_id: int, owner: str, minutes: int = 10) -> None:
    """The series as a worker elsewhere leaves it: leased for ``minutes`` more, images in flight."""
    Series.objects.filter(pk=series_id).update(
        lease_owner=owner, lease_expires=timezone.now() + timedelta(minutes=minutes), lease_generation=1
    )
    Image.objects.filter(series_id=series_id).update(status=Status.PROCESSING)


def _heartbeat(name: str, seconds_ago: float) -> None:
    """A heartbeat row last written ``seconds_ago`` by the database's clock."""
    WorkerHeartbeat.objects.create(name=name, started=timezone.now(), seen=Now() - timedelta(seconds=seconds_ago))


def test_a_silent_holder_on_another_host_loses_its_series_before_the_lease_runs_out(
    sendit_dirs: dict[str, Path],
) -> None:
    """Its host was killed or paused: the series is finished here, not after LEASE_SECONDS."""
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"])
    _held_by(series_id, f"{OTHER_HOST}:abc123")
    _heartbeat(OTHER_HOST, seconds_ago=4 * liveness.period_seconds())
    assert series_id in stale_series()  # the requeue finds it
    assert pipeline.process_series(series_id).finished
    assert set(Image.objects.filter(series_id=series_id).values_list("status", flat=True)) == {Status.DONE}
    assert Series.objects.get(pk=series_id).lease_generation == 2  # a takeover: a new generation


def test_a_holder_with_no_heartbeat_row_is_dead(sendit_dirs: dict[str, Path]) -> None:
    """Every process beats before it takes a lease: no row means its process is gone (or its row pruned)."""
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=1)
    _held_by(series_id, f"{OTHER_HOST}:abc123")
    assert pipeline.acquire_lease(series_id, pipeline.lease_owner_name()) is not None


def test_a_holder_that_beats_keeps_its_series_wherever_it_runs(sendit_dirs: dict[str, Path]) -> None:
    """Same host name, another PID namespace (a container), and its PID does not exist here: it beats,
    so it is alive and keeps the series."""
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=1)
    elsewhere = f"{socket.gethostname()}:{2**22 + 17}:0000ffff"
    _held_by(series_id, f"{elsewhere}:abc123")
    _heartbeat(elsewhere, seconds_ago=1)
    assert series_id not in stale_series()
    assert pipeline.process_series(series_id).busy
    assert set(Image.objects.filter(series_id=series_id).values_list("status", flat=True)) == {Status.PROCESSING}


def test_a_paused_process_of_this_host_is_dead_though_its_pid_exists(sendit_dirs: dict[str, Path]) -> None:
    """SIGSTOP: the PID answers signal 0, but the process has written nothing for 3 periods."""
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=1)
    paused = liveness.heartbeat_name(pid=os.getppid())  # a live process of this namespace
    _held_by(series_id, f"{paused}:abc123")
    _heartbeat(paused, seconds_ago=4 * liveness.period_seconds())
    assert pipeline.holder_is_dead(f"{paused}:abc123")
    WorkerHeartbeat.objects.filter(name=paused).update(seen=Now())
    assert not pipeline.holder_is_dead(f"{paused}:abc123")  # it beats again: alive


def test_heartbeats_are_in_database_time(sendit_dirs: dict[str, Path], monkeypatch: Any) -> None:
    """A host whose clock is an hour behind still beats 'now': its leases are not taken from it."""
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() - timedelta(hours=1))
    liveness.beat()
    assert not liveness.silent(liveness.heartbeat_name())
    assert abs((WorkerHeartbeat.objects.get(name=liveness.heartbeat_name()).seen - real_now()).total_seconds()) < 60


def test_a_process_beats_before_it_takes_a_lease(sendit_dirs: dict[str, Path]) -> None:
    """So that no other host sees its lease without a heartbeat row; the row names the process fully,
    and a process that is not a queue worker is not counted as one on the dashboard."""
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=1)
    assert pipeline.process_series(series_id).finished
    row = WorkerHeartbeat.objects.get(name=liveness.heartbeat_name())
    assert (row.host, row.pid, row.pid_namespace) == (socket.gethostname(), os.getpid(), liveness.process_namespace())
    assert row.boot_id and not row.worker
    assert row.name not in [worker["name"] for worker in heartbeat.alive()]
    heartbeat.beat(row.name, row.started)  # the queue worker thread of the same process
    assert row.name in [worker["name"] for worker in heartbeat.alive()]


def test_an_owner_name_sendit_does_not_write_is_judged_by_the_expiry_only(sendit_dirs: dict[str, Path]) -> None:
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=1)
    _held_by(series_id, "a-person-typed-this")
    assert not pipeline.holder_is_dead("a-person-typed-this")
    assert pipeline.acquire_lease(series_id, pipeline.lease_owner_name()) is None
