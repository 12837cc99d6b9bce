"""`sendit run` owns its processes: a signal stops all of them, none outlives its parent, a killed
consumer is started again, and a busy web port starts nothing.

Each `sendit run` is started in a session of its own; the processes it leaves behind are found by
that session id in /proc (zombies do not count: they run nothing). Signals go to the `sendit run`
process alone, as systemd's KillMode=mixed sends them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sendit.demo import generate_demo
from sendit.lifecycle import KILL_AFTER_SECONDS, STOP_GRACE_SECONDS
from tests.helpers import process_table, wait_for
from tests.test_cli import SECRET, cli_env

pytestmark = [
    pytest.mark.slow,  # starts `sendit run` processes
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc"),
]

WORKERS = 2  # cli_env's SENDIT_WORKERS: the consumer forks these and a scheduler


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    (tmp_path / "sendit.toml").write_text(f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\nRETRY_BASE_SECONDS = 0\n')
    return tmp_path


# -- the process table ---------------------------------------------------------------------------


def _table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state) of every process still running (zombies left out)."""
    return {pid: (parent, session, state) for pid, (parent, _, session, state) in process_table().items()}


def session_members(session: int) -> list[int]:
    return [pid for pid, (_, sid, _) in _table().items() if sid == session]


def children(pid: int) -> list[int]:
    return [child for child, (parent, _, _) in _table().items() if parent == pid]


def alive(pid: int) -> bool:
    return pid in _table()


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def consumers(run_pid: int) -> list[int]:
    """The `sendit worker` children of a `sendit run`."""
    return [pid for pid in children(run_pid) if "worker" in cmdline(pid)]


# -- a `sendit run` of a test's own --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health(port: int) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        return answer
    except (httpx.HTTPError, ValueError):
        return {}


def kill_session(session: int) -> None:
    """SIGKILL to whatever a test's `sendit run` left behind: only members of its own session."""
    for pid in session_members(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not session_members(session), 10)


@contextlib.contextmanager
def sendit_run(folder: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    log = open(folder / f"run-{port}.log", "wb")  # noqa: SIM115 - closed below, after the process
    process = subprocess.Popen(
        [sys.executable, "-m", "sendit", "run", "--port", str(port)],
        cwd=folder,
        env=cli_env(folder),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        kill_session(process.pid)
        log.close()


def log_of(folder: Path, port: int) -> str:
    return (folder / f"run-{port}.log").read_text(errors="replace")


def running_consumer(run_pid: int, not_pid: int = 0) -> int:
    """The consumer of this run once its workers and scheduler are up (0 if that never happens)."""
    found: list[int] = []

    def ready() -> bool:
        found[:] = [pid for pid in consumers(run_pid) if pid != not_pid and len(children(pid)) >= WORKERS + 1]
        return bool(found)

    return found[0] if wait_for(ready, 90, every=0.2) else 0


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_to_run_stops_every_process_it_started(configured: Path, signum: signal.Signals) -> None:
    port = free_port()
    with sendit_run(configured, port) as run:
        consumer = running_consumer(run.pid)
        assert consumer, log_of(configured, port)
        assert health(port).get("status") == "ok"
        os.kill(run.pid, signum)  # to `sendit run` alone, as systemd's KillMode=mixed does
        assert run.wait(timeout=90) == 0, log_of(configured, port)
        assert wait_for(lambda: not session_members(run.pid), 30), (
            f"still running after {signum.name}: {[cmdline(p) for p in session_members(run.pid)]}"
        )


def test_processes_die_with_a_killed_run(configured: Path) -> None:
    """kill -9 of `sendit run`: its consumer notices and stops, and the consumer's workers with it."""
    port = free_port()
    with sendit_run(configured, port) as run:
        assert running_consumer(run.pid), log_of(configured, port)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=15)
        assert wait_for(lambda: not session_members(run.pid), 60), (
            f"outlived their parent: {[cmdline(p) for p in session_members(run.pid)]}"
        )


def test_a_busy_web_port_is_one_line_and_starts_nothing(configured: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        process = subprocess.Popen(
            [sys.executable, "-m", "sendit", "run", "--port", str(port)],
            cwd=configured,
            env=cli_env(configured),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=120)
            lines = (out + err).strip().splitlines()
            assert process.returncode == 2, out + err  # as `sendit check` reports a taken port
            assert len(lines) == 1, out + err
            assert f"127.0.0.1:{port}" in lines[0] and "WEB_PORT" in lines[0]
            assert "in use" in lines[0]  # the OS's reason
            assert not session_members(process.pid), "a worker was started and left running"
            assert not (configured / "data" / "sendit.sqlite3").exists()
        finally:
            kill_session(process.pid)


def test_a_killed_consumer_takes_its_workers_along_and_is_started_again(configured: Path) -> None:
    """kill -9 of the consumer: its worker processes stop, /health says consumer_down until `sendit run`
    has started a new consumer, and the new one processes what arrives."""
    port = free_port()
    with sendit_run(configured, port) as run:
        consumer = running_consumer(run.pid)
        assert consumer, log_of(configured, port)
        workers = children(consumer)
        assert wait_for(lambda: health(port) == {"status": "ok"}, 30)

        os.kill(consumer, signal.SIGKILL)
        assert wait_for(lambda: "consumer_down" in health(port).get("problems", []), 30, every=0.1), log_of(
            configured, port
        )
        assert health(port)["status"] == "degraded"
        assert wait_for(lambda: not any(alive(pid) for pid in workers), 30), (
            f"orphaned workers: {[cmdline(p) for p in workers if alive(p)]}"
        )
        assert running_consumer(run.pid, not_pid=consumer), log_of(configured, port)
        assert wait_for(lambda: "consumer_down" not in health(port).get("problems", ["?"]), 30)

        staging = configured / "staging"
        written = generate_demo(staging, patients=1, images_per_series=2, size=32)
        for study in staging.iterdir():
            study.rename(configured / "data" / "input" / study.name)
        output = configured / "data" / "output"
        assert wait_for(lambda: len(list(output.rglob("*.dcm"))) == len(written), 90), log_of(configured, port)


@contextlib.contextmanager
def silent_peer() -> Iterator[tuple[int, list[socket.socket]]]:
    """A loopback port that accepts connections and never says a word (a hung PACS)."""
    import threading

    accepted: list[socket.socket] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield int(listener.getsockname()[1]), accepted
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


def test_a_worker_stuck_on_a_silent_destination_is_interrupted_and_nothing_is_lost(configured: Path) -> None:
    """SIGTERM while a worker waits on a destination that never answers: after the grace period the
    workers are interrupted (not killed), every process stops, and the images wait for the next start."""
    with silent_peer() as (peer_port, accepted):
        (configured / "sendit.toml").write_text(
            f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\nSEND_TO_ORTHANC = true\n'
            f"ORTHANC_PORT = {peer_port}\nORTHANC_TIMEOUT = 600\nSTOP_GRACE_SECONDS = 2\n"
        )
        staging = configured / "staging"
        written = generate_demo(staging, patients=1, images_per_series=2, size=32)
        port = free_port()
        with sendit_run(configured, port) as run:
            assert running_consumer(run.pid), log_of(configured, port)
            for study in staging.iterdir():
                study.rename(configured / "data" / "input" / study.name)
            # two connections: the start-up destination check's, and a worker's now waiting in its association
            assert wait_for(lambda: len(accepted) >= 2, 60), log_of(configured, port)
            os.kill(run.pid, signal.SIGTERM)
            assert run.wait(timeout=120) == 0, log_of(configured, port)
            assert wait_for(lambda: not session_members(run.pid), 30)
            log = log_of(configured, port)
            assert "interrupting them" in log and "did not stop" not in log, log
    status = subprocess.run(
        [sys.executable, "-m", "sendit", "status", "--json"],
        cwd=configured,
        env=cli_env(configured),
        capture_output=True,
        text=True,
        timeout=120,
    )
    counts = json.loads(status.stdout)["counts"]
    in_flight = sum(counts[s] for s in ("NEW", "PROCESSING", "DONEPROCESSING", "SENT"))
    assert in_flight == len(written) and counts["ERROR"] == counts["QUARANTINED"] == 0


def test_work_stopped_by_sigterm_is_finished_by_the_next_run(configured: Path) -> None:
    """SIGTERM while series are in flight: each batch is finished or left resumable; the next start
    delivers every image exactly once."""
    (configured / "sendit.toml").write_text(
        f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\nRETRY_BASE_SECONDS = 0\nBATCH_SIZE = 5\n'
    )
    staging = configured / "staging"
    written = generate_demo(staging, patients=6, images_per_series=10, size=256)
    output = configured / "data" / "output"
    port = free_port()
    with sendit_run(configured, port) as run:
        assert running_consumer(run.pid), log_of(configured, port)
        for study in staging.iterdir():
            study.rename(configured / "data" / "input" / study.name)
        assert wait_for(lambda: len(list(output.rglob("*.dcm"))) >= 5, 90), log_of(configured, port)
        os.kill(run.pid, signal.SIGTERM)
        assert run.wait(timeout=90) == 0
        assert wait_for(lambda: not session_members(run.pid), 30)
    stopped_at = len(list(output.rglob("*.dcm")))
    port = free_port()
    with sendit_run(configured, port) as run:
        assert wait_for(lambda: len(list(output.rglob("*.dcm"))) == len(written), 120), (
            f"{stopped_at} delivered before the stop\n" + log_of(configured, port)
        )
        os.kill(run.pid, signal.SIGTERM)
        assert run.wait(timeout=90) == 0
    assert not [p for p in output.rglob("*") if p.name.endswith(".part")]


UNIT = Path(__file__).resolve().parents[1] / "deploy" / "sendit.service"


def test_the_systemd_unit_stops_run_alone_and_restarts_it() -> None:
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["ExecStart"] == "/opt/sendit/.venv/bin/sendit run"
    assert settings["User"] == "sendit" and settings["Environment"].startswith("SENDIT_CONFIG=")
    # SIGTERM to `sendit run` alone (it stops its children), SIGKILL to what is left after the timeout
    assert settings["KillMode"] == "mixed" and settings["Restart"] == "on-failure"
    assert int(settings["TimeoutStopSec"]) > STOP_GRACE_SECONDS + KILL_AFTER_SECONDS + 5  # with room to spare


@pytest.mark.skipif(not Path("/usr/bin/systemd-analyze").exists(), reason="needs systemd-analyze")
def test_the_systemd_unit_is_valid(tmp_path: Path) -> None:
    unit = tmp_path / "sendit.service"
    script = Path(sys.executable).parent / "sendit"
    unit.write_text(UNIT.read_text().replace("/opt/sendit/.venv/bin/sendit", str(script)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


ORPHAN = """
import os, signal, sys, time
from sendit import lifecycle

lifecycle._ask_kernel_for_parent_death_signal = lambda signum: False  # as on a kernel without prctl
lifecycle.WATCH_SECONDS = 0.1
child = os.fork()
if child:  # the parent: waits for its child to watch it, then exits
    time.sleep(float(sys.argv[1]))
    print(child, flush=True)
    os._exit(0)
for stream in (0, 1, 2):  # the child holds no pipe of the test's
    os.dup2(os.open(os.devnull, os.O_RDWR), stream)
assert lifecycle.die_with_parent(os.getppid())
time.sleep(120)  # SIGTERM's default action ends this long before
"""


def test_without_the_kernels_signal_a_child_still_dies_with_its_parent() -> None:
    result = subprocess.run(
        [sys.executable, "-c", ORPHAN, "0.5"], capture_output=True, text=True, timeout=60, start_new_session=True
    )
    child = int(result.stdout)
    try:
        assert wait_for(lambda: not alive(child), 30)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_run_names_an_unreachable_destination_at_start(configured: Path) -> None:
    """12.8: the operator learns at start that a destination does not answer, not at the first series."""
    closed = free_port()  # nothing listens here
    with (configured / "sendit.toml").open("a") as config:
        config.write(f'ORTHANC_URL = "http://127.0.0.1:{closed}"\n')
    port = free_port()
    with sendit_run(configured, port) as process:
        assert wait_for(lambda: "unreachable at start" in log_of(configured, port), 30), log_of(configured, port)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    line = next(line for line in log_of(configured, port).splitlines() if "unreachable at start" in line)
    assert "orthanc-rest" in line and str(closed) in line
