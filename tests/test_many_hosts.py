"""Many hosts (issue 13, item 6): Sendit worker hosts sharing one PostgreSQL, one Redis and one S3
bucket — no shared folder — each in its own UTS and PID namespaces on this machine, with faults a
fleet meets.

A "host" is ``unshare --uts --pid --fork --mount-proc`` running ``hostname <name>`` and then
``sendit worker`` as its namespace's first process, in a scratch folder of its own (its working
directory, TMPDIR and log). The hosts share what :func:`hosts_environment` gives them: a fresh
PostgreSQL database per test (made and dropped here), this run's Redis database, one ``SECRET_KEY``,
a bucket on an S3 server on loopback (moto: a stand-in for a real object store, tests/s3.py) that
holds the originals, and a real Orthanc of the test's own (Debian's server on loopback ports,
tests/orthanc.py) as the destination; each host keeps its working copies in a DATA_DIR of its own.
Series are put in with ``sendit import`` as an operator would, from a producer's folder no host sees.

After each scenario the same promises are checked, from the database and from Orthanc itself: every
image DONE exactly once, one Delivery row per image, Orthanc holds exactly the image count, no event
moves an image out of DONE, and no original is left in the input folder or in the bucket.

Runs in the PostgreSQL + Redis pass (``-m db`` with DATABASE_URL and SENDIT_QUEUE_URL set); skipped
on SQLite. Under CI=true a service that is not reachable, or ``unshare`` that cannot make namespaces
(not root), fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests import chaos
from tests.orthanc import OrthancServer
from tests.s3 import Bucket

pytestmark = [pytest.mark.slow, pytest.mark.db]

IMAGES_PER_SERIES = 20
SERIES = 3
#: settings every host shares in these tests: a short lease and heartbeat, so that takeovers happen
#: in seconds; small batches, so that a series is several steps (a fault lands mid-series)
SHARED_SETTINGS: dict[str, object] = {
    "WORKERS": 2,
    "LEASE_SECONDS": 10,
    "HEARTBEAT_SECONDS": 3,
    "BATCH_SIZE": 4,
    "RETRY_BASE_SECONDS": 1,
    "RETRY_CAP_SECONDS": 3,
    "STABLE_SECONDS": 0,
    "ORTHANC_TIMEOUT": 15,
    "LOG_LEVEL": "INFO",
}
FINISH_SECONDS = 120  # bound on waiting for a scenario's load to end DONE


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


def _database_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        pytest.skip("runs in the PostgreSQL + Redis pass (DATABASE_URL=postgres://…)")
    return url


def _maintenance(url: str) -> str:
    """The same server's ``postgres`` database: the pass's own database need not exist (Django's test
    runner makes ``test_<name>`` beside it), and new databases are made from there."""
    return urlunsplit(urlsplit(url)._replace(path="/postgres"))


def _queue_url() -> str:
    url = os.environ.get("SENDIT_QUEUE_URL", "")
    if not url.startswith("redis://"):
        _unavailable("SENDIT_QUEUE_URL=redis://… is not set for the PostgreSQL pass")
    return url


@pytest.fixture(scope="module")
def services() -> dict[str, str]:
    """The PostgreSQL server and Redis database of this pass, checked reachable; namespaces usable."""
    import psycopg
    import redis

    database, queue = _database_url(), _queue_url()
    try:
        psycopg.connect(_maintenance(database), connect_timeout=3, autocommit=True).close()
    except psycopg.Error as exc:
        _unavailable(f"PostgreSQL is not reachable ({type(exc).__name__})")
    client = redis.Redis.from_url(queue, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis is not reachable ({type(exc).__name__})")
    finally:
        client.close()
    probe = subprocess.run(
        ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "hostname", "probe"],
        capture_output=True,
        timeout=10,
    )
    if probe.returncode != 0:
        _unavailable("unshare cannot make UTS and PID namespaces here (needs root)")
    return {"database": database, "queue": queue}


# -- a fresh database per scenario -------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(server_url: str, tag: str) -> Iterator[str]:
    """An empty database on the pass's PostgreSQL server, named after its database; dropped at the end."""
    import psycopg

    parts = urlsplit(server_url)
    name = f"{parts.path.lstrip('/') or 'sendit'}_hosts_{tag}"
    with psycopg.connect(_maintenance(server_url), connect_timeout=5, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(_maintenance(server_url), connect_timeout=5, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query(database: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """One read on the scenario's database, in its own short connection (the hosts write meanwhile)."""
    import psycopg

    with psycopg.connect(database, connect_timeout=5, autocommit=True) as connection:
        try:
            return list(connection.execute(sql, params).fetchall())
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):  # before the hosts migrated
            return []


# -- the hosts -----------------------------------------------------------------------------------


def hosts_environment(
    data_dir: Path, database: str, queue: str, orthanc: OrthancServer, bucket: Bucket, **settings: object
) -> dict[str, str]:
    """What every host shares, as SENDIT_* variables — the one place to change what "shared" means.

    No shared folder: each host has a DATA_DIR of its own (``data_dir``: its scratch, for working
    copies), and the originals are in the S3 bucket (the moto stand-in) that `sendit import` uploads
    them to; the database, the queue, the key and the Orthanc are shared.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDIT_", "DJANGO_")) and k != "DATABASE_URL"}
    values: dict[str, object] = {
        "SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": database,
        "QUEUE_URL": queue,
        "DATA_DIR": data_dir,
        **bucket.settings,
        "OUTPUT_FOLDER": "off",
        "SEND_TO_ORTHANC": True,
        "ORTHANC_IPADDRESS": orthanc.host,
        "ORTHANC_PORT": orthanc.dicom_port,
        "ORTHANC_AET": orthanc.aet,
        "SENDIT_AET": "SENDIT",
        **SHARED_SETTINGS,
        **settings,
    }
    for key, value in values.items():
        env[f"SENDIT_{key}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


SECRET_KEY = "many-hosts-test-key-" + "0123456789abcdef" * 2


@dataclass
class Host(chaos.Sendit):
    """`sendit worker` in UTS and PID namespaces of its own, named ``name``; ``clock`` wraps it in
    faketime. The started process (unshare) leads the process group: pause and resume signal it all."""

    name: str = "host"
    clock: tuple[str, ...] = ()

    def start(self) -> Host:
        assert not self._ours(), "already running"
        self.starts += 1
        scratch = self.tmp_path
        scratch.mkdir(parents=True, exist_ok=True)
        log = scratch / f"{self.label}-{self.starts}.log"
        self.logs.append(log)
        command = [
            "unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child",
            "/bin/sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", self.name,
            *self.clock, sys.executable, "-m", "sendit", *self.args,
        ]  # fmt: skip
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(
                command,
                cwd=scratch,
                env={**self.env, "TMPDIR": str(scratch)},
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def first_process(self) -> int | None:
        """The PID (as seen here) of its namespace's first process: the child unshare forked."""
        if not self._ours():
            return None
        assert self.process is not None
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def kill_namespace(self) -> None:
        """SIGKILL to the namespace's first process: the kernel kills every process in the namespace."""
        first = self.first_process()
        assert first is not None, "the host is not running"
        os.kill(first, signal.SIGKILL)
        self.resume()  # unshare itself, if the host was paused, must run to see its child die and exit
        assert self.process is not None
        self.process.wait(timeout=15)
        chaos._wait_group_gone(self.process.pid, 10)

    def log_text(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs if log.exists())


@dataclass
class Fleet:
    """The hosts of one scenario and what they share."""

    tmp_path: Path
    database: str
    queue: str
    orthanc: OrthancServer
    shared: Path  # the producer's side: where series arrive and `sendit import` runs (not seen by the hosts)
    bucket: Bucket
    hosts: list[Host] = field(default_factory=list)

    def env(self, data_dir: Path | None = None, **settings: object) -> dict[str, str]:
        data = data_dir or self.shared
        return hosts_environment(data, self.database, self.queue, self.orthanc, self.bucket, **settings)

    def host(self, name: str, label: str | None = None, clock: tuple[str, ...] = (), **settings: object) -> Host:
        label = label or name
        host = Host(
            tmp_path=self.tmp_path / "hosts" / label,
            args=("worker",),
            env=self.env(self.tmp_path / "hosts" / label / "data", **settings),
            label=label,
            name=name,
            clock=clock,
        )
        self.hosts.append(host)
        return host

    def load(self, series: int = SERIES, images: int = IMAGES_PER_SERIES) -> int:
        """Series written into the shared input folder as a producer does, then `sendit import`."""
        for number in range(series):
            chaos.write_series(self.shared / "input" / f"series{number}", images, seed=101 + number)
        sendit("import", str(self.shared / "input"), env=self.env(), cwd=self.tmp_path)
        return series * images

    def stop(self) -> None:
        """Ctrl-C to every host at once (each stops in a few seconds), then wait for each."""
        for host in self.hosts:
            host.signal_group(signal.SIGCONT)
            host.signal_group(signal.SIGINT)
        for host in self.hosts:
            host.stop()

    def logs(self) -> str:
        return "\n".join(host.log_tail(30) for host in self.hosts)


def sendit(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "sendit", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture
def fleet(
    services: dict[str, str],
    tmp_path: Path,
    orthanc_factory: Callable[..., OrthancServer],
    s3_bucket: Bucket,
    request: pytest.FixtureRequest,
) -> Iterator[Fleet]:
    """A fresh database, this pass's Redis queue (emptied), a bucket on the S3 stand-in and an Orthanc
    of its own."""
    chaos.clear_redis_queue(services["queue"])
    orthanc = orthanc_factory()
    shared = tmp_path / "shared"
    shared.mkdir()
    tag = request.node.name.removeprefix("test_")[:30].replace("-", "_")
    with fresh_database(services["database"], tag) as database:
        fleet = Fleet(tmp_path, database, services["queue"], orthanc, shared, s3_bucket)
        try:
            yield fleet
        finally:
            orthanc.terminate()  # it takes seconds to stop: meanwhile the hosts stop
            fleet.stop()
            orthanc.stop()
            chaos.clear_redis_queue(services["queue"])


# -- what every scenario must leave ------------------------------------------------------------------


def finished(fleet: Fleet, expected: int) -> bool:
    rows = query(fleet.database, "SELECT count(*) FROM relay_image WHERE status = 'DONE' AND cleaned_at IS NOT NULL")
    return bool(rows) and rows[0][0] == expected


def wait_finished(fleet: Fleet, expected: int, seconds: float = FINISH_SECONDS) -> None:
    if not chaos.wait_until(lambda: finished(fleet, expected), seconds, every=0.5):
        statuses = query(fleet.database, "SELECT status, count(*) FROM relay_image GROUP BY status")
        pytest.fail(f"not finished within {seconds:.0f} s: {statuses}\n{fleet.logs()}")


def promises_kept(fleet: Fleet, expected: int) -> list[str]:
    """Every promise of a multi-host run this scenario broke (empty when all held)."""
    db = fleet.database
    problems = []
    statuses = dict(query(db, "SELECT status, count(*) FROM relay_image GROUP BY status"))
    if statuses != {"DONE": expected}:
        problems.append(f"images: {statuses}, expected DONE {expected}")
    done_twice = query(
        db,
        "SELECT count(*) FROM (SELECT image_id FROM relay_event WHERE to_status = 'DONE' AND image_id IS NOT NULL"
        " GROUP BY image_id HAVING count(*) > 1) AS twice",
    )[0][0]
    if done_twice:
        problems.append(f"{done_twice} images reached DONE more than once")
    deliveries = query(db, "SELECT count(*), count(DISTINCT (image_id, destination)) FROM relay_delivery")[0]
    if deliveries != (expected, expected):
        problems.append(f"Delivery rows (all, distinct): {deliveries}, expected {expected} of each")
    out_of_done = query(db, "SELECT to_status, count(*) FROM relay_event WHERE from_status = 'DONE' GROUP BY to_status")
    if out_of_done:
        problems.append(f"events out of DONE: {dict(out_of_done)}")
    stored = fleet.orthanc.count_instances()
    if stored != expected:
        problems.append(f"Orthanc holds {stored} instances for {expected} images")
    left = [p for p in (fleet.shared / "input").rglob("*") if p.is_file()]
    if left:
        problems.append(f"{len(left)} originals left in the input folder")
    in_bucket = fleet.bucket.keys("originals/")
    if in_bucket:
        problems.append(f"{len(in_bucket)} originals left in the bucket")
    return problems


def assert_promises_kept(fleet: Fleet, expected: int) -> None:
    problems = promises_kept(fleet, expected)
    assert not problems, "\n".join([*problems, fleet.logs()])


def holds_a_lease_mid_series(fleet: Fleet, host: str) -> bool:
    """Does a process of ``host`` hold a live lease on a series with images still in flight?"""
    rows = query(
        fleet.database,
        "SELECT count(*) FROM relay_series s WHERE s.lease_owner LIKE %s AND s.lease_expires > now()"
        " AND EXISTS (SELECT 1 FROM relay_image i WHERE i.series_id = s.id"
        " AND i.status IN ('NEW', 'PROCESSING', 'DONEPROCESSING', 'SENT'))"
        " AND EXISTS (SELECT 1 FROM relay_image i WHERE i.series_id = s.id AND i.status <> 'NEW')",
        f"{host}:%",
    )
    return bool(rows) and rows[0][0] > 0


def in_transaction(fleet: Fleet) -> bool:
    """Does any session on the scenario's database hold a transaction open (a paused lock holder
    would stall every other host, which is not what these tests are about)?"""
    rows = query(
        fleet.database,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND xact_start IS NOT NULL",
    )
    return bool(rows) and rows[0][0] > 0


def stop_mid_series(fleet: Fleet, host: Host, attempts: int = 200) -> None:
    """SIGSTOP ``host`` at a moment it holds a lease on a series with work left, and no transaction."""
    for _ in range(attempts):
        if holds_a_lease_mid_series(fleet, host.name):
            host.pause()
            time.sleep(0.05)
            if not in_transaction(fleet) and holds_a_lease_mid_series(fleet, host.name):
                return
            host.resume()
        time.sleep(0.05)
    pytest.fail(f"{host.name} never held a lease mid-series outside a transaction\n{host.log_tail()}")


def worker_heartbeats(fleet: Fleet) -> list[tuple[str, str, int]]:
    return [
        (host, namespace, pid)
        for host, namespace, pid in query(
            fleet.database, "SELECT host, pid_namespace, pid FROM relay_workerheartbeat WHERE worker ORDER BY name"
        )
    ]


TAKEN_OVER = "its worker died; taking it over"
LOST_LEASE = "leaving it to that worker"


# -- the scenarios ---------------------------------------------------------------------------------------


def test_three_hosts_share_a_load_of_series(fleet: Fleet) -> None:
    hosts = [fleet.host(name) for name in ("host-a", "host-b", "host-c")]
    for host in hosts:
        host.start()
    expected = fleet.load()
    wait_finished(fleet, expected)
    assert_promises_kept(fleet, expected)
    assert {row[0] for row in worker_heartbeats(fleet)} == {"host-a", "host-b", "host-c"}


def test_a_host_killed_mid_series_is_taken_over_before_its_lease_runs_out(fleet: Fleet) -> None:
    """SIGKILL to its namespace's first process. The lease is long (120 s): the others see its
    heartbeat fall silent and take its series over (item 2), well before the bound on the wait."""
    victim = fleet.host("host-b", LEASE_SECONDS=120)
    victim.start()
    expected = fleet.load()
    stop_mid_series(fleet, victim)
    victim.kill_namespace()
    survivors = [fleet.host(name, LEASE_SECONDS=120) for name in ("host-a", "host-c")]
    for host in survivors:
        host.start()
    wait_finished(fleet, expected, seconds=90)
    assert_promises_kept(fleet, expected)
    assert any(TAKEN_OVER in host.log_text() for host in survivors), fleet.logs()


def test_a_host_paused_past_its_lease_changes_nothing_when_it_resumes(fleet: Fleet) -> None:
    """Defect 1: SIGSTOP mid-series for longer than LEASE_SECONDS; the others finish its series;
    on SIGCONT it finds its lease lost and stops — no DONE image moves."""
    victim = fleet.host("host-b")
    victim.start()
    expected = fleet.load()
    stop_mid_series(fleet, victim)
    others = [fleet.host(name) for name in ("host-a", "host-c")]
    for host in others:
        host.start()
    wait_finished(fleet, expected)  # with the victim still paused: well past its lease
    victim.resume()
    assert chaos.wait_until(lambda: LOST_LEASE in victim.log_text(), 30), victim.log_tail()
    time.sleep(2 * float(SHARED_SETTINGS["HEARTBEAT_SECONDS"]))  # room for any write it would still make
    assert_promises_kept(fleet, expected)


def test_one_host_name_in_two_pid_namespaces(fleet: Fleet) -> None:
    """Defect 2: two containers named alike, their processes with the same PIDs; neither takes the
    other's live lease (each judges the other by its heartbeat, not by a PID of its own namespace)."""
    twins = [fleet.host("twin", label=f"twin-{n}") for n in (1, 2)]
    for host in twins:
        host.start()
    expected = fleet.load()
    wait_finished(fleet, expected)
    assert_promises_kept(fleet, expected)
    beats = worker_heartbeats(fleet)
    assert {host for host, _, _ in beats} == {"twin"}
    assert len({namespace for _, namespace, _ in beats}) == 2  # two namespaces, told apart
    assert not any(TAKEN_OVER in host.log_text() or LOST_LEASE in host.log_text() for host in twins), fleet.logs()


def test_three_hosts_first_start_at_once_on_a_fresh_database(fleet: Fleet) -> None:
    """Defect 3: all three migrate at start; the advisory lock makes them take turns, none crashes."""
    hosts = [fleet.host(name) for name in ("host-a", "host-b", "host-c")]
    for host in hosts:
        host.start()
    workers = int(SHARED_SETTINGS["WORKERS"])
    assert chaos.wait_until(lambda: len(worker_heartbeats(fleet)) == 3 * workers, 60), fleet.logs()
    assert all(host.process is not None and host.process.poll() is None for host in hosts), fleet.logs()
    expected = fleet.load()
    wait_finished(fleet, expected)
    assert_promises_kept(fleet, expected)
    assert not any("IntegrityError" in host.log_text() or "Traceback" in host.log_text() for host in hosts)


def test_a_host_with_another_secret_key_is_refused_in_one_line(fleet: Fleet) -> None:
    first = fleet.host("host-a").start()
    assert chaos.wait_until(lambda: len(worker_heartbeats(fleet)) > 0, 60), first.log_tail()
    stranger = fleet.host("host-b", SECRET_KEY="another-key-" + secrets.token_hex(16))
    stranger.start()
    assert stranger.finish(timeout=60) == 2
    said = [line for line in stranger.log_text().splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("sendit: SECRET_KEY differs"), said
    assert SECRET_KEY not in said[0] and "another-key" not in said[0]
    expected = fleet.load(series=1)
    wait_finished(fleet, expected)
    assert_promises_kept(fleet, expected)


def test_one_host_with_a_skewed_clock(fleet: Fleet) -> None:
    """One host's clock two hours behind (Debian's faketime). Leases and heartbeats are written in
    database time: its lease runs LEASE_SECONDS from the database's now, its heartbeat is fresh, and
    no host judges another's live lease expired or its holder dead."""
    faketime = shutil.which("faketime")
    if faketime is None:
        _unavailable("faketime is not installed (apt-get install faketime)")
    skewed = fleet.host("host-skewed", clock=(str(faketime), "-f", "-2h"))
    skewed.start()
    expected = fleet.load()
    assert chaos.wait_until(lambda: holds_a_lease_mid_series(fleet, "host-skewed"), 60), skewed.log_tail()
    lease_left, heartbeat_age = query(
        fleet.database,
        "SELECT extract(epoch FROM max(s.lease_expires) - now()), extract(epoch FROM now() - max(h.seen))"
        " FROM relay_series s, relay_workerheartbeat h WHERE s.lease_owner LIKE 'host-skewed:%%'"
        " AND h.host = 'host-skewed'",
    )[0]
    assert 0 < lease_left <= int(SHARED_SETTINGS["LEASE_SECONDS"]) + 1
    assert heartbeat_age < 3 * int(SHARED_SETTINGS["HEARTBEAT_SECONDS"])
    others = [fleet.host(name) for name in ("host-a", "host-b")]
    for host in others:
        host.start()
    wait_finished(fleet, expected)
    assert_promises_kept(fleet, expected)
    hosts = [skewed, *others]
    assert not any(TAKEN_OVER in host.log_text() or LOST_LEASE in host.log_text() for host in hosts), fleet.logs()


def test_the_bucket_unreachable_mid_run_then_back(fleet: Fleet) -> None:
    """The S3 store cut off while three hosts work (the stand-in's gate closed), then back: series
    wait and retry, nothing is lost or sent twice, and no original stays behind."""
    hosts = [fleet.host(name) for name in ("host-a", "host-b", "host-c")]
    for host in hosts:
        host.start()
    expected = fleet.load()
    assert fleet.bucket.gate is not None
    assert chaos.wait_until(lambda: any_done(fleet), 60), fleet.logs()
    fleet.bucket.gate.close()
    time.sleep(8)  # long enough for every host to meet the closed store at least once
    fleet.bucket.gate.open()
    wait_finished(fleet, expected, seconds=120)
    assert_promises_kept(fleet, expected)


def any_done(fleet: Fleet) -> bool:
    rows = query(fleet.database, "SELECT count(*) FROM relay_image WHERE status = 'DONE'")
    return bool(rows) and rows[0][0] > 0
