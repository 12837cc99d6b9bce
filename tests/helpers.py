"""Small helpers shared by the pipeline tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from sendit.demo import generate_demo
from sendit.relay.ingest import IngestReport, ingest_folder
from sendit.relay.inline import run_inline
from sendit.relay.models import Image


def demo_into(input_folder: Path, patients: int = 2, images: int = 3) -> list[Path]:
    return generate_demo(input_folder, patients=patients, images_per_series=images, size=32)


def ingest_and_run(input_folder: Path) -> IngestReport:
    report = ingest_folder(input_folder)
    run_inline(report.series_ids, workers=1)
    return report


def statuses() -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in Image.objects.values_list("status", flat=True):
        counts[status] = counts.get(status, 0) + 1
    return counts


def all_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


def wait_for(predicate: Callable[[], bool], seconds: float, every: float = 0.05) -> bool:
    """Poll until ``predicate`` holds; bounded in time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def stop_process_group(process: subprocess.Popen[str]) -> None:
    """Ctrl-C to a `sendit run` started with start_new_session=True; SIGKILL if it will not stop."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def process_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (parent pid, process group, session id, state) of every process still running, from
    /proc; zombies left out (they run nothing and write nothing)."""
    rows = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        state = fields[0].decode()
        if state not in ("Z", "X"):
            rows[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[3]), state)
    return rows


def write_ultrasound(
    path: Path,
    *,
    frames: int = 2,
    rows: int = 48,
    columns: int = 64,
    study_uid: str = "1.2.826.0.1.3680043.8.498.101",
    series_uid: str = "1.2.826.0.1.3680043.8.498.102",
    sop_uid: str = "1.2.826.0.1.3680043.8.498.103",
) -> Path:
    """A synthetic colour ultrasound (every pixel 200,200,200) with invented PHI; the shipped burned-in
    text filter flags it ("Ultrasound without a known layout"): quarantined with OCR off, released by
    OCR (no text) otherwise."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    multi = frames > 1
    sop_class = "1.2.840.10008.5.1.4.1.1.3.1" if multi else "1.2.840.10008.5.1.4.1.1.6.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "SONO^JANE"
    ds.PatientID = "MRN-US-4711"
    ds.PatientBirthDate = "19800101"
    ds.AccessionNumber = "ACC-US-0815"
    ds.StudyDate = "20240301"
    ds.StudyTime = "101500"
    ds.Modality = "US"
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "Sono 1"
    ds.SeriesDescription = "Abdomen"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "US-ABD", "99SENDIT", "Abdomen ultrasound"
    ds.ProcedureCodeSequence = [code]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if multi:
        ds.NumberOfFrames = frames
    ds.PixelData = np.full((frames, rows, columns, 3), 200, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


class WebhookReceiver:
    """A real HTTP server on loopback that records each JSON body POSTed to it (an alert receiver)."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received: list[dict[str, object]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """`sendit ARGS` in this process: (exit code, stdout, stderr).

    Not pytest's capsys: the command sets Django up, and Django's log handlers keep the stderr they
    find; a capsys stream is closed after its test, and a later test's logging would fail on it.
    """
    import contextlib
    import io
    import sys

    from sendit.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()
