"""Processes that start and stop together: no part of Sendit runs on without its parent.

`sendit run` (web server and watcher) starts `sendit worker --parent PID`, the Huey consumer, which
forks WORKERS worker processes and a scheduler. Each child dies with its parent: the kernel sends it
SIGTERM when the parent exits (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread that watches
``getppid()``), and a child whose parent died before it asked stops at once.

Stopping: SIGTERM, SIGINT or SIGHUP to `sendit run` stops the web server and the watcher and asks the
consumer to stop gracefully (SIGTERM: each worker finishes the series step it is on). After
the setting ``STOP_GRACE_SECONDS`` a second SIGTERM interrupts the workers (an interrupted series is resumed by
the next consumer: its lease's holder is gone); ``KILL_AFTER_SECONDS`` later what is left is killed.
A second signal to `sendit run` skips the grace period. A consumer that dies is started again after a
back-off, and while it is down the web's /health says ``consumer_down``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from huey.consumer import Consumer as HueyConsumer
from huey.consumer import ConsumerStopped, Scheduler, Worker

log = logging.getLogger("sendit.lifecycle")

#: the longest a graceful stop waits for workers to finish their series step (the default of the
#: STOP_GRACE_SECONDS setting)
STOP_GRACE_SECONDS = 20.0
#: after the workers were interrupted, how long before what is left is killed
KILL_AFTER_SECONDS = 10.0
#: a dead consumer is started again after 3 s, then 6, 12, ... up to a minute while it keeps dying
RESTART_FIRST_SECONDS = 3.0
RESTART_MAX_SECONDS = 60.0
#: a consumer that ran this long before it died starts the back-off afresh
STABLE_SECONDS = 60.0
#: how often the fallback watchdog compares getppid() with the parent's pid
WATCH_SECONDS = 1.0

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# --- dying with the parent ----------------------------------------------------------------------


def _ask_kernel_for_parent_death_signal(signum: int) -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel signals us when the thread that forked us exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.prctl(
            ctypes.c_int(PR_SET_PDEATHSIG),
            ctypes.c_ulong(signum),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
    except (OSError, AttributeError):
        return False
    return bool(result == 0)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_SECONDS)
    log.warning("parent process %s is gone; stopping (pid %s)", parent_pid, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent(parent_pid: int) -> bool:
    """SIGTERM to this process when ``parent_pid`` (its parent) exits, whatever killed the parent.

    The kernel's parent-death signal, or where there is none (not Linux) a thread that compares
    ``getppid()`` every second; never both, so the signal comes once (a second SIGTERM means "stop
    now"). False when the parent is already gone (we were reparented before we asked): the caller
    stops at once.
    """
    kernel = _ask_kernel_for_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:
        return False
    if not kernel:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="sendit-parent-watch", daemon=True).start()
    return True


# --- the Huey consumer and its processes --------------------------------------------------------


class _StopsWithConsumer:
    """The worker and scheduler processes of the consumer: SIGTERM stops them even when no consumer is
    left to tell them to, and they get it when the consumer dies.

    Huey turns SIGTERM into KeyboardInterrupt, and a task it interrupts returns normally; a worker
    would then go on while the consumer's stop flag is unset (as after a kill -9 of the consumer).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parent_pid = os.getpid()  # built in the consumer, before the fork
        self.stopping = False

    def initialize(self) -> None:
        signal.signal(signal.SIGTERM, self._stop_now)
        if not die_with_parent(self.parent_pid):
            self.stopping = True  # the consumer died before this process started: stop in loop()
        super().initialize()  # type: ignore[misc]

    def _stop_now(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return  # stopping already: let the interrupted task's clean-up (its lease's release) finish
        self.stopping = True
        raise KeyboardInterrupt

    def loop(self, now: Any = None) -> None:
        if self.stopping:
            raise KeyboardInterrupt  # ends Huey's process loop: shutdown hooks run, the process exits
        super().loop(now)  # type: ignore[misc]

    def shutdown(self) -> None:
        super().shutdown()  # type: ignore[misc]
        if self.stopping:
            # Interrupted: a thread the task left behind (a DICOM association waiting out its time-out)
            # would hold the process's exit, and with it the consumer's. Its work is abandoned anyway.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(0)


class _Worker(_StopsWithConsumer, Worker):  # type: ignore[misc]
    pass


class _Scheduler(_StopsWithConsumer, Scheduler):  # type: ignore[misc]
    """The scheduler process enqueues the periodic requeue: it must not outlive its consumer either."""


class Consumer(HueyConsumer):  # type: ignore[misc]
    """Huey's process consumer whose workers and scheduler die with it, and whose SIGTERM is graceful.

    SIGTERM (systemd's stop, `sendit run`'s stop, the parent's death) lets each worker finish the step
    it is on; a second SIGTERM interrupts them. Supervised by `sendit run`, SIGINT and SIGHUP are
    ignored: a terminal's Ctrl-C or hang-up reaches the whole process group, and `sendit run` decides.
    Alone, SIGINT is graceful too and SIGHUP restarts (Huey's meaning).
    """

    worker_class = _Worker
    scheduler_class = _Scheduler
    _received_signal: bool
    _restart: bool
    _graceful: bool

    def __init__(
        self, huey: Any, supervised: bool = False, on_started: Callable[[], None] | None = None, **kwargs: Any
    ) -> None:
        self.supervised = supervised
        self.on_started = on_started
        super().__init__(huey, **kwargs)

    def start(self) -> None:
        """Huey's start, then ``on_started``: the start-up line comes once SIGTERM is graceful, so a
        stop asked for after it always ends with the "stopped" line."""
        super().start()
        if self.on_started is not None:
            self.on_started()

    def _set_signal_handlers(self) -> None:
        super()._set_signal_handlers()
        signal.signal(signal.SIGTERM, self._stop_gracefully)
        if self.supervised:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _stop_gracefully(self, signum: int, frame: FrameType | None) -> None:
        if self._received_signal and not self._restart:
            raise KeyboardInterrupt  # asked twice: Huey's graceful stop gives up waiting for the workers
        self._logger.info("Received SIGTERM: the workers finish their current step")
        self._received_signal, self._restart, self._graceful = True, False, True

    def loop(self, health_check_ts: Any = None) -> Any:
        try:
            return super().loop(health_check_ts)
        except KeyboardInterrupt:  # the second signal arrived outside Huey's own wait
            self.stop_flag.set()
            raise ConsumerStopped from None


def ignore_terminal_signals() -> None:
    """For a supervised child from its first moment: Ctrl-C and hang-up are for its parent to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


# --- `sendit run`'s side ------------------------------------------------------------------------


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP: the first asks for a stop, a second for a quick one.

    The handler only sets attributes: it runs between two bytecodes of the main thread, which may hold
    a lock at that moment, so it must take none (``threading.Event.set`` would).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.name = ""
        self.count = 0

    def install(self) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if not self.name:
            self.name = signal.Signals(signum).name

    @property
    def stop(self) -> bool:
        return self.count > 0

    @property
    def hurry(self) -> bool:
        return self.count > 1


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc; empty where there is none)."""
    found = []
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry.name}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """The consumer child of `sendit run`: started, watched, started again after a back-off, stopped.

    Every method runs in the main thread: the kernel's parent-death signal follows the thread that
    forked the child, and the main thread lives as long as the process.
    """

    def __init__(
        self, command: list[str], on_change: Callable[[bool], None], grace_seconds: float = STOP_GRACE_SECONDS
    ) -> None:
        self.command = command
        self.on_change = on_change
        self.grace_seconds = grace_seconds
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.failures = 0
        self.restart_at = 0.0
        self.stop_requested_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        self.on_change(True)
        log.info("queue consumer started (pid %s)", self.process.pid)

    def tick(self) -> None:
        """1. A consumer that exited is reaped and reported down, and its restart time set (the
        back-off doubles while it keeps dying soon after a start). 2. When that time has come, a new
        consumer is started."""
        now = time.monotonic()
        if self.process is not None:
            code = self.process.poll()
            if code is None:
                return
            if now - self.started_at >= STABLE_SECONDS:
                self.failures = 0
            delay = min(RESTART_MAX_SECONDS, RESTART_FIRST_SECONDS * 2**self.failures)
            self.failures += 1
            self.restart_at = now + delay
            self.on_change(False)
            log.warning(
                "queue consumer (pid %s) %s; starting it again in %.0f s", self.process.pid, _exit_reason(code), delay
            )
            self.process = None
            return
        if now >= self.restart_at:
            self.start()

    def request_stop(self) -> None:
        """A graceful stop: each worker finishes its current step (see Consumer)."""
        self.stop_requested_at = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def finish_stop(self, hurry: Callable[[], bool]) -> None:
        """Wait for the consumer to stop: up to the grace period (cut short when ``hurry()``), then
        interrupt the workers, then kill what is left."""
        process = self.process
        if process is None:
            return
        if self.stop_requested_at is None:
            self.request_stop()
        assert self.stop_requested_at is not None
        grace_until = self.stop_requested_at + self.grace_seconds
        if not self._wait(process, grace_until, hurry):
            log.warning(
                "workers still busy after %.0f s: interrupting them (their series resume at the next start)",
                time.monotonic() - self.stop_requested_at,
            )
            process.send_signal(signal.SIGTERM)
            if not self._wait(process, time.monotonic() + KILL_AFTER_SECONDS, lambda: False):
                log.error("queue consumer (pid %s) did not stop; killing it and its workers", process.pid)
                # its children first: while the consumer lives, they are certainly ours
                for child in children_of(process.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                process.kill()
        process.wait()
        self.process = None

    @staticmethod
    def _wait(process: subprocess.Popen[bytes], until: float, hurry: Callable[[], bool]) -> bool:
        while time.monotonic() < until and not hurry():
            try:
                process.wait(timeout=0.2)
                return True
            except subprocess.TimeoutExpired:
                continue
        return process.poll() is not None
