"""The relay's use of the engine: DEID_* keys take effect, burned-in text is quarantined with its
reason, and each de-identified series leaves metadata.json in its working folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from sendit.relay.models import Image, Series, Status
from tests.helpers import ingest_and_run
from tests.test_deid_engine import make_ct, write

pytestmark = pytest.mark.django_db(transaction=True)
STUDY = "1.2.826.0.1.3680043.9.7777.55"


def test_relay_writes_metadata_and_quarantines_burned_in_text(sendit_dirs: dict[str, Path], reconfigure: Any) -> None:
    reconfigure(KEEP_WORKING=True, DEID_OPTIONS="retain_long_modified_dates,clean_descriptors")
    inbox = sendit_dirs["INPUT_FOLDER"] / "batch"
    for index in range(2):
        write(make_ct(study_uid=STUDY, series_uid=STUDY + ".1", sop_uid=f"{STUDY}.1.{index}"), inbox / f"ct{index}.dcm")
    capture = make_ct(study_uid=STUDY, series_uid=STUDY + ".2", sop_uid=f"{STUDY}.2.1")
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    write(capture, inbox / "sc.dcm")
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])

    quarantined = Image.objects.get(status=Status.QUARANTINED)
    assert quarantined.reason == "de-identification failed: burned-in annotation: Secondary Capture"
    series = Series.objects.get(series_uid=STUDY + ".1")
    assert set(series.images.values_list("status", flat=True)) == {Status.DONE}
    document = json.loads((sendit_dirs["WORK_FOLDER"] / f"series-{series.pk}" / "metadata.json").read_text())
    assert document["series_uid"] == series.deid_series_uid and document["images"] == 2
    assert document["study_description"] == "CT CHEST" and document["modality"] == "CT"
    assert "Smith" not in json.dumps(document) and "MRN0012345" not in json.dumps(document)
