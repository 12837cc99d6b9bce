"""Processing series in this command's own worker processes, for `sendit import --wait` and the demo.

The same pipeline and leases as the queue workers, so a running `sendit worker` can share the work.
Processes are spawned (not forked) so that no database connection is shared across a fork.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from django.db import connections

from sendit.relay import child
from sendit.relay.pipeline import Outcome, process_series

BUSY_RETRY_SECONDS = 1.0


def _reschedule(due: dict[int, float], series_id: int, outcome: Outcome) -> None:
    """A busy series (another worker holds it) is tried again soon; a failed step after its back-off."""
    if outcome.busy:
        due[series_id] = time.monotonic() + BUSY_RETRY_SECONDS
    elif outcome.retry_in is not None:
        due[series_id] = time.monotonic() + outcome.retry_in


def _run_here(due: dict[int, float], on_progress: Callable[[], None] | None) -> None:
    """One worker needs no pool: run in this process (also what the tests use)."""
    while due:
        series_id, at = min(due.items(), key=lambda item: item[1])
        time.sleep(max(0.0, at - time.monotonic()))
        del due[series_id]
        _reschedule(due, series_id, process_series(series_id))
        if on_progress is not None:
            on_progress()


def run_inline(
    series_ids: Iterable[int], workers: int, on_progress: Callable[[], None] | None = None, poll: float = 0.5
) -> None:
    """Run every series to a finished outcome, honouring each retry's back-off."""
    due: dict[int, float] = {series_id: 0.0 for series_id in series_ids}
    if not due:
        return
    if workers <= 1:
        _run_here(due, on_progress)
        return
    connections.close_all()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=context, initializer=child.setup) as pool:
        running: dict[Future[Outcome], int] = {}
        while due or running:
            now = time.monotonic()
            for series_id in [sid for sid, at in due.items() if at <= now]:
                del due[series_id]
                running[pool.submit(child.process, series_id)] = series_id
            if running:
                finished, _ = wait(list(running), timeout=poll, return_when=FIRST_COMPLETED)
            else:
                finished = set()
                time.sleep(poll)
            for future in finished:
                _reschedule(due, running.pop(future), future.result())
            if on_progress is not None:
                on_progress()
