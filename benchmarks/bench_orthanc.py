"""Files per second into Orthanc: raw shippers against Sendit end to end, in ONE run.

Generates synthetic 512x512 16-bit CT files (sendit.demo.make_image: several patients, studies and
series, a private block and nested sequences), then measures:

  a) pydicom dcmread + save_as of each file, unchanged (the floor for any header de-id)
  b) the de-identification engine alone (deid_folder, 1 process: what `sendit deid` runs)
  c) DCMTK storescu of the same files into a fresh Orthanc, one association
  d) Orthanc REST POST /instances with 4 connections (OrthancRestDestination)
  e) Sendit end to end, folder -> Orthanc over DICOM, verified: the real CLI
     `sendit import DIR --wait` as a subprocess (default 5 workers), against a fresh Orthanc

Every Orthanc is started like the tests do (tests/orthanc.py): TCP_NODELAY=1 in its environment,
MaximumPduLength 131072, its own storage, loopback only. Each shipper gets its own fresh Orthanc.
Compare ratios taken in one run, never absolutes across runs (DESIGN.md, "Measured").

    .venv/bin/python benchmarks/bench_orthanc.py --files 1000
    .venv/bin/python benchmarks/bench_orthanc.py --files 300 --profile /tmp/e2e.prof   # + cProfile, 1 worker
    .venv/bin/python benchmarks/bench_orthanc.py --stall-drops 50   # only the DICOM stall loop (issue 12.4)
"""

from __future__ import annotations

import argparse
import os
import platform
import random
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

from sendit.deid import Deidentifier, deid_folder  # noqa: E402
from sendit.demo import UID_ROOT, Study, make_image, make_patient  # noqa: E402
from sendit.destinations.base import OutgoingImage  # noqa: E402
from sendit.destinations.orthanc_rest import OrthancRestDestination  # noqa: E402
from sendit.identifiers.local import LocalProvider  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's
SECRET = "benchmark-secret-key-0123456789-abcdefghijklmnop"


def generate(root: Path, files: int, series_size: int) -> list[Path]:
    """``files`` CT images in series of ``series_size`` (two series per study, one study per patient)."""
    rng = random.Random(11)
    pixels = np.random.default_rng(11)
    paths: list[Path] = []
    series_count = -(-files // series_size)
    patient = make_patient(rng, 0)
    study: Study | None = None
    for s in range(series_count):
        if s % 2 == 0:
            patient = make_patient(rng, s // 2)
            study = Study(
                study_uid=generate_uid(prefix=UID_ROOT),
                frame_of_reference_uid=generate_uid(prefix=UID_ROOT),
                first_image_uid=generate_uid(prefix=UID_ROOT),
                date="20240105",
                time="101010",
                accession=f"A{rng.randint(10000000, 99999999)}",
                study_id=str(100 + s),
                referring="Doe^John^^Dr",
            )
        assert study is not None
        series_uid = generate_uid(prefix=UID_ROOT)
        folder = root / f"study{s // 2:03d}" / f"series{s % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        for instance in range(1, min(series_size, files - len(paths)) + 1):
            ds = make_image(patient, study, series_uid, s % 2 + 1, "CT", instance, 512, pixels)
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


def sendit_config(folder: Path, server: OrthancServer, rest: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "sendit.toml"
    lines = [f'SECRET_KEY = "{SECRET}"', f'DATA_DIR = "{folder / "data"}"', 'OUTPUT_FOLDER = "off"']
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
) -> float:
    name = "sendit" if profile is None else "sendit-profile"
    server = fresh_orthanc(work, name)
    config = sendit_config(work / name, server, rest)
    runner = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else []) + ["-m", "sendit"]
    cmd = [*runner, "--config", str(config), "import", str(src), "--wait"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENDIT_")}
    env["DJANGO_SETTINGS_MODULE"] = "sendit.server.settings"
    result: list[subprocess.CompletedProcess[str]] = []
    elapsed = timed(
        lambda: result.append(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200, cwd=work))
    )
    if result[0].returncode != 0:
        raise SystemExit(f"sendit import failed ({result[0].returncode}):\n{result[0].stderr[-2000:]}")
    finish_orthanc(server, files, "sendit")
    if windows is not None:
        windows.append(pipeline_window(work / name / "data" / "sendit.sqlite3"))
    shutil.rmtree(work / name / "data", ignore_errors=True)
    return elapsed


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
    args = parser.parse_args()
    if args.stall_drops:
        stall_loop(args.stall_drops)
        return

    work = Path(tempfile.mkdtemp(prefix="sendit-bench-orthanc-"))
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
        steps["e"] = lambda: step_sendit(src, work, n, args.workers, windows=windows)
        if args.rest_too:
            steps["f"] = lambda: step_sendit(src, work, n, args.workers, rest=True)
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(max(1, args.rounds)):  # interleaved: other load on the machine hits every step alike
            for key, step in steps.items():
                best[key] = min(best[key], step())
        rates = {key: n / seconds for key, seconds in best.items()}
        rates["e0"] = n / min(windows)
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
        if "f" in rates and "d" in rates:
            print(f"f/d = {rates['f'] / rates['d']:.2f}   f/c = {rates['f'] / rates['c']:.2f}")
        if args.profile:
            print(f"profile of the 1-worker run: {args.profile} (python -m pstats)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
