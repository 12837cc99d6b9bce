"""Watches the input folder: inotify events (watchdog) trigger a scan; a periodic rescan is the safety net.

A scan ingests every complete file not yet recorded and enqueues its series. Nothing under a name
with a `.tmp` part is touched; after a restart the first scan finds whatever was not yet ingested.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from django.db import close_old_connections
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from sendit.relay.ingest import IngestReport, ingest_folder

log = logging.getLogger("sendit.watcher")


class _Poke(FileSystemEventHandler):
    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("created", "moved", "closed"):
            self.wake.set()


class Watcher:
    """Runs in a thread of `sendit run`; ``on_ingest`` receives each scan's report (to enqueue)."""

    def __init__(
        self, root: Path, rescan_seconds: float, on_ingest: Callable[[IngestReport], None], settle: float = 0.2
    ) -> None:
        self.root = root
        self.rescan_seconds = rescan_seconds
        self.on_ingest = on_ingest
        self.settle = settle
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.observer = Observer()
        self.thread = threading.Thread(target=self._loop, name="sendit-watcher", daemon=True)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.observer.schedule(_Poke(self.wake), str(self.root), recursive=True)
        self.observer.start()
        self.wake.set()  # the first scan finds what arrived while we were down
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.observer.stop()
        self.observer.join(timeout=5)
        self.thread.join(timeout=30)

    def scan(self) -> IngestReport:
        close_old_connections()
        report = ingest_folder(self.root)
        if report.images or report.reprocessed or report.problems:
            log.info(
                "ingested %s image(s) in %s series; %s rejected, %s skipped, %s quarantined",
                report.images,
                len(report.series_ids),
                report.rejected,
                report.skipped,
                report.quarantined,
            )
        self.on_ingest(report)
        return report

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(timeout=self.rescan_seconds)
            if self.stopping.is_set():
                return
            time.sleep(self.settle)  # let a burst of events (one rename, many files) settle
            self.wake.clear()
            try:
                self.scan()
            except Exception as exc:  # the watcher must outlive a bad scan; the next one tries again
                # the type only: a database error's text can quote a UID or a value
                log.error(
                    "scan of the input folder failed (%s); retrying at the next event or rescan", type(exc).__name__
                )
