"""The 30-second stall (issue 12.4) as a loop against a real Orthanc: drops of 10 series x 20 images
over DICOM, sent and verified by 5 worker processes, as `sendit run`'s workers do.

Before the fix about one drop in two had a series that waited out the DIMSE time-out on an image
Orthanc had stored and answered within a millisecond: pynetdicom's association reactor thread had
taken the C-STORE answer off the queue ("Received unexpected C-STORE service message"; see
``sendit.destinations.dicom._AnswerQueue``). The deterministic form of that race is
``test_answer_taken_by_the_association_reactor_is_not_lost`` in test_destination_dicom.py; this loop
shows the whole path has no other: every image answered on its first association, no reconnect,
verification finds everything. Bounded: a fixed number of drops, each wait bounded by ``TIMEOUT``.

``benchmarks/bench_orthanc.py --stall-drops 50`` runs the same loop longer and prints latencies.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.association import Association

from sendit.destinations.dicom import DicomDestination
from tests.orthanc import OrthancServer, make_series

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

DROPS = 10
SERIES = 10
IMAGES = 20
WORKERS = 5
TIMEOUT = 5.0  # what a lost answer costs: the loop stays bounded even when it fails


@dataclass
class SeriesOutcome:
    """What one worker saw for one series (image ids and messages only)."""

    images: int
    delivered: int
    problems: list[str]  # result messages and reconnect events
    reconnects: int
    missing: int
    send_seconds: float
    store_seconds: list[float] = field(default_factory=list)

    @property
    def stalled(self) -> bool:
        return bool(self.problems or self.reconnects or self.missing or self.delivered != self.images)


_store_seconds: list[float] = []


def _timing_stores() -> None:
    """Record each C-STORE round trip in this worker process (installed once per process)."""
    if getattr(Association.send_c_store, "_timed", False):
        return
    original = Association.send_c_store

    def timed(self: Association, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            _store_seconds.append(time.perf_counter() - started)

    timed._timed = True  # type: ignore[attr-defined]
    Association.send_c_store = timed  # type: ignore[method-assign]


def send_series(host: str, port: int, folder: str, first_id: int) -> SeriesOutcome:
    """One series, in a worker process: send, then verify, on a fresh destination (as a task does)."""
    _timing_stores()
    _store_seconds.clear()
    images = make_series(Path(folder), IMAGES, first_id=first_id)
    dest = DicomDestination(
        host, port, connect_timeout=5, acse_timeout=TIMEOUT, dimse_timeout=TIMEOUT, network_timeout=TIMEOUT
    )
    started = time.perf_counter()
    results = dest.send(images)
    send_seconds = time.perf_counter() - started
    missing = dest.missing(images[0].series_uid, {i.sop_instance_uid for i in images})
    dest.close()
    return SeriesOutcome(
        images=len(images),
        delivered=sum(r.delivered for r in results),
        problems=[r.message for r in results if r.message] + dest.events,
        reconnects=dest.reconnects,
        missing=len(missing),
        send_seconds=send_seconds,
        store_seconds=list(_store_seconds),
    )


def run_drops(
    server: OrthancServer,
    root: Path,
    drops: int = DROPS,
    *,
    series: int = SERIES,
    workers: int = WORKERS,
    report: bool = False,
) -> list[list[SeriesOutcome]]:
    """``drops`` rounds of ``series`` series sent at once by ``workers`` processes (spawned, not
    forked: the parent may hold pynetdicom threads)."""
    outcomes: list[list[SeriesOutcome]] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for drop in range(drops):
            folder = root / f"drop{drop}"
            jobs = [str(folder / f"series{k}") for k in range(series)]
            firsts = [1 + k * IMAGES for k in range(series)]
            started = time.perf_counter()
            got = list(pool.map(send_series, [server.host] * series, [server.dicom_port] * series, jobs, firsts))
            outcomes.append(got)
            shutil.rmtree(folder, ignore_errors=True)
            if report:
                slowest = max(o.send_seconds for o in got)
                stalled = sum(o.stalled for o in got)
                took = time.perf_counter() - started
                print(f"drop {drop}: {took:.1f} s, slowest series {slowest:.2f} s, {stalled} stalled", flush=True)
    return outcomes


def test_no_answer_is_lost_over_many_drops(orthanc_factory: Any, tmp_path: Path) -> None:
    server = orthanc_factory()

    drops = run_drops(server, tmp_path)

    stalled = [(d, o.problems, o.reconnects, o.missing) for d, drop in enumerate(drops) for o in drop if o.stalled]
    assert stalled == []
    assert server.count_instances() == DROPS * SERIES * IMAGES
