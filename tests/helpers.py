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
