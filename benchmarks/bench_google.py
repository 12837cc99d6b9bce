"""Files per second to Google Cloud stand-ins against the folder destination, in ONE run.

Generates synthetic 512x512 16-bit CT series (sendit.demo.make_image headers, a smooth phantom with
a little noise as pixels, so that gzip meets data like a real CT's), then measures, steps interleaved,
best of --rounds:

  F) `sendit import DIR --wait` to the folder destination (the reference)
  G) the same to Cloud Storage (fake-gcs-server) + Datastore (Google's emulator), GOOGLE_NIFTI off
  N) the same with GOOGLE_NIFTI on

and prints G/F (target >= 0.7) and N in files/s. "Where the time goes" then times each step of the
NIfTI path in this process on one series of the same data: de-identification, DICOM upload, dcm2niix,
compression, NIfTI upload, Datastore upsert + read back.

--nifti-compression compares the ways to make .nii.gz on one series (dcm2niix -z y, its own zlib at
level 1, -z n + Python zlib level 1, -z n + pigz -1), checking each output decompresses to the same
volume; nifti.COMPRESSION is the fastest correct one (docs/performance.md).

Both stand-ins are started like the tests start them (tests/google.py), loopback only, stopped by
PID; fake-gcs-server keeps its objects in memory here (its file-system backend, which the tests use
to survive a restart, takes ~16 ms per object on its own: the stand-in's disk, not Sendit's work).
Compare ratios taken in one run, never absolutes across runs (DESIGN.md, "Measured").

    .venv/bin/python benchmarks/bench_google.py --files 400
    .venv/bin/python benchmarks/bench_google.py --nifti-compression --series-size 200
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.google (the stand-ins) and the Orthanc benchmark's generator

from benchmarks.bench_orthanc import generate, machine, pipeline_window, timed  # noqa: E402
from tests.google import PROJECT, DatastoreEmulator, GcsServer  # noqa: E402

from sendit.deid import Deidentifier, deid_folder  # noqa: E402
from sendit.destinations.base import OutgoingImage, OutgoingSeries  # noqa: E402
from sendit.destinations.google import GoogleSettings  # noqa: E402
from sendit.destinations.google import nifti as niftimod  # noqa: E402
from sendit.destinations.google.datastore import GoogleDatastoreDestination  # noqa: E402
from sendit.destinations.google.storage import GoogleStorageDestination  # noqa: E402
from sendit.identifiers.local import LocalProvider  # noqa: E402

SECRET = "benchmark-secret-key-0123456789-abcdefghijklmnop"


def phantom(paths: list[Path]) -> None:
    """An ellipse of soft tissue with a slow gradient and 8 HU of noise, air around it."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[:512, :512]
    body = ((x - 256) ** 2 / 200**2 + (y - 256) ** 2 / 160**2) < 1
    for index, path in enumerate(paths):
        ds = dcmread(path)
        image = np.where(body, 1040 + 40 * np.sin(x / 30 + index / 20), 24).astype(np.float64)
        image += rng.normal(0, 8, image.shape) * body
        ds.PixelData = np.clip(image, 0, 4095).astype(np.uint16).tobytes()
        ds.save_as(path)


def config(folder: Path, *, google: bool, nifti: bool, bucket: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f'SECRET_KEY = "{SECRET}"', f'DATA_DIR = "{folder / "data"}"']
    if google:
        lines += ['OUTPUT_FOLDER = "off"', "SEND_TO_GOOGLE = true", f'GOOGLE_CLOUD_STORAGE = "{bucket}"']
        lines += [f'GOOGLE_PROJECT = "{PROJECT}"', f"GOOGLE_NIFTI = {'true' if nifti else 'false'}"]
    path = folder / "sendit.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_sendit(
    src: Path, work: Path, name: str, env: dict[str, str], windows: dict[str, list[float]], **kw: bool
) -> float:
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    if kw.get("google"):
        GcsServer.create_bucket_at(env["STORAGE_EMULATOR_HOST"], bucket)
    folder = work / f"{name}-{uuid.uuid4().hex[:6]}"
    cfg = config(folder, google=kw.get("google", False), nifti=kw.get("nifti", False), bucket=bucket)
    command = [sys.executable, "-m", "sendit", "--config", str(cfg), "import", str(src), "--wait"]
    result: list[subprocess.CompletedProcess[str]] = []
    elapsed = timed(
        lambda: result.append(subprocess.run(command, env=env, capture_output=True, text=True, timeout=7200))
    )
    if result[0].returncode != 0:
        raise SystemExit(f"{name}: sendit import failed ({result[0].returncode}):\n{result[0].stderr[-3000:]}")
    windows.setdefault(name, []).append(pipeline_window(folder / "data" / "sendit.sqlite3"))
    shutil.rmtree(folder, ignore_errors=True)
    return elapsed


def where_the_time_goes(src: Path, work: Path, series_size: int) -> list[tuple[str, float]]:
    """Each step of the NIfTI path, in this process, on the first series of the data."""
    first = sorted(src.rglob("*.dcm"))[:series_size]
    one = work / "one"
    one.mkdir()
    for path in first:
        shutil.copyfile(path, one / path.name)
    out = work / "one-deid"
    steps: list[tuple[str, float]] = []
    steps.append(
        (
            "de-identification (engine, 1 process)",
            timed(lambda: deid_folder(one, out, Deidentifier(SECRET), LocalProvider(SECRET), workers=1)),
        )
    )
    paths = sorted(out.rglob("*.dcm"))
    images = []
    for index, path in enumerate(paths):
        ds = dcmread(path, stop_before_pixels=True)
        images.append(
            OutgoingImage(
                index + 1,
                path,
                str(ds.PatientID),
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                str(ds.file_meta.TransferSyntaxUID),
            )
        )
    bucket = f"where-{uuid.uuid4().hex[:8]}"
    GcsServer.create_bucket_at(os.environ["STORAGE_EMULATOR_HOST"], bucket)
    settings = GoogleSettings(bucket=bucket, project=PROJECT, nifti=True)
    storage = GoogleStorageDestination(settings)
    steps.append(("DICOM upload to Storage (create-only, CRC32C)", timed(lambda: storage.send(images))))
    steps.append(
        (
            "verification (list the series, compare)",
            timed(lambda: storage.missing(images[0].series_uid, {i.sop_instance_uid for i in images})),
        )
    )
    convert_dir = work / "convert"
    convert_dir.mkdir()
    (convert_dir / "in").mkdir()
    (convert_dir / "out").mkdir()
    for index, path in enumerate(paths):
        os.link(path, convert_dir / "in" / f"{index:06d}.dcm")
    binary = niftimod.dcm2niix_binary()
    assert binary is not None
    command = [binary, "-g", "i", "-b", "y", "-ba", "y", "-z", "n", "-f", "series"]
    command += ["-o", str(convert_dir / "out"), str(convert_dir / "in")]
    plain = timed(lambda: subprocess.run(command, capture_output=True, check=True))
    made: list[niftimod.NiftiFile] = []
    target = work / "convert-chosen"
    target.mkdir()
    whole = timed(lambda: made.extend(niftimod.convert(paths, target, niftimod.COMPRESSION)[0]))
    steps.append(("dcm2niix conversion (-z n)", plain))
    steps.append((f"compression ({niftimod.COMPRESSION}: convert() minus -z n)", max(0.0, whole - plain)))
    packed = made[0].volume
    name = f"x/{images[0].series_uid}.nii.gz"
    steps.append(("NIfTI upload", timed(lambda: storage.upload(packed, name, "application/gzip"))))
    series = OutgoingSeries(
        images[0].patient_id, images[0].study_uid, images[0].series_uid, tuple(images), {"modality": "CT"}
    )
    datastore = GoogleDatastoreDestination(settings)
    steps.append(("Datastore upsert + read back", timed(lambda: datastore.deliver_series(series))))
    storage.close()
    datastore.close()
    return steps


def compression(src: Path, work: Path, series_size: int, rounds: int) -> None:
    paths = sorted(src.rglob("*.dcm"))[:series_size]
    reference: int | None = None
    print(f"NIfTI compression, one {len(paths)}-slice 512x512 CT series (phantom), best of {rounds}:")
    print(f"{'method':<20} {'seconds':>8} {'MB':>7}  correct")
    plain = work / "plain"
    plain.mkdir()
    binary = niftimod.dcm2niix_binary()
    assert binary is not None
    (plain / "in").mkdir()
    for index, path in enumerate(paths):
        os.link(path, plain / "in" / f"{index:06d}.dcm")
    uncompressed = min(
        timed(
            lambda: subprocess.run(
                [binary, "-g", "i", "-z", "n", "-w", "1", "-f", "s", "-o", str(plain), str(plain / "in")],
                capture_output=True,
                check=True,
            )
        )
        for _ in range(rounds)
    )
    raw = next(plain.glob("s*.nii"))
    import zlib

    reference = zlib.crc32(raw.read_bytes())
    print(f"{'-z n (no gzip)':<20} {uncompressed:>8.2f} {raw.stat().st_size / 1e6:>7.1f}  (reference)")
    for method in ("dcm2niix", "dcm2niix-pigz1", "dcm2niix-zlib1", "zlib1", "pigz1"):
        if "pigz" in method and shutil.which("pigz") is None:
            print(f"{method:<20} {'-':>8} {'-':>7}  pigz not installed")
            continue
        best = float("inf")
        size, correct = 0.0, False
        for round_ in range(rounds):
            target = work / f"{method}-{round_}"
            target.mkdir()
            start = time.perf_counter()
            made, note = niftimod.convert(paths, target, method)
            best = min(best, time.perf_counter() - start)
            assert made, note
            size = made[0].volume.stat().st_size / 1e6
            correct = niftimod.crc_of_gzip_payload(made[0].volume) == reference
            shutil.rmtree(target, ignore_errors=True)
        print(f"{method:<20} {best:>8.2f} {size:>7.1f}  {'yes' if correct else 'NO: differs from -z n'}")
    print(f"chosen: nifti.COMPRESSION = {niftimod.COMPRESSION!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--series-size", type=int, default=100, help="images per series")
    parser.add_argument("--rounds", type=int, default=2, help="best of N rounds per step, steps interleaved")
    parser.add_argument("--nifti-compression", action="store_true", help="only compare the ways to gzip NIfTI")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sendit-bench-google-"))
    gcs = datastore = None
    try:
        src = work / "in"
        paths = generate(src, args.files, args.series_size)
        phantom(paths)
        if args.nifti_compression:
            compression(src, work, args.series_size, args.rounds)
            return
        gcs = GcsServer(work / "gcs", in_memory=True)  # its disk is not what we measure
        datastore = DatastoreEmulator(work / "datastore")
        gcs.start()
        datastore.start()
        os.environ |= {"STORAGE_EMULATOR_HOST": gcs.url, "DATASTORE_EMULATOR_HOST": datastore.host}
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENDIT_")}
        env["DJANGO_SETTINGS_MODULE"] = "sendit.server.settings"
        n = len(paths)
        size_kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        windows: dict[str, list[float]] = {}
        steps: dict[str, Callable[[], float]] = {
            "F": lambda: run_sendit(src, work, "F", env, windows),
            "G": lambda: run_sendit(src, work, "G", env, windows, google=True),
            "N": lambda: run_sendit(src, work, "N", env, windows, google=True, nifti=True),
        }
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(max(1, args.rounds)):
            for key, step in steps.items():
                best[key] = min(best[key], step())
        print(f"{n} CT files, 512x512, {size_kb:.0f} KB each, series of {args.series_size}; {machine()}")
        pigz = "installed" if shutil.which("pigz") else "not installed"
        print(f"pigz: {pigz}; best of {args.rounds} rounds, interleaved")
        names = {
            "F": "F) sendit import --wait -> folder",
            "G": "G) -> Storage (fake-gcs) + Datastore (emulator), no NIfTI",
            "N": "N) -> Storage + Datastore, GOOGLE_NIFTI = true",
        }
        print(f"{'step':<60} {'files/s':>8} {'pipeline files/s':>17}")
        for key, label in names.items():
            print(f"{label:<60} {n / best[key]:>8.1f} {n / min(windows[key]):>17.1f}")
        ratio = best["F"] / best["G"]
        print(f"G / F = {ratio:.2f} (target >= 0.7); pipeline only: {min(windows['F']) / min(windows['G']):.2f}")
        print(f"N / G = {best['G'] / best['N']:.2f}")
        print(f"where the time goes with NIfTI, one series of {args.series_size} (in this process):")
        steps_timed = where_the_time_goes(src, work, args.series_size)
        total = sum(seconds for _, seconds in steps_timed)
        for label, seconds in steps_timed:
            print(f"  {label:<50} {seconds:>6.2f} s {100 * seconds / total:>5.1f} %")
    finally:
        for server in (gcs, datastore):
            if server is not None:
                server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
