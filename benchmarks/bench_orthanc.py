"""Files per second into Orthanc: raw shippers against Sendit end to end, in ONE run.

Generates synthetic 512x512 16-bit CT files (sendit.demo.make_image: several patients, studies and
series, a private block and nested sequences), then measures:

  a) pydicom dcmread + save_as of each file, unchanged (the floor for any header de-id)
  b) the de-identification engine alone (deid_folder, 1 process: what `sendit deid` runs)
  c) DCMTK storescu of the same files into a fresh Orthanc, one association
  d) Orthanc REST POST /instances with 4 connections (OrthancRestDestination)
  e) Sendit end to end, folder -> Orthanc over DICOM, verified: the real CLI
     `sendit import DIR --wait` as a subprocess (default 5 workers), against a fresh Orthanc
  g) with --s3: e) again with the originals in an S3 bucket (STORAGE_URL; working copies in local
     scratch), on moto's S3 server on loopback, a stand-in for a real store (tests/s3.py). g/e is
     issue 13's target (>= 0.8); the bucket must be empty again after each run.

Every Orthanc is started like the tests do (tests/orthanc.py): TCP_NODELAY=1 in its environment,
MaximumPduLength 131072, its own storage, loopback only. Each shipper gets its own fresh Orthanc.
Compare ratios taken in one run, never absolutes across runs (DESIGN.md, "Measured").

    .venv/bin/python benchmarks/bench_orthanc.py --files 1000
    .venv/bin/python benchmarks/bench_orthanc.py --files 300 --profile /tmp/e2e.prof   # + cProfile, 1 worker
    .venv/bin/python benchmarks/bench_orthanc.py --stall-drops 50   # only the DICOM stall loop (issue 12.4)
    .venv/bin/python benchmarks/bench_orthanc.py --only-e --s3 --files 600   # local folders vs S3 bucket
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.orthanc.OrthancServer: one Orthanc starter, not two

from tests.orthanc import OrthancServer  # noqa: E402
from tests.s3 import Bucket, MotoServer  # noqa: E402

from sendit.deid import Deidentifier, deid_folder  # noqa: E402
from sendit.demo import UID_ROOT, Study, make_image, make_patient  # noqa: E402
from sendit.destinations.base import OutgoingImage  # noqa: E402
from sendit.destinations.orthanc_rest import OrthancRestDestination  # noqa: E402
from sendit.identifiers.local import LocalProvider  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's
SECRET = "benchmark-secret-key-0123456789-abcdefghijklmnop"


def generate(root: Path, files: int, series_size: int, size: int = 512) -> list[Path]:
    """``files`` CT images (``size`` x ``size``) in series of ``series_size`` (two series per study,
    one study per patient)."""
    rng = random.Random(11)
    pixels = np.random.default_rng(11)
    paths: list[Path] = []
    series_count = -(-files // series_size)
    patient = make_patient(rng, 0)
    study: Study | None = None
    for s in range(series_count):
        if s % 2 == 0:
            patient = make_patient(rng, s // 2)
            study = Study.fresh(rng, study_id=str(100 + s))
        assert study is not None
        series_uid = generate_uid(prefix=UID_ROOT)
        folder = root / f"study{s // 2:03d}" / f"series{s % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        for instance in range(1, min(series_size, files - len(paths)) + 1):
            ds = make_image(patient, study, series_uid, s % 2 + 1, "CT", instance, size, pixels)
            path = folder / f"IM{instance:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def fresh_orthanc(work: Path, name: str) -> OrthancServer:
    return OrthancServer(root=work / f"orthanc-{name}").start()


def finish_orthanc(server: OrthancServer, expected: int, label: str) -> None:
    """Check Orthanc holds every file (independently, over REST), then stop it and drop its storage."""
    held = server.count_instances()
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
    if held != expected:
        raise SystemExit(f"{label}: Orthanc holds {held} instances, expected {expected}")


def step_storescu(src: Path, work: Path, files: int) -> float:
    server = fresh_orthanc(work, "storescu")
    cmd = [STORESCU, "-aet", "STORESCU", "-aec", server.aet, "--max-pdu", "131072", "+sd", "+r"]
    cmd += [server.host, str(server.dicom_port), str(src)]
    env = dict(os.environ, TCP_NODELAY="1")
    elapsed = timed(lambda: subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=3600))
    finish_orthanc(server, files, "storescu")
    return elapsed


def step_rest(paths: list[Path], work: Path) -> float:
    server = fresh_orthanc(work, "rest")
    outgoing = []
    for i, path in enumerate(paths):
        ds = dcmread(path, stop_before_pixels=True)
        outgoing.append(
            OutgoingImage(
                image_id=i,
                path=path,
                patient_id=str(ds.PatientID),
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            )
        )
    destination = OrthancRestDestination(server.url, concurrency=4)

    def send() -> None:
        results = destination.send(outgoing)
        bad = [r for r in results if not r.delivered]
        if bad:
            raise SystemExit(f"REST: {len(bad)} not delivered, e.g. {bad[0].message}")

    try:
        elapsed = timed(send)
    finally:
        destination.close()
    finish_orthanc(server, len(paths), "REST")
    return elapsed


def sendit_config(folder: Path, server: OrthancServer, rest: bool, storage: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "sendit.toml"
    lines = [f'SECRET_KEY = "{SECRET}"', f'DATA_DIR = "{folder / "data"}"', 'OUTPUT_FOLDER = "off"']
    lines += [f'{key} = "{value}"' for key, value in (storage or {}).items()]
    if rest:
        lines += [f'ORTHANC_URL = "{server.url}"']
    else:
        lines += [
            "SEND_TO_ORTHANC = true",
            f'ORTHANC_IPADDRESS = "{server.host}"',
            f"ORTHANC_PORT = {server.dicom_port}",
        ]
        lines += [f'ORTHANC_AET = "{server.aet}"', 'SENDIT_AET = "SENDIT"']
    config.write_text("\n".join(lines) + "\n")
    return config


def pipeline_window(database: Path) -> float:
    """Seconds from the first image entering de-identification to the last one DONE (Event rows):
    the pipeline's own time, without the command's start-up, ingest and worker spawning."""
    with sqlite3.connect(database) as db:
        first = db.execute("SELECT min(created) FROM relay_event WHERE to_status = 'PROCESSING'").fetchone()[0]
        last = db.execute("SELECT max(created) FROM relay_event WHERE to_status = 'DONE'").fetchone()[0]
    return (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()


def step_sendit(
    src: Path,
    work: Path,
    files: int,
    workers: int | None,
    *,
    rest: bool = False,
    profile: Path | None = None,
    windows: list[float] | None = None,
    bucket: Bucket | None = None,
    cpu: list[float] | None = None,
) -> float:
    """One `sendit import --wait` into a fresh Orthanc; ``cpu`` gets the CPU seconds it took: Sendit's
    processes and Orthanc's (children, counted once reaped) plus the stand-in S3 server's."""
    name = "sendit" if profile is None else "sendit-profile"
    name += "-s3" if bucket is not None else ""
    server = fresh_orthanc(work, name)
    config = sendit_config(work / name, server, rest, bucket.settings if bucket is not None else None)
    runner = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else []) + ["-m", "sendit"]
    cmd = [*runner, "--config", str(config), "import", str(src), "--wait"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENDIT_")}
    env["DJANGO_SETTINGS_MODULE"] = "sendit.server.settings"
    result: list[subprocess.CompletedProcess[str]] = []
    moto_pid = bucket.server.process.pid if bucket is not None and bucket.server.process is not None else None
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = children.ru_utime + children.ru_stime + (cpu_seconds(moto_pid) if moto_pid else 0.0)
    elapsed = timed(
        lambda: result.append(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200, cwd=work))
    )
    if result[0].returncode != 0:
        raise SystemExit(f"sendit import failed ({result[0].returncode}):\n{result[0].stderr[-2000:]}")
    finish_orthanc(server, files, name)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(children.ru_utime + children.ru_stime + (cpu_seconds(moto_pid) if moto_pid else 0.0) - before)
    if bucket is not None and bucket.keys():
        raise SystemExit(f"{name}: {len(bucket.keys())} object(s) left in the bucket after clean-up")
    if windows is not None:
        windows.append(pipeline_window(work / name / "data" / "sendit.sqlite3"))
    shutil.rmtree(work / name / "data", ignore_errors=True)
    return elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process used so far (/proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    orthanc = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    dcmtk = subprocess.run([STORESCU, "--version"], capture_output=True, text=True).stdout.split("$")[1].strip()
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {orthanc}, DCMTK {dcmtk.split()[2].lstrip('v')}"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stall_loop(drops: int) -> None:
    """Issue 12.4's loop (tests/test_dicom_stall.py), longer: drops of 10 series x 20 images over DICOM
    from 5 processes into one fresh Orthanc; C-STORE round trips, series send times, stalls."""
    from tests.test_dicom_stall import IMAGES, SERIES, WORKERS, run_drops

    work = Path(tempfile.mkdtemp(prefix="sendit-bench-stall-"))
    server = fresh_orthanc(work, "stall")
    try:
        outcomes = run_drops(server, work / "in", drops, report=True)
        held = server.count_instances()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    series = [o for drop in outcomes for o in drop]
    stores = [t for o in series for t in o.store_seconds]
    sends = [o.send_seconds for o in series]
    print(f"{drops} drops x {SERIES} series x {IMAGES} images (64x64 CT), {WORKERS} processes; {machine()}")
    print(
        f"C-STORE round trip: p50 {percentile(stores, 0.5) * 1000:.1f} ms, p99 {percentile(stores, 0.99) * 1000:.1f}"
        f" ms, max {max(stores) * 1000:.0f} ms ({len(stores)} stores)"
    )
    print(f"series send: p50 {percentile(sends, 0.5):.2f} s, max {max(sends):.2f} s")
    stalled_drops = sum(any(o.stalled for o in drop) for drop in outcomes)
    print(f"stalled series: {sum(o.stalled for o in series)} of {len(series)}; drops with a stall: {stalled_drops}")
    print(f"Orthanc holds {held} instances (expected {len(series) * IMAGES})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--series-size", type=int, default=100, help="images per series")
    parser.add_argument("--workers", type=int, help="workers for e) (default: the configured 5)")
    parser.add_argument("--profile", type=Path, help="also run e) with 1 worker under cProfile into this file")
    parser.add_argument("--rounds", type=int, default=2, help="best of N rounds per step, steps interleaved")
    parser.add_argument("--only-e", action="store_true", help="skip a-d (to iterate on the pipeline)")
    parser.add_argument("--rest-too", action="store_true", help="also f) sendit end to end over ORTHANC_URL (REST)")
    parser.add_argument("--stall-drops", type=int, help="run only the DICOM stall loop, this many drops")
    parser.add_argument("--s3", action="store_true", help="also g) e with originals in an S3 bucket (moto stand-in)")
    args = parser.parse_args()
    if args.stall_drops:
        stall_loop(args.stall_drops)
        return

    work = Path(tempfile.mkdtemp(prefix="sendit-bench-orthanc-"))
    moto: MotoServer | None = None
    try:
        src = work / "in"
        paths = generate(src, args.files, args.series_size)
        n = len(paths)
        size_kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        out = work / "out"
        rates: dict[str, float] = {}

        def floor() -> None:
            for i, path in enumerate(paths):
                dcmread(path).save_as(out / f"{i}.dcm")

        def engine() -> None:
            provider = LocalProvider(SECRET)
            summary = deid_folder(src, out, Deidentifier(SECRET), provider, workers=1)
            assert summary.written == n, summary.problems[:3]

        def local(run: Callable[[], None]) -> Callable[[], float]:
            def step() -> float:
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                try:
                    return timed(run)
                finally:
                    shutil.rmtree(out, ignore_errors=True)

            return step

        steps: dict[str, Callable[[], float]] = {}
        if not args.only_e:
            steps["a"] = local(floor)
            steps["b"] = local(engine)
            steps["c"] = lambda: step_storescu(src, work, n)
            steps["d"] = lambda: step_rest(paths, work)
        windows: list[float] = []
        e_cpu: list[float] = []
        steps["e"] = lambda: step_sendit(src, work, n, args.workers, windows=windows, cpu=e_cpu)
        if args.rest_too:
            steps["f"] = lambda: step_sendit(src, work, n, args.workers, rest=True)
        s3_windows: list[float] = []
        if args.s3:
            moto = MotoServer(work / "moto.log").start()
            moto.client().create_bucket(Bucket="sendit-bench")
            bucket = Bucket(moto, None, "sendit-bench")  # no gate: straight to moto
            moto_cpu: list[float] = []
            g_cpu: list[float] = []

            def with_bucket() -> float:
                assert moto is not None and moto.process is not None
                before = cpu_seconds(moto.process.pid)
                elapsed = step_sendit(src, work, n, args.workers, windows=s3_windows, bucket=bucket, cpu=g_cpu)
                moto_cpu.append(cpu_seconds(moto.process.pid) - before)
                return elapsed

            steps["g"] = with_bucket
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(max(1, args.rounds)):  # interleaved: other load on the machine hits every step alike
            for key, step in steps.items():
                best[key] = min(best[key], step())
        rates = {key: n / seconds for key, seconds in best.items()}
        rates["e0"] = n / min(windows)
        if s3_windows:
            rates["g0"] = n / min(s3_windows)
        if args.profile:
            rates["e1"] = n / step_sendit(src, work, n, 1, profile=args.profile)

        names = {
            "a": "a) pydicom read+write (floor)",
            "b": "b) de-id engine, 1 process",
            "c": "c) storescu -> Orthanc, 1 assoc",
            "d": "d) REST -> Orthanc, 4 connections",
            "e": f"e) sendit import --wait, {args.workers or 'default'} workers",
            "e0": "e) pipeline only (first PROCESSING to last DONE)",
            "e1": "e) same, 1 worker, under cProfile",
            "f": f"f) sendit import --wait over REST, {args.workers or 'default'} workers",
            "g": "g) e with originals in an S3 bucket (moto stand-in)",
            "g0": "g) pipeline only (first PROCESSING to last DONE)",
        }
        print(
            f"{n} synthetic CT files, {size_kb:.0f} KB each, {-(-n // args.series_size)} series,"
            f" best of {max(1, args.rounds)} rounds"
        )
        print(machine())
        width = max(len(name) for key, name in names.items() if key in rates)
        print(f"| {'step':<{width}} | {'files/s':>8} |")
        print(f"|{'-' * (width + 2)}|{'-' * 9}:|")
        for key, name in names.items():
            if key in rates:
                print(f"| {name:<{width}} | {rates[key]:>8.0f} |")
        if "c" in rates:
            print(f"e/c = {rates['e'] / rates['c']:.2f} (target >= 0.7)   e/d = {rates['e'] / rates['d']:.2f}")
            print(f"pipeline only: e/c = {rates['e0'] / rates['c']:.2f}   e/d = {rates['e0'] / rates['d']:.2f}")
        if e_cpu:
            print(f"CPU per file, Sendit's processes and Orthanc's together, e: {min(e_cpu) * 1000 / n:.1f} ms")
        if "f" in rates and "d" in rates:
            print(f"f/d = {rates['f'] / rates['d']:.2f}   f/c = {rates['f'] / rates['c']:.2f}")
        if "g" in rates:
            ratio, window_ratio = rates["g"] / rates["e"], rates["g0"] / rates["e0"]
            print(f"g/e = {ratio:.2f} (target >= 0.8)   pipeline only: g/e = {window_ratio:.2f}")
            e_ms, g_ms = min(e_cpu) * 1000 / n, min(g_cpu) * 1000 / n
            print(
                f"CPU per image (Sendit + Orthanc [+ S3 stand-in]): e {e_ms:.1f} ms, g {g_ms:.1f} ms;"
                f" e/g = {e_ms / g_ms:.2f}"
            )
            print(
                f"the stand-in S3 server itself used {min(moto_cpu) * 1000 / n:.1f} ms CPU per image on these"
                f" same {os.cpu_count()} cores (a real store's CPU is elsewhere); load average at the end: "
                + " ".join(f"{x:.1f}" for x in os.getloadavg())
            )
        if args.profile:
            print(f"profile of the 1-worker run: {args.profile} (python -m pstats)")
    finally:
        if moto is not None:
            moto.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
