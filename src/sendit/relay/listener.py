"""The C-STORE listener of `sendit run` (a pynetdicom SCP): the second way in, beside the watched folder.

Started when LISTEN_PORT is set. Accepts associations only from ALLOWED_CALLERS (AE titles, each with
an optional ``@host``); any other caller is rejected at association (A-ASSOCIATE-RJ, "calling AE
title not recognised", PS3.8 Table 9-21). Supports Verification (C-ECHO) and every storage SOP class
pynetdicom knows, in every transfer syntax it knows: an instance is kept byte for byte as received.

Each C-STORE is answered Success only once the instance is durable and recorded
(:mod:`sendit.relay.received`): any failure before that is a Refused: Out of Resources status
(PS3.4 Table B.2-1, 0xA7xx) with a short error comment, never Success for something not kept.

A series enters the pipeline when none of its instances arrived for SERIES_IDLE_SECONDS (like
Orthanc's StableAge): a thread of the listener enqueues it then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection
from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from sendit.config import Config
from sendit.destinations.commitment import parse_report
from sendit.relay import commitments, received
from sendit.relay.callers import addresses, parse_callers, tls_context
from sendit.relay.pipeline import is_no_space
from sendit.relay.scp import busy, make_ae, shorten_acceptor_loop, tune_association

log = logging.getLogger("sendit.listener")

# PS3.4 Table B.2-1: 0xA7xx Refused: Out of Resources. Ours: which step failed.
NOT_KEPT = 0xA700  # the instance could not be written (disk full, folder unwritable)
NOT_RECORDED = 0xA701  # written, but the database did not record it
PROCESSING_FAILURE = 0x0110  # PS3.7 C.4: a report we could not keep (the peer may send it again)
CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3: not a DICOM data set we can read (kept in quarantine)
SUCCESS = 0x0000

# PS3.8 Table 9-21: A-ASSOCIATE-RJ, rejected-permanent, by the service user, calling AE not recognised
_REJECT_CALLER = (0x01, 0x01, 0x03)

#: a series' hold in the database is refreshed at most this often per series (seconds)
HOLD_REFRESH_SECONDS = 1.0
#: how often the listener looks whether PostgreSQL restarted under it (received.DatabaseWatch)
WATCH_SECONDS = 1.0


def _status(code: int, comment: str = "") -> Dataset:
    """A C-STORE response status with an Error Comment (PS3.7 C.4.2.1.3: LO, at most 64 characters)."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


class Listener:
    """The SCP and the thread that hands idle series to ``on_complete`` (the queue)."""

    def __init__(self, cfg: Config, on_complete: Callable[[set[int]], Any]) -> None:
        self.cfg = cfg
        self.on_complete = on_complete
        self.idle_seconds = float(cfg.SERIES_IDLE_SECONDS)
        self.callers = parse_callers(cfg.ALLOWED_CALLERS)
        self._hosts = {caller.host: addresses(caller.host) for caller in self.callers if caller.host}
        self._due: dict[int, float] = {}  # series id → when it is idle (time.monotonic())
        self._held: dict[int, float] = {}  # series id → when its hold was last written
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._hand_over_idle, name="sendit-listener-idle", daemon=True)
        self.watch = received.DatabaseWatch()
        self.server: ThreadedAssociationServer | None = None
        self.ae = make_ae(cfg.LISTEN_AET)

    # -- start and stop ---------------------------------------------------------------------

    def bind(self) -> None:
        """Listen on LISTEN_HOST:LISTEN_PORT (raises OSError when it cannot: the port is in use)."""
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._requested),
            (evt.EVT_CONN_OPEN, self._connected),
            (evt.EVT_CONN_CLOSE, self._closed),
            (evt.EVT_C_ECHO, self._echo),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_N_EVENT_REPORT, self._commitment_report),
        ]
        if not shorten_acceptor_loop():
            log.info("pynetdicom's acceptor loop keeps its 1 ms sleep (not the pynetdicom this was tuned for)")
        context = tls_context(self.cfg.LISTEN_TLS_CERT, self.cfg.LISTEN_TLS_KEY, self.cfg.LISTEN_TLS_CA)
        server = self.ae.start_server(
            (self.cfg.LISTEN_HOST, self.cfg.LISTEN_PORT), block=False, evt_handlers=handlers, ssl_context=context
        )
        assert isinstance(server, ThreadedAssociationServer)
        self.server = server

    def start(self) -> None:
        """1. Recover what a stop left (temporary files out, complete ones recorded). 2. Listen.
        3. Start the thread that hands idle series over."""
        report = received.recover()
        self.track(report.series_ids | report.resumable)
        self.watch.check()  # its connection is open from now on: a restart of PostgreSQL ends it
        if self.server is None:
            self.bind()
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting; an association in progress is cut (what it did not get Success for, its
        sender still holds). Series already received are handed over by the queue's requeue."""
        self._stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.watch.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    # -- series that wait for their last instance -------------------------------------------

    def track(self, series_ids: Iterable[int]) -> None:
        """These series got an instance now: each is complete SERIES_IDLE_SECONDS from now."""
        now = time.monotonic()
        hold: set[int] = set()
        with self._lock:
            for series_id in series_ids:
                self._due[series_id] = now + self.idle_seconds
                if now - self._held.get(series_id, float("-inf")) >= HOLD_REFRESH_SECONDS:
                    self._held[series_id] = now
                    hold.add(series_id)
        # the database's hold outlasts ours by the refresh interval: the requeue never comes first
        received.hold_series(hold, self.idle_seconds + 2 * HOLD_REFRESH_SECONDS)

    def due(self) -> set[int]:
        """The tracked series that are idle now; they are no longer tracked."""
        now = time.monotonic()
        with self._lock:
            ready = {series_id for series_id, due in self._due.items() if due <= now}
            for series_id in ready:
                del self._due[series_id]
                self._held.pop(series_id, None)
        return ready

    def _hand_over_idle(self) -> None:
        watched = time.monotonic()
        while not self._stopping.wait(0.25):
            if time.monotonic() - watched >= WATCH_SECONDS:
                watched = time.monotonic()
                self.look_at_database()
            ready = self.due()
            if not ready:
                continue
            try:
                self.on_complete(ready)
                log.info("%s received series idle for %g s: queued", len(ready), self.idle_seconds)
            except Exception as exc:  # the requeue finds them (their hold runs out); the log says so
                log.error("could not queue %s idle series (%s); the requeue will", len(ready), type(exc).__name__)
            finally:
                connection.close()

    def look_at_database(self) -> None:
        """If PostgreSQL restarted since the last look: record again what it may have lost, and hold
        those series as if they had just arrived (:class:`received.DatabaseWatch`)."""
        try:
            report = self.watch.check()
            if report is not None:
                self.track(report.series_ids | report.resumable)
        except Exception as exc:  # the database failed again: the next look retries (the watch is still lost)
            log.error("received instances could not be checked after a database failure (%s)", type(exc).__name__)

    # -- event handlers (each runs in the association's thread) -------------------------------

    def admits(self, aet: str, address: str) -> bool:
        return any(caller.admits(aet, address, self._hosts.get(caller.host, frozenset())) for caller in self.callers)

    def _requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        request = requestor.primitive
        aet = str(request.calling_ae_title).strip() if request is not None else ""  # not yet in ae_title
        if not self.admits(aet, str(requestor.address)):
            # the AE title is the caller's own name for itself, not patient data: it names who knocked
            log.warning("association from %s (AE %r) rejected: not in ALLOWED_CALLERS", requestor.address, aet)
            event.assoc.acse.send_reject(*_REJECT_CALLER)
            event.assoc.kill()  # as pynetdicom's own rejection does: the DUL sends the A-ASSOCIATE-RJ, then stops

    def _connected(self, event: evt.Event) -> None:
        tune_association(event)

    def _closed(self, event: evt.Event) -> None:
        connection.close()  # this association's thread is done with its database connection

    def _echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _commitment_report(self, event: evt.Event) -> tuple[int, None]:
        """A storage commitment report (PS3.4 J.3.3): kept for the worker that asked (sendit.relay.commitments)."""
        try:
            report = parse_report(event.event_information)
            commitments.record(report)
        except Exception as exc:
            log.error("a storage commitment report could not be kept (%s)", type(exc).__name__)
            connection.close()
            return PROCESSING_FAILURE, None
        log.info("storage commitment report: %s committed, %s failed", len(report.committed), len(report.failed))
        return SUCCESS, None

    def _store(self, event: evt.Event) -> int | Dataset:
        """1. Keep the instance: durable and recorded (at once, :func:`received.keep`). 2. Track its series.
        Then answer."""
        busy()  # the next request of this association is looked for sooner
        data = event.encoded_dataset(include_meta=True)
        try:
            report = received.keep(data)  # durable and recorded, or raises
        except OSError as exc:
            why = "disk full" if is_no_space(exc) else f"cannot write ({type(exc).__name__})"
            log.error("a received instance was not kept: %s; answered 0x%04X", why, NOT_KEPT)
            return _status(NOT_KEPT, f"Sendit: {why}; instance not kept")
        except Exception as exc:
            log.error("a received instance was not recorded (%s); answered 0x%04X", type(exc).__name__, NOT_RECORDED)
            connection.close()  # a broken connection is not reused by this association's next store
            return _status(NOT_RECORDED, "Sendit: database unavailable; instance not kept")
        if report.rejected:
            _, _, reason = report.problems[0]
            return _status(CANNOT_UNDERSTAND, f"Sendit: {reason}")
        try:
            self.track(report.series_ids)
        except Exception as exc:  # recorded: the requeue starts it once its hold runs out
            log.warning("a received series could not be held for %g s (%s)", self.idle_seconds, type(exc).__name__)
        return SUCCESS
