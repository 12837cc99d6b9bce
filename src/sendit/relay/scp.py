"""The pynetdicom AE the C-STORE listener serves with, and how each of its connections is tuned.

Django-free, so that benchmarks/bench_network.py measures a bare SCP with exactly these settings
(the floor the listener is compared with).
"""

from __future__ import annotations

import contextlib
import socket

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from sendit.destinations.commitment import STORAGE_COMMITMENT_PUSH

#: how long an association's DUL thread sleeps when it found nothing to do (pynetdicom's default is
#: 1 ms). It runs up to three times per C-STORE (the request's first PDU, the response), so it is a
#: large part of a 3 ms round trip: 0.5 ms gave 1.3x the C-STOREs per second into a bare SCP, for
#: 5 % instead of 3 % of a core per idle open association (docs/performance.md).
DUL_LOOP_DELAY = 0.0005


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
