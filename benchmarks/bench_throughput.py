"""Issue 17's target table from one command: throughput into Orthanc, a big series on 1 and 2 workers,
latency under `sendit run`, and a worker's peak memory.

Every figure is measured in this run and printed with its ratio to the floor measured in the same
run (DESIGN.md: compare ratios within one run, never absolutes across runs). Every Orthanc is
started like the tests start it (tests/orthanc.py: TCP_NODELAY=1, MaximumPduLength 131072, loopback).

  T) throughput, CT 512x512 (514 KB), ``--files`` in series of 100, best of ``--rounds`` interleaved:
     c) DCMTK storescu -> Orthanc, one association;  e) `sendit import --wait` -> Orthanc over DICOM,
     verified (target e/c >= 0.7);  d) REST POST /instances, 4 connections;  f) `sendit import
     --wait` over REST (target f/d >= 0.5). Also: e's pipeline only (first PROCESSING to last
     DONE), and the CPU per file of Sendit's and Orthanc's processes together.
  W) one series of ``--big`` images (``--big-size`` pixels square) with `--workers 1` and `2`
     (target 2/1 >= 1.6).
  L) latency: `sendit run` (DICOM to Orthanc, 2 workers, the default SQLite queue) and ``--drops``
     folders of 20 images, each written as NAME.tmpX and renamed ``--drop-gap`` seconds after the
     last one was DONE (idle workers poll the queue less and less often); rename -> series DONE
     (the time of its last DONE event); p50 and p95 (target p95 <= 2 s).
  M) memory: peak RSS of `sendit import --wait --workers 1` (ingest and the worker in one process)
     for a 1-image and a ``--memory-images``-image series (target: flat), and for one multi-frame
     file of ``--big-file-mb`` MB (target <= 2.5 x its size).

    .venv/bin/python benchmarks/bench_throughput.py                 # everything (about 10 minutes)
    .venv/bin/python benchmarks/bench_throughput.py --only T,L      # some parts
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_orthanc import (  # noqa: E402
    fresh_orthanc,
    generate,
    machine,
    percentile,
    sendit_config,
    step_rest,
    step_sendit,
    step_storescu,
)

from sendit.demo import UID_ROOT, Study, make_image, make_patient  # noqa: E402


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDIT_", "DJANGO_")) and k != "DATABASE_URL"}
    env["DJANGO_SETTINGS_MODULE"] = "sendit.server.settings"
    return env


def _children_cpu() -> float:
    """CPU seconds of this process's children reaped so far (the shipper's and Orthanc's)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def throughput(work: Path, files: int, rounds: int) -> list[str]:
    src = work / "t-in"
    paths = generate(src, files, 100)
    c_cpu: list[float] = []

    def floor() -> float:
        before = _children_cpu()
        elapsed = step_storescu(src, work, files)
        c_cpu.append(_children_cpu() - before)
        return elapsed

    steps: dict[str, Callable[[], float]] = {
        "c": floor,
        "e": lambda: step_sendit(src, work, files, None, windows=windows, cpu=cpu),
        "d": lambda: step_rest(paths, work),
        "f": lambda: step_sendit(src, work, files, None, rest=True),
    }
    windows: list[float] = []
    cpu: list[float] = []
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for key, step in steps.items():
            best[key] = min(best[key], step())
    shutil.rmtree(src, ignore_errors=True)
    rate = {key: files / seconds for key, seconds in best.items()}
    pipeline = files / min(windows)
    return [
        f"| c) storescu -> Orthanc (floor) | {rate['c']:.0f} files/s | |",
        f"| e) sendit import --wait, DICOM, verified | {rate['e']:.0f} files/s | **e/c {rate['e'] / rate['c']:.2f}**"
        " (target >= 0.7) |",
        f"| e) pipeline only (first PROCESSING -> last DONE) | {pipeline:.0f} files/s | {pipeline / rate['c']:.2f} |",
        f"| c) CPU per file, storescu + Orthanc | {min(c_cpu) * 1000 / files:.1f} ms | |",
        f"| e) CPU per file, Sendit + Orthanc | {min(cpu) * 1000 / files:.1f} ms | {min(cpu) / min(c_cpu):.1f} x c's |",
        f"| d) REST POST /instances, 4 connections (floor) | {rate['d']:.0f} files/s | |",
        f"| f) sendit import --wait, REST, verified | {rate['f']:.0f} files/s | **f/d {rate['f'] / rate['d']:.2f}**"
        " (target >= 0.5) |",
    ]


def big_series(work: Path, images: int, size: int, rounds: int) -> list[str]:
    src = work / "w-in"
    generate(src, images, images, size=size)
    best = {1: float("inf"), 2: float("inf")}
    for _ in range(rounds):
        for workers in best:
            best[workers] = min(best[workers], step_sendit(src, work, images, workers))
    shutil.rmtree(src, ignore_errors=True)
    one, two = images / best[1], images / best[2]
    return [
        f"| W) one {images}-image series ({size}x{size}), --workers 1 | {one:.0f} files/s | |",
        f"| W) the same, --workers 2 | {two:.0f} files/s | **2/1 {two / one:.2f}** (target >= 1.6) |",
    ]


def _one_series_folder(parent: Path, name: str, images: int, size: int, seed: int) -> str:
    """Write NAME.tmpX/ with one series, rename it to NAME; returns its SeriesInstanceUID."""
    import random

    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    patient = make_patient(rng, seed)
    study = Study.fresh(rng, study_id=str(seed))
    series_uid = generate_uid(prefix=UID_ROOT)
    partial = parent / f"{name}.tmp{seed}"
    partial.mkdir(parents=True)
    for instance in range(1, images + 1):
        ds = make_image(patient, study, series_uid, 1, "CT", instance, size, pixels)
        ds.save_as(partial / f"IM{instance:05d}.dcm", enforce_file_format=True)
    return series_uid


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def latency(work: Path, drops: int, images: int, size: int, gap: float) -> list[str]:
    folder = work / "latency"
    folder.mkdir(parents=True)
    server = fresh_orthanc(work, "latency")
    config = sendit_config(folder, server, rest=False)
    inbox = folder / "input"
    inbox.mkdir()
    with config.open("a") as handle:
        handle.write(f'INPUT_FOLDER = "{inbox}"\nWORKERS = 2\nWEB_PORT = {_free_port()}\n')
    env = _env()
    env["SENDIT_CONFIG"] = str(config)
    log = (folder / "run.log").open("wb")
    run = subprocess.Popen(
        [sys.executable, "-m", "sendit", "run"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    database = folder / "data" / "sendit.sqlite3"
    seconds: list[float] = []
    try:
        time.sleep(8)  # start-up: schema, watcher, consumer and its workers
        for drop in range(drops):
            time.sleep(gap)  # idle between drops, as between real series: the workers' polls back off
            staging = folder / "staging"
            series_uid = _one_series_folder(staging, f"drop{drop:03d}", images, size, 1000 + drop)
            renamed = time.time()
            os.rename(staging / f"drop{drop:03d}.tmp{1000 + drop}", inbox / f"drop{drop:03d}")
            done = _wait_done(database, series_uid, images, deadline=time.monotonic() + 120)
            seconds.append(done - renamed)
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        run.terminate()
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
        log.close()
        held = server.count_instances()
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
    if held != drops * images:
        raise SystemExit(f"latency: Orthanc holds {held} instances, expected {drops * images}")
    p50, p95 = percentile(seconds, 0.5), percentile(seconds, 0.95)
    return [
        f"| L) rename -> series DONE, {drops} drops of {images} images, {gap:g} s apart, `sendit run` |"
        f" p50 {p50:.2f} s, p95 {p95:.2f} s, max {max(seconds):.2f} s | **p95 {'<=' if p95 <= 2 else '>'} 2 s** |",
    ]


def _wait_done(database: Path, series_uid: str, images: int, deadline: float) -> float:
    """When the series' last image went DONE (its event's time), once all ``images`` are DONE."""
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            with sqlite3.connect(database, timeout=5) as db:
                row = db.execute(
                    "SELECT count(*), max(e.created) FROM relay_event e JOIN relay_series s ON e.series_id = s.id"
                    " WHERE s.series_uid = ? AND e.to_status = 'DONE' AND e.image_id IS NOT NULL",
                    [series_uid],
                ).fetchone()
        except sqlite3.OperationalError:
            continue
        if row and row[0] >= images:
            stamp = datetime.fromisoformat(row[1])
            return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
    raise SystemExit(f"latency: a series was not DONE within the deadline ({series_uid[-6:]})")


def _peak_rss(src: Path, work: Path, name: str, files: int) -> int:
    """Peak RSS in bytes of `sendit import --wait --workers 1` (ingest and worker in one process)."""
    server = fresh_orthanc(work, name)
    config = sendit_config(work / name, server, rest=False)
    cmd = [sys.executable, "-m", "sendit", "--config", str(config), "import", str(src), "--wait", "--workers", "1"]
    process = subprocess.Popen(cmd, env=_env(), cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    held = server.count_instances()
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
    shutil.rmtree(work / name, ignore_errors=True)
    if status != 0 or held != files:
        raise SystemExit(f"memory {name}: exit status {status}, Orthanc holds {held} of {files}")
    return int(usage.ru_maxrss) * 1024


def _multiframe(path: Path, megabytes: int) -> None:
    """One CT object of about ``megabytes`` MB: 512x512 16-bit frames."""
    import random

    rng = random.Random(5)
    patient = make_patient(rng, 0)
    study = Study.fresh(rng, study_id="1", accession="A12345678")
    ds = make_image(patient, study, generate_uid(prefix=UID_ROOT), 1, "CT", 1, 512, np.random.default_rng(5))
    frames = max(1, megabytes * 2**20 // (512 * 512 * 2))
    ds.NumberOfFrames = frames
    ds.PixelData = np.random.default_rng(6).integers(0, 4096, size=frames * 512 * 512, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def memory(work: Path, images: int, big_mb: int) -> list[str]:
    rows = []
    rss: dict[int, int] = {}
    for count in (1, images):
        src = work / f"m-in-{count}"
        generate(src, count, count, size=64)
        rss[count] = _peak_rss(src, work, f"memory-{count}", count)
        shutil.rmtree(src, ignore_errors=True)
    rows.append(f"| M) peak RSS, 1-image series | {rss[1] / 2**20:.0f} MB | |")
    rows.append(
        f"| M) peak RSS, {images}-image series | {rss[images] / 2**20:.0f} MB |"
        f" **{rss[images] / rss[1]:.2f} x** the 1-image run (target: flat) |"
    )
    if big_mb:
        src = work / "m-big"
        _multiframe(src / "big.dcm", big_mb)
        size = (src / "big.dcm").stat().st_size
        peak = _peak_rss(src, work, "memory-big", 1)
        shutil.rmtree(src, ignore_errors=True)
        rows.append(
            f"| M) peak RSS, one {size / 2**20:.0f} MB multi-frame file | {peak / 2**20:.0f} MB |"
            f" **{peak / size:.2f} x** its size (target <= 2.5) |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="T,W,L,M", help="parts to run, of T,W,L,M")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--big", type=int, default=2000, help="images in W's one series")
    parser.add_argument("--big-size", type=int, default=256, help="W's image size (256: 131 KB per file)")
    parser.add_argument("--drops", type=int, default=20)
    parser.add_argument("--drop-gap", type=float, default=8.0, help="idle seconds before each drop")
    parser.add_argument("--memory-images", type=int, default=5000)
    parser.add_argument("--big-file-mb", type=int, default=1024)
    args = parser.parse_args()
    parts = {part.strip().upper() for part in args.only.split(",")}
    work = Path(tempfile.mkdtemp(prefix="sendit-bench-throughput-"))
    rows = ["| figure | measured | ratio |", "|---|---:|---|"]
    try:
        if "T" in parts:
            rows += throughput(work, args.files, args.rounds)
        if "W" in parts:
            rows += big_series(work, args.big, args.big_size, max(1, args.rounds - 1))
        if "L" in parts:
            rows += latency(work, args.drops, 20, 256, args.drop_gap)
        if "M" in parts:
            rows += memory(work, args.memory_images, args.big_file_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(machine())
    print("load average at the end: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
