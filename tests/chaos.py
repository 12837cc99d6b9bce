"""Harness for the chaos suite: real `sendit` processes on the test database, faults, independent counts.

The child processes read their configuration the way a user's do (a sendit.toml and SENDIT_*
variables), pointed at the database of this pytest run (SQLite file or PostgreSQL test database)
and at a queue of their own. Every process is started in its own session, so that a signal to its
process group reaches its workers and nothing else; only processes started here are signalled.

The accounting reads the destination folder with pydicom and compares it with what was put into the
input folder, independently of the status Sendit reports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydicom

from tests.helpers import process_table

# -- configuration of the child processes ------------------------------------------------------


def this_run_database_url() -> str:
    """The database this pytest run uses (the test database Django created), as a DATABASE_URL."""
    from django.db import connection

    cfg = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{cfg['NAME']}"
    user = quote(cfg.get("USER") or "", safe="")
    password = quote(cfg.get("PASSWORD") or "", safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    port = f":{cfg['PORT']}" if cfg.get("PORT") else ""
    return f"postgres://{credentials}{cfg.get('HOST') or '127.0.0.1'}{port}/{quote(cfg['NAME'], safe='')}"


def on_postgres() -> bool:
    from django.db import connection

    return bool(connection.vendor == "postgresql")


def live_queue_url() -> str:
    from django.conf import settings

    return str(settings.SENDIT.QUEUE_URL)


def queue_for_children(tmp_path: Path) -> str:
    """Redis when this run uses Redis (its queue cleared first), else a SQLite queue of this test alone."""
    url = live_queue_url()
    if url.startswith("redis://"):
        clear_redis_queue(url)
        return url
    return f"sqlite:///{tmp_path / 'queue.db'}"


def clear_redis_queue(url: str, name: str = "sendit") -> None:
    """Remove the keys of Huey's queue ``name`` only (tasks left by an earlier test), never others."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.delete(*(f"huey.{kind}.{name}" for kind in ("redis", "schedule", "results", "errors")))
    finally:
        client.close()


def child_env(tmp_path: Path, folders: dict[str, Path], queue_url: str, **settings: object) -> dict[str, str]:
    """A user's environment for `sendit`: a sendit.toml with the secret, SENDIT_* for the rest."""
    from django.conf import settings as dj

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDIT_", "DJANGO_")) and k != "DATABASE_URL"}
    config = tmp_path / "sendit.toml"
    config.write_text(f'SECRET_KEY = "{dj.SENDIT.SECRET_KEY}"\n', encoding="utf-8")
    env["SENDIT_CONFIG"] = str(config)
    env["SENDIT_DATABASE_URL"] = this_run_database_url()
    env["SENDIT_QUEUE_URL"] = queue_url
    for name in ("DATA_DIR", "INPUT_FOLDER", "WORK_FOLDER", "QUARANTINE_FOLDER", "OUTPUT_FOLDER"):
        env[f"SENDIT_{name}"] = str(folders[name])
    defaults: dict[str, object] = {"RETRY_BASE_SECONDS": 1, "RETRY_CAP_SECONDS": 5, "WORKERS": 2}
    for key, value in {**defaults, **settings}.items():
        env[f"SENDIT_{key}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Sendit:
    """One `sendit <args>` command in its own process group; restartable, killable, pausable."""

    tmp_path: Path
    args: tuple[str, ...]
    env: dict[str, str]
    label: str
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    def start(self) -> Sendit:
        assert not self._ours(), "already running"
        self.starts += 1
        log = self.tmp_path / f"{self.label}-{self.starts}.log"
        self.logs.append(log)
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sendit", *self.args],
                cwd=self.tmp_path,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def _ours(self) -> bool:
        """True while the group's leader is not reaped: until then its pid, and so the process group
        id, cannot belong to anyone else (we never reap it before we are done signalling the group)."""
        return self.process is not None and self.process.returncode is None

    def _exited(self) -> bool:
        """Has the leader exited? Asked without reaping it (WNOWAIT), so the group id stays ours."""
        assert self.process is not None
        return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def signal_group(self, number: int) -> None:
        """Signal the process group this object started (its leader's pid); a finished group is left alone."""
        if self._ours():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, number)

    def kill(self) -> None:
        """kill -9 of the whole group (the command and its worker processes), then reap the leader."""
        if not self._ours():
            return
        assert self.process is not None
        self.signal_group(signal.SIGKILL)
        self.process.wait(timeout=15)
        _wait_group_gone(self.process.pid, 10)

    def pause(self) -> None:
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)

    def stop(self, timeout: float = 30) -> None:
        """Ctrl-C to the group (a paused group is resumed first); SIGKILL to what is left after
        ``timeout`` seconds, or at once to stragglers when the leader exited; then reap the leader."""
        if not self._ours():
            return
        assert self.process is not None
        self.signal_group(signal.SIGCONT)
        self.signal_group(signal.SIGINT)
        deadline = time.monotonic() + timeout
        while not self._exited() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.signal_group(signal.SIGKILL)  # the leader is at worst a zombie here: the group is still ours
        self.process.wait(timeout=15)
        _wait_group_gone(self.process.pid, 10)

    def finish(self, timeout: float) -> int | None:
        """Wait for a one-shot command (`sendit import`) to end; its exit code, None if it had to be killed."""
        if not self._ours():
            return self.process.returncode if self.process is not None else None
        deadline = time.monotonic() + timeout
        while not self._exited() and time.monotonic() < deadline:
            time.sleep(0.05)
        exited = self._exited()
        self.stop(timeout=0)
        assert self.process is not None
        return self.process.returncode if exited else None

    def log_tail(self, lines: int = 40) -> str:
        text = []
        for log in self.logs[-2:]:
            with contextlib.suppress(OSError):
                text.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(text)


def _wait_group_gone(pgid: int, seconds: float) -> None:
    """Worker processes of a killed group may outlive its leader for a moment (zombies are reaped by init)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _group_has_live_member(pgid):
        time.sleep(0.05)


def _group_has_live_member(pgid: int) -> bool:
    """True while a member of the group is not a zombie (a zombie cannot write anything)."""
    return any(group == pgid for _, group, _, _ in process_table().values())


@contextlib.contextmanager
def running(*processes: Sendit) -> Iterator[None]:
    """Whatever happens in the block, the processes started here are stopped at its end."""
    try:
        yield
    finally:
        for process in processes:
            process.stop()


def wait_until(predicate: Callable[[], bool], seconds: float, every: float = 0.2) -> bool:
    """Poll until ``predicate`` holds; bounded in time (and so in count)."""
    deadline = time.monotonic() + seconds
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


# -- database views used by the tests (each query in its own short read) ------------------------


def image_counts() -> dict[str, int]:
    from django.db import close_old_connections

    from sendit.relay.models import Image

    close_old_connections()
    counts: Counter[str] = Counter(Image.objects.values_list("status", flat=True))
    return dict(counts)


def in_flight() -> int:
    from sendit.relay.models import IN_FLIGHT

    counts = image_counts()
    return sum(counts.get(status, 0) for status in IN_FLIGHT)


def done_not_cleaned() -> int:
    """DONE images whose original is not yet removed: a kill now interrupts a clean-up."""
    from sendit.relay.models import Image, Status

    try:
        return Image.objects.filter(status=Status.DONE, cleaned_at__isnull=True).count()
    except Exception:  # a busy SQLite file while the children write
        return 0


def all_done_and_cleaned(expected: int) -> bool:
    from sendit.relay.models import Image, Status

    try:
        images = Image.objects.all()
        return (
            images.count() == expected
            and images.filter(status=Status.DONE, cleaned_at__isnull=False).count() == expected
        )
    except Exception:  # a busy SQLite file while the children write: ask again
        return False


def unfinished_series() -> str:
    """One line per series with images not DONE: what a person debugging a stuck run looks at first."""
    from sendit.relay.models import Series, Status

    fields = (
        "id",
        "status",
        "stage",
        "attempts",
        "last_error",
        "lease_owner",
        "lease_expires",
        "enqueued_at",
        "next_attempt_at",
    )
    rows = Series.objects.filter(images__status__in=[s for s in Status if s != Status.DONE]).distinct()
    return "\n".join(
        ", ".join(f"{name}={value}" for name, value in zip(fields, row, strict=True))
        for row in rows.values_list(*fields)
    )


def pause_outside_transaction(process: Sendit, queue_url: str, attempts: int = 40) -> bool:
    """SIGSTOP the group at a moment when it holds no database transaction (a paused lock holder would
    stall every other worker, which is not what this test is about); True when paused."""
    for _ in range(attempts):
        process.pause()
        time.sleep(0.05)
        if not _transaction_held(queue_url):
            return True
        process.resume()
        time.sleep(0.03 + 0.01 * _)
    return False


def _transaction_held(queue_url: str) -> bool:
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND state IN ('idle in transaction', 'active')"
                " AND xact_start IS NOT NULL"
            )
            return bool(cursor.fetchone()[0])
    files = [str(connection.settings_dict["NAME"])]
    if queue_url.startswith("sqlite:///"):
        files.append(queue_url[len("sqlite:///") :])
    for name in files:
        probe = sqlite3.connect(name, timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()
    return False


# -- faults ------------------------------------------------------------------------------------


def cut_postgres_connections() -> int:
    """pg_terminate_backend for every other session on this test database (not this test's own)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return int(cursor.fetchone()[0])


def cut_redis_connections(url: str) -> int:
    """CLIENT KILL of every normal client on this Redis database number (other databases' clients are
    other test runs' and are left alone); returns how many were cut."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        me = client.client_id()
        db = client.connection_pool.connection_kwargs.get("db", 0)
        cut = 0
        for entry in client.client_list(_type="normal"):
            if int(entry["id"]) != me and int(entry.get("db", -1)) == int(db):
                with contextlib.suppress(redis.ResponseError):
                    cut += int(client.client_kill_filter(_id=entry["id"]))
        return cut
    finally:
        client.close()


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (root only); unmounted, by its path, at the end."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, timeout=30)


def fill(folder: Path, name: str = "filler.bin") -> Path:
    """Write until the file system is full; returns the filler file (delete it to free the space)."""
    filler = folder / name
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (65536, 4096, 512, 1):  # unbuffered: the last partial room is taken too
            with contextlib.suppress(OSError):
                while os.write(descriptor, b"\0" * size) == size:
                    pass
    finally:
        os.close(descriptor)
    return filler


# -- independent accounting ----------------------------------------------------------------------


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def input_uids(paths: Iterable[Path]) -> dict[str, Path]:
    """SOPInstanceUID → file, for what the test put into the input folder (read before Sendit starts)."""
    found: dict[str, Path] = {}
    for path in paths:
        uid = sop_uid(path)
        assert uid not in found, "the generator made a UID twice"
        found[uid] = path
    return found


@dataclass
class Accounting:
    """What reached the destination folder, counted from the files themselves; ``problems`` lists every
    way the run broke a promise (empty when all is well)."""

    inputs: int
    outputs: int = 0
    distinct_outputs: int = 0
    partial_files: int = 0
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        shown = {"inputs": self.inputs, "outputs": self.outputs, "distinct": self.distinct_outputs, **self.figures}
        return " ".join(f"{key}={value}" for key, value in shown.items())


def account(inputs: dict[str, Path], input_folder: Path, output_folder: Path) -> Accounting:
    """Every input exactly once at the destination, nothing stuck or doubled, no false rows."""
    from django.db import close_old_connections

    from sendit.relay.models import Event, Image, ReceivedFile, Status

    close_old_connections()
    result = Accounting(inputs=len(inputs))
    outputs = [p for p in output_folder.rglob("*") if p.is_file()]
    finished = [p for p in outputs if p.suffix == ".dcm"]
    result.partial_files = len(outputs) - len(finished)
    result.outputs = len(finished)
    out_uids = Counter(sop_uid(path) for path in finished)
    result.distinct_outputs = len(out_uids)
    twice = [uid for uid, n in out_uids.items() if n > 1]
    problems = result.problems
    if result.outputs != len(inputs):
        problems.append(f"{result.outputs} output files for {len(inputs)} inputs")
    if twice:
        problems.append(f"{len(twice)} SOPInstanceUIDs delivered as more than one file")
    if result.partial_files:
        problems.append(f"{result.partial_files} unfinished files (.part) left at the destination")
    rows = list(Image.objects.values_list("sop_instance_uid", "deid_sop_instance_uid", "status", "cleaned_at"))
    recorded = {row[0] for row in rows}
    if recorded != set(inputs):
        problems.append(
            f"images recorded: {len(recorded - set(inputs))} not among the inputs,"
            f" {len(set(inputs) - recorded)} inputs without an image"
        )
    deid = Counter(row[1] for row in rows)
    if set(out_uids) != set(deid):
        problems.append(
            f"destination vs database: {len(set(out_uids) - set(deid))} output UIDs not recorded,"
            f" {len(set(deid) - set(out_uids))} recorded UIDs not delivered"
        )
    if any(n > 1 for n in deid.values()):
        problems.append("two images share one de-identified SOPInstanceUID")
    statuses = Counter(row[2] for row in rows)
    if set(statuses) - {Status.DONE}:
        problems.append(f"images not DONE: {dict(statuses)}")
    not_cleaned = sum(1 for row in rows if row[3] is None)
    if not_cleaned:
        problems.append(f"{not_cleaned} images never cleaned up")
    left = [p for p in input_folder.rglob("*") if p.is_file() or p.is_symlink()]
    if left:
        problems.append(f"{len(left)} originals left in the input folder")
    received = Counter(ReceivedFile.objects.values_list("status", flat=True))
    if received:
        problems.append(f"false rejected-file rows: {dict(received)}")
    out_of_done = Event.objects.filter(image__isnull=False, from_status=Status.DONE)
    if out_of_done.exists():
        moves = Counter(out_of_done.values_list("to_status", flat=True))
        problems.append(f"images moved out of DONE: {dict(moves)}")
    done_events = Counter(
        Event.objects.filter(image__isnull=False, to_status=Status.DONE).values_list("image_id", flat=True)
    )
    result.figures["done_twice"] = sum(1 for n in done_events.values() if n > 1)
    deid_events = Counter(
        Event.objects.filter(image__isnull=False, to_status=Status.DONEPROCESSING).values_list("image_id", flat=True)
    )
    result.figures["deid_redone"] = sum(1 for n in deid_events.values() if n > 1)
    if result.figures["done_twice"]:
        problems.append(f"{result.figures['done_twice']} images reached DONE more than once (processed twice)")
    quarantined = statuses.get(Status.QUARANTINED, 0)
    result.figures["quarantined"] = quarantined
    return result


def write_series(folder: Path, count: int, seed: int = 5, size: int = 32) -> list[Path]:
    """One series of ``count`` tiny CT images, written as a producer does (a `.tmp` folder, renamed)."""
    import random

    import numpy as np

    from sendit import demo

    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    patient = demo.make_patient(rng, seed)
    study = demo.Study.fresh(rng, study_id="7", date="20220202", time="093000", referring="Roe^Richard^^Dr")
    series_uid = demo.generate_uid(prefix=demo.UID_ROOT)
    partial = folder.with_name(folder.name + ".tmp1")
    partial.mkdir(parents=True)
    for instance in range(1, count + 1):
        ds = demo.make_image(patient, study, series_uid, 1, "CT", instance, size, pixels)
        ds.save_as(partial / f"IM{instance:05d}.dcm", enforce_file_format=True)
    os.rename(partial, folder)
    return sorted(folder.iterdir())


def drive(series_ids: Iterable[int], rounds: int = 30) -> set[int]:
    """Run the pipeline in this process until every series finished, at most ``rounds`` passes (a
    retry that never ends cannot hang the test); returns the series still unfinished."""
    from sendit.relay.pipeline import process_series

    todo = set(series_ids)
    for _ in range(rounds):
        if not todo:
            break
        for series_id in sorted(todo):
            if process_series(series_id).finished:
                todo.discard(series_id)
        if todo:
            time.sleep(0.1)
    return todo


def last_event() -> int:
    """The newest status change's id: it grows while any worker makes progress."""
    from sendit.relay.models import Event

    try:
        return Event.objects.order_by("-id").values_list("id", flat=True).first() or 0
    except Exception:  # a busy SQLite file while the children write: no news
        return 0


def progress(seconds: float) -> bool:
    """Wait until some worker writes a new status change (at most ``seconds``)."""
    before = last_event()
    return wait_until(lambda: last_event() > before, seconds, every=0.05)


def quiet(seconds: float, limit: float) -> bool:
    """Wait until no status change was written for ``seconds`` (at most ``limit`` seconds)."""
    last = last_event
    deadline = time.monotonic() + limit
    seen, since = last(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = last()
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return True
    return False
