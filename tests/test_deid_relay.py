"""The relay's use of the engine: DEID_* keys take effect, burned-in text is quarantined with its
reason, and each de-identified series leaves metadata.json in its working folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sendit.relay.models import Image, Series, Status
from tests.helpers import ingest_and_run
from tests.test_deid_engine import make_ct, write
from tests.test_deid_ocr import gradient, render, secondary_capture

pytestmark = pytest.mark.django_db(transaction=True)
STUDY = "1.2.826.0.1.3680043.9.7777.55"


def test_relay_writes_metadata_and_quarantines_burned_in_text(sendit_dirs: dict[str, Path], reconfigure: Any) -> None:
    """A flagged secondary capture with a name in its pixels is quarantined, naming the rule and OCR;
    a flagged one without text is delivered with OCR's reading on its event."""
    reconfigure(KEEP_WORKING=True, DEID_OPTIONS="retain_long_modified_dates,clean_descriptors")
    inbox = sendit_dirs["INPUT_FOLDER"] / "batch"
    for index in range(2):
        write(make_ct(study_uid=STUDY, series_uid=STUDY + ".1", sop_uid=f"{STUDY}.1.{index}"), inbox / f"ct{index}.dcm")
    with_text = gradient(256, 256)
    render(with_text, "DOE^JANE 1960", (20, 100), 28)
    for name, pixels in (("text", with_text), ("plain", gradient(256, 256))):
        capture = secondary_capture(pixels)
        capture.StudyInstanceUID, capture.SeriesInstanceUID = STUDY, f"{STUDY}.2"
        write(capture, inbox / f"sc-{name}.dcm")
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])

    quarantined = Image.objects.get(status=Status.QUARANTINED)
    assert quarantined.path.endswith("sc-text.dcm")
    assert quarantined.reason.startswith(
        "de-identification failed: text detected by OCR: Secondary capture: policy; 1 region(s)"
    ), quarantined.reason
    plain = Image.objects.get(path__endswith="sc-plain.dcm")
    assert plain.status == Status.DONE
    reading = plain.events.get(to_status=Status.DONEPROCESSING).reason
    assert reading.startswith("burned-in text check (Secondary capture: policy): no text found by OCR"), reading
    series = Series.objects.get(series_uid=STUDY + ".1")
    assert set(series.images.values_list("status", flat=True)) == {Status.DONE}
    document = json.loads((sendit_dirs["WORK_FOLDER"] / f"series-{series.pk}" / "metadata.json").read_text())
    assert document["series_uid"] == series.deid_series_uid and document["images"] == 2
    assert document["study_description"] == "CT CHEST" and document["modality"] == "CT"
    assert "Smith" not in json.dumps(document) and "MRN0012345" not in json.dumps(document)
