"""The pynetdicom AE the C-STORE listener serves with, and how each of its connections is tuned.

Django-free, so that benchmarks/bench_network.py measures a bare SCP with exactly these settings
(the floor the listener is compared with).
"""

from __future__ import annotations

import contextlib
import inspect
import socket
import threading
import time
import types

import pynetdicom
import pynetdicom.association
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from sendit.destinations.commitment import STORAGE_COMMITMENT_PUSH

#: how long an association's DUL thread sleeps when it found nothing to do (pynetdicom's default is
#: 1 ms). It runs up to three times per C-STORE (the request's first PDU, the response), so it is a
#: large part of a 3 ms round trip: 0.5 ms gave 1.3x the C-STOREs per second into a bare SCP, for
#: 5 % instead of 3 % of a core per idle open association (docs/performance.md).
DUL_LOOP_DELAY = 0.0005

#: how long an acceptor association's own thread sleeps between two looks for a complete request
#: while it is busy (pynetdicom 3.0 hardcodes 1 ms: ``time.sleep(0.001)`` in
#: ``Association._run_reactor``). Once per C-STORE; 0.2 ms gave 1.5x the C-STOREs per second into a
#: bare SCP (docs/performance.md). Only within :data:`BUSY_SECONDS` of the association's last
#: request (:func:`busy`): an idle open association sleeps 1 ms as before.
ACCEPTOR_LOOP_DELAY = 0.0002
BUSY_SECONDS = 1.0

_thread = threading.local()  # the association's thread: until when it counts as busy (monotonic)


def busy() -> None:
    """Called in an association's thread for each request it serves: look for the next one sooner."""
    _thread.until = time.monotonic() + BUSY_SECONDS


def make_ae(aet: str) -> AE:
    """Verification, storage commitment reports, and every storage SOP class in every transfer syntax."""
    ae = AE(ae_title=aet)
    ae.add_supported_context(Verification)
    # the peer of a storage commitment request reports on an association of its own, in the SCP role
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = 131072
    ae.require_called_aet = True
    return ae


def tune_association(event: evt.Event) -> None:
    """At EVT_CONN_OPEN. TCP_NODELAY: a C-STORE response must not wait for Nagle (DESIGN.md, ~45 ms
    each). A shorter idle sleep of the DUL thread (:data:`DUL_LOOP_DELAY`)."""
    dul = event.assoc.dul
    sock = dul.socket
    if sock is not None and sock.socket is not None:
        with contextlib.suppress(OSError):
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dul._run_loop_delay = DUL_LOOP_DELAY  # pynetdicom reads it on every loop (dul.py, run_reactor)


class _AcceptorClock(types.SimpleNamespace):
    """``time`` as pynetdicom.association sees it: its acceptor loop's 1 ms sleep, shorter while busy."""

    def sleep(self, seconds: float) -> None:
        if seconds == 0.001 and getattr(_thread, "until", 0.0) > time.monotonic():
            seconds = ACCEPTOR_LOOP_DELAY
        time.sleep(seconds)


def shorten_acceptor_loop() -> bool:
    """Make pynetdicom's acceptor loop sleep :data:`ACCEPTOR_LOOP_DELAY` instead of 1 ms while its
    association is :func:`busy` (in this process: only the listener's process calls it).

    pynetdicom offers no setting for it, so this replaces the ``time`` module as
    ``pynetdicom.association`` sees it with one whose ``sleep(0.001)`` is shorter; every other sleep
    there (0.1 ms, 10 ms, 100 ms) is unchanged, and 1 ms occurs only in the acceptor loop. Done only
    for a pynetdicom whose loop is the one this was measured with (3.x, ``time.sleep(0.001)`` once,
    in ``_run_reactor``); returns whether it was done."""
    module = pynetdicom.association
    if isinstance(module.time, _AcceptorClock):
        return True
    try:
        loop = inspect.getsource(module.Association._run_reactor)
        others = inspect.getsource(module).count("time.sleep(0.001)")
    except (OSError, TypeError):
        return False
    if not pynetdicom.__version__.startswith("3.") or "time.sleep(0.001)" not in loop or others != 1:
        return False
    functions = {name: getattr(time, name) for name in dir(time) if not name.startswith("_") and name != "sleep"}
    module.time = _AcceptorClock(**functions)  # type: ignore[assignment]
    return True
