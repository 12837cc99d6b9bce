"""Processing series in this command's own worker processes, for `sendit import --wait` and the demo.

The same pipeline and leases as the queue workers, so a running `sendit worker` can share the work.
Worker processes are forked (spawning them costs about a second of CPU each for imports and Django
set-up): every database connection is closed first, and Python's pool forks all of them at the first
submit, before its own threads start, so no connection or lock is shared across the fork.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from django.db import connections

from sendit.dicomio.quiet import install_log_guard
from sendit.relay import runtime
from sendit.relay.pipeline import NextStep, process_series

BUSY_RETRY_SECONDS = 1.0
FAILED_RETRY_SECONDS = 3.0
MAX_CRASHES = 20  # about a minute of a database that does not come back: this command gives up
log = logging.getLogger("sendit.inline")


def _forget_inherited_connections() -> None:
    """In a forked worker: never close (that would end the parent's session) what the fork copied;
    and the log guard, as in every Sendit process (a fork inherits it; any other start would not)."""
    for connection in connections.all(initialized_only=True):
        connection.connection = None
    install_log_guard()


def _process_guarded(series_id: int, split: bool = False) -> NextStep:
    """A step that raised (the database went away mid-step) is tried again in seconds, not lost."""
    try:
        return process_series(series_id, split=split)
    except Exception as exc:
        log.warning(
            "series #%s: step failed (%s); retrying in %s s", series_id, type(exc).__name__, FAILED_RETRY_SECONDS
        )
        connections.close_all()
        return NextStep(finished=False, retry_in=FAILED_RETRY_SECONDS, crashed=True)


def _process_in_worker(series_id: int) -> NextStep:
    try:
        return _process_guarded(series_id, split=True)  # a big series is split over this pool's workers
    finally:
        connections.close_all()


_crashes: dict[int, int] = {}


def _reschedule(due: dict[int, float], series_id: int, outcome: NextStep) -> None:
    """A busy series (another worker holds it) is tried again soon; a failed step after its back-off."""
    if outcome.crashed:
        _crashes[series_id] = _crashes.get(series_id, 0) + 1
        if _crashes[series_id] > MAX_CRASHES:
            log.error("series #%s: its step kept failing; left to the queue's requeue", series_id)
            return
    if outcome.busy:
        due[series_id] = time.monotonic() + BUSY_RETRY_SECONDS
    elif outcome.retry_in is not None:
        due[series_id] = time.monotonic() + outcome.retry_in
        if outcome.spread > 1:  # split into parts: that many workers may run it at once
            _spread[series_id] = outcome.spread


_spread: dict[int, int] = {}


def _run_here(due: dict[int, float], on_progress: Callable[[], None] | None) -> None:
    """One worker needs no pool: run in this process (also what the tests use)."""
    while due:
        series_id, at = min(due.items(), key=lambda item: item[1])
        time.sleep(max(0.0, at - time.monotonic()))
        del due[series_id]
        _reschedule(due, series_id, _process_guarded(series_id))
        if on_progress is not None:
            on_progress()


def run_inline(
    series_ids: Iterable[int],
    workers: int,
    on_progress: Callable[[], None] | None = None,
    poll: float = 0.5,
    arrivals: Iterator[Iterable[int]] | None = None,
) -> None:
    """Run every series to a finished outcome, honouring each retry's back-off.

    ``arrivals`` (`sendit import --wait`) ingests one chunk per ``next`` and gives the series it
    handed on: it runs here, in this process, while the worker processes work on the series of the
    chunks before (issue 17). A series handed on again while it runs is run again once it ends, so
    images recorded into it meanwhile are not left behind.
    """
    due: dict[int, float] = {series_id: 0.0 for series_id in series_ids}
    feed = arrivals if arrivals is not None else iter(())
    if workers <= 1:  # one process: nothing to overlap with
        for ids in feed:
            due.update((series_id, 0.0) for series_id in ids)
        _run_here(due, on_progress)
        return
    runtime.preload_destinations()  # imported once here, not once in every forked worker
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        max_workers=max(1, workers), mp_context=context, initializer=_forget_inherited_connections
    ) as pool:
        running: dict[Future[NextStep], int] = {}
        forked, feeding = False, arrivals is not None
        while due or running or feeding:
            now = time.monotonic()
            for series_id in [sid for sid, at in due.items() if at <= now]:
                if not forked:  # the pool forks every worker at its first submit: no connection may be open
                    connections.close_all()
                    forked = True
                del due[series_id]
                # a series just split goes to as many workers as it has parts (up to all); each run
                # of a part that ends brings the series back once (the next part, or the join)
                for _ in range(min(_spread.pop(series_id, 1), workers)):
                    running[pool.submit(_process_in_worker, series_id)] = series_id
            if feeding and (forked or not due):  # one chunk ingested here while the workers run
                handed_on: Iterable[int] | None = next(feed, None)
                feeding = handed_on is not None
                for series_id in handed_on or ():  # also if it runs: a second run waits as busy, then runs
                    due[series_id] = min(due.get(series_id, now), now)
            finished: set[Future[NextStep]] = set()
            if running:
                finished, _ = wait(list(running), timeout=0 if feeding else poll, return_when=FIRST_COMPLETED)
            elif due and not feeding:
                time.sleep(min(poll, max(0.0, min(due.values()) - now)))
            for future in finished:
                _reschedule(due, running.pop(future), future.result())
            if on_progress is not None:
                on_progress()
