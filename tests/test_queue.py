"""The queue: one task per series through the configured Huey storage (SQLite, or Redis in the second pass)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from sendit.relay.models import Series, Status
from sendit.relay.tasks import enqueue, huey, run_series
from tests.helpers import demo_into, statuses

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def empty_queue() -> None:
    huey.flush()


def drain(limit: int = 50) -> int:
    """Execute what the queue holds, as a consumer would; bounded."""
    executed = 0
    while executed < limit:
        task = huey.dequeue()
        if task is None:
            break
        huey.execute(task)
        executed += 1
    return executed


def test_each_series_is_one_task_and_runs_to_done(sendit_dirs: dict[str, Path], empty_queue: None) -> None:
    from sendit.relay.ingest import ingest_folder

    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=2, images=2)
    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    enqueue(report.series_ids)
    assert huey.pending_count() == len(report.series_ids)
    assert all(s.enqueued_at is not None for s in Series.objects.all())
    assert drain() == len(report.series_ids)
    assert statuses() == {Status.DONE: len(written)}


def test_a_retry_is_scheduled_with_back_off(
    sendit_dirs: dict[str, Path], reconfigure: object, empty_queue: None
) -> None:
    from sendit.relay.ingest import ingest_folder

    reconfigure(IDENTIFIER_PROVIDER="tests.test_pipeline.FailingProvider", RETRY_BASE_SECONDS=30)  # type: ignore[operator]
    demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=1)
    series_id = sorted(ingest_folder(sendit_dirs["INPUT_FOLDER"]).series_ids)[0]
    run_series.call_local(series_id)
    task = huey.dequeue()
    assert task is not None and task.args == (series_id,)
    assert (
        task.eta is not None and (task.eta - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds() > 20
    )  # back in 30 s, not spinning
    series = Series.objects.get(pk=series_id)
    assert series.stage == "retrying" and series.attempts == 1 and series.next_attempt_at is not None
    assert "retrying" in series.last_error
