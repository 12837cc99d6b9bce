"""The network edges against Orthanc, in ONE run (issue 16's targets):

  c) DCMTK storescu -> a fresh Orthanc, one association (the floor for receiving)
  L) DCMTK storescu -> Sendit's listener (`sendit run` with LISTEN_PORT, the real CLI), one
     association; storescu returns once every instance was answered, and the listener answers
     Success only once an instance is fsynced, renamed and recorded; the run then checks that
     every instance is recorded (read directly). Each round starts from an empty database: with
     SQLite a fresh data folder, with --database-url a fresh database beside the one named
     (<name>_bench, created for the round and dropped after it), so that no round receives
     instances an earlier round recorded (they would land as duplicates, a slower path)
  p) DCMTK storescu -> a bare pynetdicom SCP (the listener's settings) that writes each instance
     to /dev/null: what pynetdicom itself costs per instance (the floor for the listener)
  f) each file written, fsynced and renamed, nothing else: what durability alone costs here
  d) Orthanc REST POST /instances with 4 connections (OrthancRestDestination)
  s) Sendit's STOW-RS destination (DicomWebDestination, DICOMWEB_BATCH per request, 4 requests at
     once) -> Orthanc's DICOMweb plugin, verified by QIDO-RS

Targets: L / c >= 0.8, s / d >= 0.7. Same files for all (synthetic 512x512 CT from
benchmarks/bench_orthanc.py), each step with its own fresh Orthanc (tests/orthanc.py: TCP_NODELAY=1,
MaximumPduLength 131072), best of N interleaved rounds. Compare ratios within one run.

    .venv/bin/python benchmarks/bench_network.py --files 500 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_orthanc import (  # noqa: E402
    STORESCU,
    finish_orthanc,
    generate,
    machine,
    step_rest,
    step_storescu,
    timed,
)
from psycopg import sql as psql  # noqa: E402
from pydicom import dcmread  # noqa: E402
from tests.orthanc import OrthancServer  # noqa: E402

SECRET = "benchmark-secret-key-0123456789-abcdefghijklmnop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("sendit run exited at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the listener did not come up")


def _fresh_database(database_url: str) -> str:
    """An empty database on the server of ``database_url``, named after it with ``_bench``: dropped and
    created again (the round's own; the database named by the URL itself is never touched)."""
    import psycopg

    url = urlsplit(database_url)
    name = url.path.lstrip("/") + "_bench"
    admin = urlunsplit(url._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(name)))
        db.execute(psql.SQL("CREATE DATABASE {}").format(psql.Identifier(name)))
    return urlunsplit(url._replace(path="/" + name))


def _drop_database(database_url: str) -> None:
    import psycopg

    url = urlsplit(database_url)
    with psycopg.connect(urlunsplit(url._replace(path="/postgres")), autocommit=True) as db:
        db.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(url.path.lstrip("/"))))


def _recorded(folder: Path, database_url: str) -> int:
    """How many instances the listener recorded (its Image rows)."""
    if not database_url:
        with sqlite3.connect(folder / "data" / "sendit.sqlite3") as lite:
            return int(lite.execute("select count(*) from relay_image").fetchone()[0])
    import psycopg

    with psycopg.connect(database_url) as db:
        row = db.execute("select count(*) from relay_image").fetchone()
    return int(row[0]) if row else 0


def step_listener(src: Path, work: Path, files: int, database_url: str) -> float:
    folder = work / "listener"
    if database_url:
        database_url = _fresh_database(database_url)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    port, web = _free_port(), _free_port()
    lines = [
        f'SECRET_KEY = "{SECRET}"',
        'DATA_DIR = "data"',
        f"LISTEN_PORT = {port}",
        'ALLOWED_CALLERS = "STORESCU"',
        "SERIES_IDLE_SECONDS = 3600",  # the pipeline waits: this measures receiving alone
        f"WEB_PORT = {web}",
        "WORKERS = 1",
    ]
    if database_url:
        lines.append(f'DATABASE_URL = "{database_url}"')
    (folder / "sendit.toml").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDIT_", "DJANGO_")) and k != "DATABASE_URL"}
    env["SENDIT_CONFIG"] = str(folder / "sendit.toml")
    with (folder / "run.log").open("wb") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "sendit", "run"],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_port(port, run)
        cmd = [STORESCU, "-aet", "STORESCU", "-aec", "SENDIT", "--max-pdu", "131072", "+sd", "+r"]
        cmd += ["127.0.0.1", str(port), str(src)]
        elapsed = timed(
            lambda: subprocess.run(cmd, env=dict(os.environ, TCP_NODELAY="1"), check=True, capture_output=True)
        )
        recorded = _recorded(folder, database_url)
        if recorded != files:
            raise SystemExit(f"listener: {recorded} instances recorded, expected {files}")
        return elapsed
    finally:
        print((folder / "run.log").read_text()[-1500:]) if os.environ.get("BENCH_LOG") else None
        run.terminate()
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, 9)
            run.wait()
        shutil.rmtree(folder, ignore_errors=True)
        if database_url:
            _drop_database(database_url)


def null_scp(port: int) -> None:
    """A pynetdicom SCP that keeps nothing: each C-STORE written to /dev/null, answered Success.
    Same AE settings and connection tuning as the listener (sendit.relay.listener)."""
    from pynetdicom import evt

    from sendit.relay.scp import busy, make_ae, shorten_acceptor_loop, tune_association

    shorten_acceptor_loop()

    with open(os.devnull, "wb") as null:

        def store(event: evt.Event) -> int:
            busy()
            null.write(event.encoded_dataset(include_meta=True))
            return 0x0000  # Success

        ae = make_ae("SENDIT")
        handlers = [(evt.EVT_C_STORE, store), (evt.EVT_CONN_OPEN, tune_association)]
        ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)


def step_null_scp(src: Path) -> float:
    port = _free_port()
    scp = subprocess.Popen([sys.executable, __file__, "--null-scp", str(port)], start_new_session=True)
    try:
        _wait_for_port(port, scp)
        cmd = [STORESCU, "-aet", "STORESCU", "-aec", "SENDIT", "--max-pdu", "131072", "+sd", "+r"]
        cmd += ["127.0.0.1", str(port), str(src)]
        return timed(
            lambda: subprocess.run(cmd, env=dict(os.environ, TCP_NODELAY="1"), check=True, capture_output=True)
        )
    finally:
        scp.terminate()
        scp.wait(timeout=30)


def step_fsync_floor(paths: list[Path], work: Path) -> float:
    """What durability alone costs on this disk: each file written, fsynced, renamed, folder fsynced."""
    folder = work / "fsync"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()

    def run() -> None:
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i, path in enumerate(paths):
                data = path.read_bytes()
                temporary = folder / f".{i}.part"
                descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(descriptor, data)
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
                os.rename(temporary, folder / f"{i}.dcm")
                os.fsync(directory)
        finally:
            os.close(directory)

    try:
        return timed(run)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def dicomweb_orthanc(work: Path, name: str) -> OrthancServer:
    """A fresh Orthanc with the DICOMweb plugin (as tests/test_destination_dicomweb.py starts it)."""
    return OrthancServer(root=work / f"orthanc-{name}", dicomweb=True).start()


def step_stow(paths: list[Path], work: Path) -> float:
    from tests.orthanc import outgoing

    from sendit.destinations.dicomweb import DicomWebDestination

    server = dicomweb_orthanc(work, "stow")
    images = [outgoing(path, i) for i, path in enumerate(paths)]
    destination = DicomWebDestination(server.dicomweb_url)
    try:
        elapsed = timed(lambda: _all_delivered(destination.send(images)))
        by_series: dict[str, set[str]] = {}
        for image in images:
            by_series.setdefault(image.series_uid, set()).add(image.sop_instance_uid)
        for series_uid, uids in by_series.items():
            if destination.missing(series_uid, uids):
                raise SystemExit("stow: QIDO-RS does not find every instance")
    finally:
        destination.close()
    finish_orthanc(server, len(paths), "stow")
    return elapsed


def _all_delivered(results: list) -> None:  # type: ignore[type-arg]
    failed = [r for r in results if not r.delivered]
    if failed:
        raise SystemExit(f"stow: {len(failed)} not delivered, e.g. {failed[0].message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--series-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="best of N rounds per step, steps interleaved")
    parser.add_argument(
        "--database-url",
        default="",
        help="the listener's PostgreSQL server (default SQLite); each round uses a fresh database <name>_bench",
    )
    parser.add_argument("--steps", default="cLpfds", help="which steps (letters above)")
    parser.add_argument("--null-scp", type=int, default=0, help=argparse.SUPPRESS)  # step p's server
    args = parser.parse_args()
    if args.null_scp:
        null_scp(args.null_scp)
        return
    work = Path(tempfile.mkdtemp(prefix="sendit-bench-network-"))
    try:
        src = work / "in"
        paths = generate(src, args.files, args.series_size)
        n = len(paths)
        size_kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        dcmread(paths[0], stop_before_pixels=True)
        steps: dict[str, Callable[[], float]] = {
            "c": lambda: step_storescu(src, work, n),
            "L": lambda: step_listener(src, work, n, args.database_url),
            "p": lambda: step_null_scp(src),
            "f": lambda: step_fsync_floor(paths, work),
            "d": lambda: step_rest(paths, work),
            "s": lambda: step_stow(paths, work),
        }
        labels = {
            "c": "c) storescu -> Orthanc, 1 assoc",
            "L": "L) storescu -> Sendit listener (durable + recorded)",
            "p": "p) storescu -> pynetdicom SCP into /dev/null (floor)",
            "f": "f) write + fsync + rename each file (durability floor)",
            "d": "d) REST POST /instances -> Orthanc, 4 conns",
            "s": "s) STOW-RS -> Orthanc DICOMweb, 4 requests at once",
        }
        chosen = [letter for letter in args.steps if letter in steps]
        best: dict[str, float] = {}
        for round_number in range(args.rounds):
            for letter in chosen:
                seconds = steps[letter]()
                best[letter] = min(best.get(letter, float("inf")), seconds)
                print(f"  round {round_number + 1} {letter}: {n / seconds:.0f} files/s", flush=True)
        print(f"{n} files, {size_kb:.0f} KB each; {machine()}; load {os.getloadavg()[0]:.1f}")
        rates = {letter: n / seconds for letter, seconds in best.items()}
        for letter in chosen:
            print(f"{labels[letter]:<55} {rates[letter]:8.0f} files/s")
        if "L" in rates and "c" in rates:
            print(f"{'L / c (target >= 0.8)':<55} {rates['L'] / rates['c']:8.2f}")
        if "L" in rates and "p" in rates:
            print(f"{'L / p (the listener against bare pynetdicom)':<55} {rates['L'] / rates['p']:8.2f}")
        if "p" in rates and "c" in rates:
            print(f"{'p / c (bare pynetdicom against Orthanc)':<55} {rates['p'] / rates['c']:8.2f}")
        if "L" in rates and "f" in rates:
            print(f"{'L / f (the listener against fsync alone)':<55} {rates['L'] / rates['f']:8.2f}")
        if "s" in rates and "d" in rates:
            print(f"{'s / d (target >= 0.7)':<55} {rates['s'] / rates['d']:8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
