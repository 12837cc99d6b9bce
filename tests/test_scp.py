"""The listener's pynetdicom tuning (sendit.relay.scp): pynetdicom's acceptor loop looks for the next
request sooner only while its association is busy; an idle one sleeps as pynetdicom does."""

from __future__ import annotations

import threading

import pynetdicom.association
import pytest

from sendit.relay import scp


def test_the_acceptor_loop_sleeps_less_only_while_its_association_is_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert scp.shorten_acceptor_loop()
    assert scp.shorten_acceptor_loop()  # twice is once
    slept: list[float] = []
    monkeypatch.setattr(scp.time, "sleep", slept.append)
    clock = pynetdicom.association.time
    assert clock.monotonic() > 0  # the rest of `time` is there as it was

    def association() -> None:
        clock.sleep(0.001)  # idle: pynetdicom's 1 ms
        scp.busy()  # a request was served in this association's thread
        clock.sleep(0.001)
        clock.sleep(0.01)  # any other sleep is left alone

    thread = threading.Thread(target=association)
    thread.start()
    thread.join()
    clock.sleep(0.001)  # another thread (another association) is not busy
    assert slept == [0.001, scp.ACCEPTOR_LOOP_DELAY, 0.01, 0.001]
