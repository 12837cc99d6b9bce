"""Output validity: dciodvfy finds no error in the output that it did not find in the input.

A small subset here (the full corpus run is ``benchmarks/dciodvfy_corpus.py``; results in
docs/deidentification.md). Skipped without dciodvfy unless CI=true.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from benchmarks.dciodvfy_corpus import compare

from sendit.deid import Deidentifier, DeidOptions
from tests.test_deid_engine import make_ct, pydicom_file, write

pytestmark = pytest.mark.skipif(
    shutil.which("dciodvfy") is None and os.environ.get("CI") != "true", reason="dciodvfy (dicom3tools) not installed"
)
SUBSET = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm", "SC_rgb_rle_2frame.dcm", "waveform_ecg.dcm"]


@pytest.mark.slow  # runs the dciodvfy program on every file
@pytest.mark.parametrize(
    "options", [DeidOptions(), DeidOptions.from_names(["clean_descriptors", "clean_structured_content"])]
)
def test_deidentified_output_has_no_new_dciodvfy_errors(tmp_path: Path, options: DeidOptions) -> None:
    files = [pydicom_file(name) for name in SUBSET] + [write(make_ct(), tmp_path / "ct.dcm")]
    rows = compare(files, tmp_path / "out", Deidentifier("k", options, pixel_filter=None))
    assert [row[0] for row in rows if row[1] != "written"] == []
    assert {row[0]: row[4] for row in rows if row[4]} == {}
