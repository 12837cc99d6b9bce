"""The chaos suite: Sendit as a hostile producer and an unlucky operator would meet it.

kill -9 storms, a fuzzed input folder, cut database and queue connections, full disks and a paused
worker. Each test checks what a user would: every file put in ends visible (DONE, or refused with a
reason), every input reaches the destination exactly once — counted from the destination's files,
not from Sendit's own status — nothing goes back out of DONE, and nothing waits for a lease to expire.

The process tests start real `sendit` commands on this run's test database (SQLite, or PostgreSQL in
the second pass) with a queue of their own; see tests/chaos.py. Marked slow: CI runs them.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sendit.demo import generate_demo
from sendit.relay.models import Event, Image, ReceivedFile, Series, Status
from tests import chaos, fuzz_corpus
from tests.orthanc import OrthancServer

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

IN_CI = os.environ.get("CI") == "true"
#: the storms and the paused worker run in the first pass (SQLite + SqliteHuey) only: the second pass,
#: PostgreSQL + Redis, kills and pauses whole hosts in tests/test_many_hosts.py and parts in
#: tests/test_parts.py (3 min saved)
FIRST_PASS_ONLY = pytest.mark.skipif(
    os.environ.get("DATABASE_URL", "").startswith("postgres"),
    reason="on PostgreSQL + Redis, kills and pauses are tested host by host in test_many_hosts.py",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _outputs(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.dcm") if p.is_file()]


# -- 1. kill -9 storm ------------------------------------------------------------------------------


def _kill_storm(
    sendit_dirs: dict[str, Path], tmp_path: Path, kills: int, **settings: object
) -> tuple[dict[str, Path], chaos.Accounting, bool, str]:
    """`sendit run` (watcher with 1 s rescans + 2 workers) killed -9 ``kills`` times while studies keep
    arriving, then left to finish; returns the inputs, the accounting, whether all ended DONE, the log."""
    rng = random.Random(20240917)
    input_folder, output = sendit_dirs["INPUT_FOLDER"], sendit_dirs["OUTPUT_FOLDER"]
    queue = chaos.queue_for_children(tmp_path)
    env = chaos.child_env(
        tmp_path, sendit_dirs, queue, WORKERS=2, RESCAN_SECONDS=1, LEASE_SECONDS=20, BATCH_SIZE=8, **settings
    )
    inputs = chaos.input_uids(
        generate_demo(input_folder / "batch-0", patients=3, images_per_series=16, size=64, seed=1)
    )
    service = chaos.Sendit(tmp_path, ("run", "--port", str(_free_port())), env, "run")
    in_flight, in_clean_up = 0, 0
    started = time.monotonic()
    with chaos.running(service):
        service.start()
        for number in range(1, kills + 1):
            # a random moment after the restarted service made progress again; every other kill
            # aims at a clean-up in progress (DONE images whose originals are not yet removed)
            chaos.progress(20)
            if number % 2:
                time.sleep(rng.uniform(0.05, 1.5))
            else:
                in_clean_up += chaos.wait_until(lambda: chaos.done_not_cleaned() > 0, 5, every=0.02)
            service.kill()
            in_flight += chaos.in_flight() > 0
            # a producer keeps delivering while Sendit is down and up again
            batch = generate_demo(
                input_folder / f"batch-{number}", patients=1, images_per_series=rng.randint(8, 20), size=64, seed=number
            )
            inputs.update(chaos.input_uids(batch))
            service.start()
        # a task lost with a killed worker is found by the periodic requeue "within a minute" of going
        # missing (ORPHAN_AFTER_SECONDS, then the next minute's tick): up to ~90 s after the last restart
        finished = chaos.wait_until(lambda: chaos.all_done_and_cleaned(len(inputs)), 100, every=0.5)
        time.sleep(2.5)  # two more rescans: nothing may come back
        log = service.log_tail()
    result = chaos.account(inputs, input_folder, output)
    result.figures.update(
        kills=kills, in_flight=in_flight, in_clean_up=in_clean_up, seconds=round(time.monotonic() - started, 1)
    )
    assert in_flight > 0, "no kill landed while work was in flight: the storm tested nothing"
    return inputs, result, finished, log


@FIRST_PASS_ONLY
def test_kill_storm_delivers_every_input_exactly_once(sendit_dirs: dict[str, Path], tmp_path: Path) -> None:
    """After 8 kills every input is at the destination exactly once, nothing is stuck, no false
    rejected rows, nothing moved out of DONE, every original cleaned up."""
    _, result, finished, log = _kill_storm(sendit_dirs, tmp_path, kills=8)
    print(f"kill storm ({'PostgreSQL' if chaos.on_postgres() else 'SQLite'}): {result.line()}")
    assert finished and not result.problems, "\n".join([*result.problems, log])


@FIRST_PASS_ONLY
def test_kill_storm_with_series_split_into_parts_delivers_every_input_exactly_once(
    sendit_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The same storm with PART_SIZE = 6: series of 8-20 images are split into parts that both
    workers take; kills land in parts and joins alike, and every input still arrives exactly once."""
    _, result, finished, log = _kill_storm(sendit_dirs, tmp_path, kills=6, PART_SIZE=6)
    parts = Event.objects.filter(reason__startswith="part #").values_list("reason", flat=True)
    result.figures.update(
        splits=Event.objects.filter(reason__startswith="split into").count(),
        parts=len(parts),
        part_workers=len({reason.rsplit(" ", 1)[-1] for reason in parts}),
    )
    assert result.figures["splits"], "no series was split: the storm tested nothing new"
    print(f"kill storm, split series ({'PostgreSQL' if chaos.on_postgres() else 'SQLite'}): {result.line()}")
    assert finished and not result.problems, "\n".join([*result.problems, log])


@FIRST_PASS_ONLY
@pytest.mark.orthanc
def test_kill_storm_into_orthanc_stores_every_input_exactly_once(
    sendit_dirs: dict[str, Path], tmp_path: Path, orthanc_factory: Callable[..., OrthancServer]
) -> None:
    """The same storm delivering over DICOM to a real Orthanc of its own (and the folder): Orthanc
    holds, per series, exactly the de-identified instances of the inputs (counted by its REST API)."""
    server = orthanc_factory()
    inputs, result, finished, log = _kill_storm(
        sendit_dirs,
        tmp_path,
        kills=5,
        SEND_TO_ORTHANC=True,
        ORTHANC_IPADDRESS=server.host,
        ORTHANC_PORT=server.dicom_port,
        ORTHANC_AET=server.aet,
        SENDIT_AET="SENDIT",
        ORTHANC_TIMEOUT=15,
    )
    wanted: dict[str, set[str]] = {}
    for series_uid, uid in Image.objects.values_list("series__deid_series_uid", "deid_sop_instance_uid"):
        wanted.setdefault(series_uid, set()).add(uid)
    held = {series_uid: set(server.instances_in_series(series_uid)) for series_uid in wanted}
    wrong = [series_uid for series_uid in wanted if held[series_uid] != wanted[series_uid]]
    stored = server.count_instances()
    result.figures["orthanc_instances"] = stored
    print(f"kill storm into Orthanc ({'PostgreSQL' if chaos.on_postgres() else 'SQLite'}): {result.line()}")
    assert stored == len(inputs), f"Orthanc holds {stored} instances for {len(inputs)} inputs"
    assert not wrong, f"{len(wrong)} series differ at Orthanc from what was recorded"
    assert finished and not result.problems, "\n".join([*result.problems, log])


# -- 2. a fuzzed input folder ----------------------------------------------------------------------

REFUSED = (Status.SKIPPED, Status.QUARANTINED)


def _records(path: str) -> list[tuple[str, str, str]]:
    """(kind, status, reason) of every row naming this path inside the input folder."""
    rows = [("file", s, r) for s, r in ReceivedFile.objects.filter(path=path).values_list("status", "reason")]
    rows += [("image", s, r) for s, r in Image.objects.filter(path=path).values_list("status", "reason")]
    return rows


def _atime_is_kept_here(folder: Path) -> bool:
    """relatime moves the access time of a file read after its access time was set in the past."""
    probe = folder / "atime-probe"
    probe.write_bytes(b"probe")
    os.utime(probe, (fuzz_corpus.OLD_ATIME, probe.stat().st_mtime))
    probe.read_bytes()
    return fuzz_corpus.accessed_since_written(probe)


def test_fuzzed_folder_every_entry_ends_visible_and_valid_files_done(
    sendit_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Truncations, garbage, huge lengths, deep sequences, an unknown VR, odd character sets, hostile
    names, symlinks (loop, /etc/passwd, outside files and folders) and a path over PATH_MAX beside
    valid files; three scans (as rescans do), each followed by the pipeline."""
    from sendit.relay.inline import run_inline
    from sendit.relay.models import IN_FLIGHT, ScanState
    from sendit.relay.watcher import Watcher

    root = sendit_dirs["INPUT_FOLDER"]
    corpus = fuzz_corpus.build(root, tmp_path / "outside", seed=1729)
    atime_works = _atime_is_kept_here(tmp_path / "outside")
    problems: list[str] = []
    watcher = Watcher(root, rescan_seconds=60, on_ingest=lambda report: None)
    for scan in range(1, 4):
        try:
            watcher.scan()
        except Exception as exc:  # the defect being looked for: one entry stops the whole scan
            problems.append(f"scan {scan} raised {type(exc).__name__}")
        pending = set(Series.objects.filter(images__status__in=IN_FLIGHT).values_list("id", flat=True))
        try:
            run_inline(pending, workers=1)
        except Exception as exc:
            problems.append(f"the pipeline after scan {scan} raised {type(exc).__name__}")

    images = {
        uid: (status, reason)
        for uid, status, reason in Image.objects.values_list("sop_instance_uid", "status", "reason")
    }
    left = fuzz_corpus.files_left(root)
    for uid, description in corpus.valid.items():
        status, _ = images.get(uid, ("no image row", ""))
        if status != Status.DONE:
            problems.append(f"valid: {description}: {status}")
        elif corpus.raw_paths[uid] in left:
            problems.append(f"valid: {description}: DONE but its original was not cleaned up")
    for uid, description in corpus.long.items():
        status, _ = images.get(uid, ("", ""))
        # refused as the file, or set aside with a folder of its path (rows name it from the top)
        top = corpus.raw_paths[uid].split(b"/", 1)[0][:40].decode()
        refused = ReceivedFile.objects.filter(path__startswith=top).exclude(reason="").count()
        ignored = sum(int(n) for s in ScanState.objects.all() for key, n in s.ignored.items() if "long" in key)
        if status != Status.DONE and not refused and not (status in REFUSED and images[uid][1]) and not ignored:
            problems.append(f"long path: {description}: {status or 'no row, not counted as ignored'}")
        elif refused > 1:
            problems.append(f"long path: {description}: refused {refused} times")
    for name, description in corpus.rejected.items():
        rows = _records(name)
        if len(rows) != 1 or rows[0][1] not in REFUSED or not rows[0][2]:
            problems.append(f"damaged: {description} ({name}): {rows or 'no row'}")
    by_uid = {path: uid for uid, path in corpus.odd_uids.items()}
    for name, description in corpus.odd.items():
        rows = _records(name)
        uid_status = images.get(by_uid[name])
        finished = len(rows) == 1 and (rows[0][1] == Status.DONE or (rows[0][1] in REFUSED and rows[0][2]))
        if not finished:
            problems.append(f"odd: {description} ({name}): {rows or 'no row'} (by UID: {uid_status})")
    for name, description in corpus.symlinks.items():
        rows = _records(name)
        if len(rows) != 1 or rows[0][0] != "file" or rows[0][1] not in REFUSED or not rows[0][2]:
            problems.append(f"symlink: {description} ({name}): {rows or 'no row'}")
    followed = Image.objects.filter(sop_instance_uid__in=corpus.outside_uids).count()
    if followed:
        problems.append(f"{followed} DICOM files outside the folder were ingested through a symlink")
    absolute = (
        ReceivedFile.objects.filter(path__startswith="/").count() + Image.objects.filter(path__startswith="/").count()
    )
    if absolute:
        problems.append(f"{absolute} rows name a file outside the input folder (a symlink was followed)")
    if atime_works:
        read = [path.name for path in corpus.never_read if fuzz_corpus.accessed_since_written(path)]
        if read:
            problems.append(f"files behind symlinks were read: {read}")
    outputs = _outputs(sendit_dirs["OUTPUT_FOLDER"])
    done = Image.objects.filter(status=Status.DONE).count()
    if len(outputs) != done:
        problems.append(f"{len(outputs)} output files for {done} DONE images")
    blob = b"".join(path.read_bytes() for path in outputs)
    for value in corpus.odd_values:
        if value in blob:
            problems.append("an odd entry's original name bytes reached the destination")
    print(
        f"fuzz corpus: {len(corpus.valid)} valid, {len(corpus.long)} long, {len(corpus.rejected)} damaged, "
        f"{len(corpus.odd)} odd, {len(corpus.symlinks)} symlinks; {len(outputs)} delivered; atime check {atime_works}"
    )
    assert not problems, "\n".join(problems)


# -- 3. cut database and queue connections --------------------------------------------------------

# Far below LEASE_SECONDS=600: recovery must not wait for a lease to run out. A failed step is retried
# in seconds; a task lost with a cut connection is found by the requeue, which runs at each minute's
# tick and takes series silent for ORPHAN_AFTER_SECONDS (30): up to ~90 s in the worst case.
RECOVERY_SECONDS = 95


def test_cut_connections_are_recovered_in_seconds_not_after_the_lease(
    sendit_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """pg_terminate_backend (and CLIENT KILL on the Redis queue) while `sendit worker` processes:
    with LEASE_SECONDS=600, every image still ends DONE within about a minute of the last cut."""
    if not chaos.on_postgres():
        pytest.skip("connection cuts run in the PostgreSQL + Redis pass")
    input_folder, output = sendit_dirs["INPUT_FOLDER"], sendit_dirs["OUTPUT_FOLDER"]
    queue = chaos.queue_for_children(tmp_path)
    env = chaos.child_env(tmp_path, sendit_dirs, queue, WORKERS=2, LEASE_SECONDS=600, BATCH_SIZE=10)
    inputs = chaos.input_uids(generate_demo(input_folder, patients=3, images_per_series=20, size=64, seed=3))
    importer = chaos.Sendit(tmp_path, ("import", str(input_folder)), env, "import")
    worker = chaos.Sendit(tmp_path, ("worker",), env, "worker")
    cuts: list[tuple[int, int]] = []
    with chaos.running(importer, worker):
        assert importer.start().finish(timeout=60) == 0, importer.log_tail()
        worker.start()
        started = chaos.wait_until(lambda: chaos.image_counts().get(Status.NEW, 0) < len(inputs), 30, every=0.05)
        assert started, "the worker never started: " + worker.log_tail()
        for _ in range(3):
            if not chaos.in_flight():
                break
            database = chaos.cut_postgres_connections()
            redis = chaos.cut_redis_connections(queue) if queue.startswith("redis://") else 0
            cuts.append((database, redis))
            time.sleep(0.7)
        last_cut = time.monotonic()
        finished = chaos.wait_until(lambda: chaos.all_done_and_cleaned(len(inputs)), RECOVERY_SECONDS, every=0.5)
        recovered_in = round(time.monotonic() - last_cut)
        counts = chaos.image_counts()
        stuck = chaos.unfinished_series()
        log = worker.log_tail()
    result = chaos.account(inputs, input_folder, output)
    result.figures["cuts (database, redis)"] = cuts
    result.figures["all_done_after_s"] = recovered_in
    print(f"connection cuts: {result.line()}")
    assert cuts and cuts[0][0] > 0, "no connection was cut while work was in flight: the test tested nothing"
    assert finished, f"not all DONE {RECOVERY_SECONDS} s after the cuts: {counts}\n{stuck}\n{log}"
    assert not result.problems, "\n".join(result.problems)


# -- 4. full disks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("full", ["WORK_FOLDER", "OUTPUT_FOLDER"])
def test_a_full_disk_is_retried_and_named_never_quarantined(
    sendit_dirs: dict[str, Path], reconfigure: Callable[..., None], tmp_path: Path, full: str
) -> None:
    """A full work or output folder (a 1 MB tmpfs mounted by the test): images wait in ERROR or in
    flight with "no space left on ..." as the reason, never QUARANTINED; after the space is freed,
    `retry` takes them all to DONE."""
    from sendit.relay.housekeeping import retry_errors
    from sendit.relay.ingest import ingest_folder
    from sendit.relay.models import IN_FLIGHT

    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the full-disk test mounts a tmpfs and needs root; CI runs as root")
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "full"
    with chaos.tmpfs(mount, "1m"):
        reconfigure(**{full: mount}, MAX_ATTEMPTS=3, RETRY_BASE_SECONDS=0)
        inputs = chaos.input_uids(generate_demo(sendit_dirs["INPUT_FOLDER"], patients=1, images_per_series=3, size=32))
        filler = chaos.fill(mount)
        series_ids = ingest_folder(sendit_dirs["INPUT_FOLDER"]).series_ids
        unfinished = chaos.drive(series_ids, rounds=10)
        counts = chaos.image_counts()
        reasons = [
            *Image.objects.exclude(reason="").values_list("reason", flat=True),
            *Series.objects.exclude(last_error="").values_list("last_error", flat=True),
        ]
        assert not counts.get(Status.QUARANTINED), f"a full disk quarantined images: {counts} {set(reasons)}"
        assert set(counts) <= {Status.ERROR, *IN_FLIGHT}, counts
        assert reasons and all("no space left" in reason.lower() for reason in reasons), set(reasons)
        delivered_to = mount if full == "OUTPUT_FOLDER" else sendit_dirs["OUTPUT_FOLDER"]
        assert not _outputs(delivered_to)

        filler.unlink()
        again = set(retry_errors()) | unfinished
        again |= set(Series.objects.filter(images__status__in=IN_FLIGHT).values_list("id", flat=True))
        assert not chaos.drive(again, rounds=10)
        assert chaos.image_counts() == {Status.DONE: len(inputs)}
        assert len(_outputs(delivered_to)) == len(inputs)


# -- 5. a paused worker ---------------------------------------------------------------------------------

LEASE = 10  # the smallest LEASE_SECONDS the configuration accepts


@FIRST_PASS_ONLY
def test_a_paused_worker_changes_nothing_when_it_wakes(sendit_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Worker A is stopped (SIGSTOP) mid-series for 2.5 leases; worker B takes the series over and
    finishes it; A resumes: nothing leaves DONE, nothing is quarantined, each input delivered once."""
    input_folder, output = sendit_dirs["INPUT_FOLDER"], sendit_dirs["OUTPUT_FOLDER"]
    queue = chaos.queue_for_children(tmp_path)
    env = chaos.child_env(tmp_path, sendit_dirs, queue, WORKERS=1, LEASE_SECONDS=LEASE, BATCH_SIZE=10)
    inputs = chaos.input_uids(chaos.write_series(input_folder / "series", 150, seed=11))
    importer = chaos.Sendit(tmp_path, ("import", str(input_folder)), env, "import")
    first = chaos.Sendit(tmp_path, ("worker",), env, "worker-a")
    second = chaos.Sendit(tmp_path, ("worker",), env, "worker-b")
    with chaos.running(importer, first, second):
        assert importer.start().finish(timeout=60) == 0, importer.log_tail()
        first.start()
        # paused mid-series: a few batches de-identified, the rest waiting
        past = (Status.DONEPROCESSING, Status.SENT, Status.DONE)
        busy = chaos.wait_until(lambda: sum(chaos.image_counts().get(s, 0) for s in past) >= 20, 30, every=0.02)
        assert busy, "worker A never started: " + first.log_tail()
        assert chaos.pause_outside_transaction(first, queue), "worker A could not be paused outside a transaction"
        paused_with = chaos.image_counts()
        assert paused_with.get(Status.DONE, 0) < len(inputs), "worker A finished before it was paused"
        time.sleep(2.5 * LEASE)  # its lease runs out while it sleeps
        second.start()
        finished = chaos.wait_until(lambda: chaos.all_done_and_cleaned(len(inputs)), 60, every=0.5)
        counts_before_wake = chaos.image_counts()
        first.resume()
        time.sleep(3)
        chaos.quiet(3, 15)
        logs = first.log_tail() + "\n" + second.log_tail()
    result = chaos.account(inputs, input_folder, output)
    result.figures["in_flight_when_paused"] = paused_with
    print(f"paused worker: {result.line()}")
    assert finished, f"worker B did not finish the series: {counts_before_wake}\n{logs}"
    assert not result.problems, "\n".join([*result.problems, logs])
