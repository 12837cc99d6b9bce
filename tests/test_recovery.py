"""A destination that comes back: its waiting series go within seconds, not after their back-off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from sendit.relay import pipeline
from sendit.relay.ingest import ingest_folder
from sendit.relay.inline import run_inline
from sendit.relay.models import Image, Series, Stage, Status
from sendit.relay.tasks import huey, wake_when_destinations_are_back
from tests.helpers import demo_into

pytestmark = pytest.mark.django_db(transaction=True)


def test_series_waiting_on_a_destination_go_as_soon_as_it_answers(
    sendit_dirs: dict[str, Path], reconfigure: Any
) -> None:
    output = sendit_dirs["OUTPUT_FOLDER"]
    output.rmdir()
    output.write_text("not a folder: the destination is down")  # every write there fails
    reconfigure(RETRY_BASE_SECONDS=600, RETRY_CAP_SECONDS=600)
    demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    series_id = sorted(ingest_folder(sendit_dirs["INPUT_FOLDER"]).series_ids)[0]
    outcome = pipeline.process_series(series_id)
    assert outcome.retry_in == 600
    series = Series.objects.get(pk=series_id)
    assert series.stage == Stage.RETRYING and series.next_attempt_at > timezone.now()

    huey.flush()
    assert wake_when_destinations_are_back() == []  # still down: the back-off stands
    assert Series.objects.get(pk=series_id).next_attempt_at > timezone.now()

    output.unlink()
    output.mkdir()  # the destination is back
    assert wake_when_destinations_are_back() == [series_id]
    assert Series.objects.get(pk=series_id).next_attempt_at <= timezone.now()
    assert len(huey.pending()) >= 1  # a task is queued now, not in ten minutes
    huey.flush()
    run_inline([series_id], workers=1)
    assert set(Image.objects.filter(series_id=series_id).values_list("status", flat=True)) == {Status.DONE}
