"""Files per second of the de-identification engine against pydicom's read+write floor.

Generates synthetic 512x512 16-bit CT files (~527 KB each, several studies and series, a private
block and nested sequences like a real scanner's), then in ONE run measures:

  a) floor: pydicom dcmread + save_as of each file, unchanged
  b) Deidentifier.deidentify_file, one process: the full Basic Profile with the default options
     (modified dates) and the default burned-in text filter
  c) deid_folder (header grouping + identifiers + de-id + series.json), 1 and 2 processes

Compare ratios within one run, never absolutes across runs (DESIGN.md, "Measured").

    .venv/bin/python benchmarks/bench_deid.py --files 300
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from sendit.deid import Deidentifier, deid_folder
from sendit.identifiers import Identifiers, SeriesHeader


class BenchProvider:
    """A stand-in identifier provider: pseudonyms from a hash, so the benchmark needs nothing else."""

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]:
        out = {}
        for header in series:
            digest = hashlib.sha256(header.patient_id.encode()).hexdigest()
            out[header.series_uid] = Identifiers(
                patient_id=f"P{digest[:10]}",
                patient_name=f"P{digest[:10]}",
                accession_number=f"A{digest[10:20]}",
                jitter_days=-(int(digest[20:24], 16) % 365) - 1,
            )
        return out


def make_ct(study: int, series: int, instance: int, uids: dict[str, str], pixels: bytes) -> Dataset:
    """One CT image with the kind of header a scanner writes."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = "20240105"
    ds.InstanceCreationTime = "101010"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240105"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101010.123"
    ds.AccessionNumber = f"ACC{study:05d}"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.InstitutionName = "General Hospital"
    ds.InstitutionAddress = "1 Main Street, Springfield"
    ds.ReferringPhysicianName = "Doe^John"
    ds.StationName = "CT01"
    ds.StudyDescription = "CT CHEST W CONTRAST"
    ds.SeriesDescription = f"AXIAL {series}"
    ds.OperatorsName = "Tech^Terry"
    ds.ManufacturerModelName = "Model X"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = uids["ref"]
    ds.ReferencedImageSequence = Sequence([ref])
    req = Dataset()
    req.RequestedProcedureID = f"RP{study}"
    req.ScheduledProcedureStepID = f"SPS{study}"
    req.AccessionNumber = ds.AccessionNumber
    ds.RequestAttributesSequence = Sequence([req])
    ds.PatientName = f"Patient^{study}"
    ds.PatientID = f"MRN{study:07d}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.PatientAge = "064Y"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.DeviceSerialNumber = "SN12345"
    ds.SoftwareVersions = "1.0"
    ds.ProtocolName = "CHEST"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = str(study)
    ds.SeriesNumber = series
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0, 0, -instance]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.SliceLocation = str(-instance)
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", f"Patient^{study}")
    block.add_new(0x11, "DS", "1.5")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def generate(root: Path, files: int, studies: int = 3, series_per_study: int = 2) -> list[Path]:
    pixels = os.urandom(512 * 512 * 2)
    paths = []
    groups = studies * series_per_study
    for index in range(files):
        group = index % groups
        study, series = divmod(group, series_per_study)
        uids = {
            "study": f"1.2.826.0.1.3680043.9.7777.{study}",
            "series": f"1.2.826.0.1.3680043.9.7777.{study}.{series}",
            "frame": f"1.2.826.0.1.3680043.9.7777.{study}.99",
            "ref": f"1.2.826.0.1.3680043.9.7777.{study}.{series}.1",
        }
        ds = make_ct(study, series, index // groups + 1, uids, pixels)
        path = root / f"study{study}" / f"series{series}" / f"img{index:05d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="best of N rounds per step")
    args = parser.parse_args()

    from pydicom import dcmread

    work = Path(tempfile.mkdtemp(prefix="sendit-bench-"))
    try:
        src = work / "in"
        paths = generate(src, args.files)
        size_kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        deidentifier = Deidentifier(b"benchmark-key")
        ids = BenchProvider().identify([SeriesHeader(series_uid="x", study_uid="y", patient_id="MRN")])["x"]

        out = work / "out"  # emptied before every timed step: every step creates new files

        def floor() -> None:
            for i, path in enumerate(paths):
                dcmread(path).save_as(out / f"{i}.dcm")

        def engine() -> None:
            for i, path in enumerate(paths):
                deidentifier.deidentify_file(path, out / f"{i}.dcm", ids)

        def folder(workers: int) -> Callable[[], None]:
            def run() -> None:
                summary = deid_folder(src, out, deidentifier, BenchProvider(), workers=workers)
                assert summary.written == len(paths), summary.problems[:3]

            return run

        steps: list[tuple[str, Callable[[], None]]] = [
            ("a) pydicom read+write (floor)", floor),
            ("b) deidentify_file, 1 process", engine),
            ("c) deid_folder, 1 process", folder(1)),
            ("c) deid_folder, 2 processes", folder(2)),
        ]
        best = {name: float("inf") for name, _ in steps}
        for round_ in range(args.rounds + 1):  # round 0 warms the page cache and is not counted
            for name, run in steps:  # interleaved, so machine noise hits every step alike
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                elapsed = timed(run)
                if round_:
                    best[name] = min(best[name], elapsed)

        print(f"{args.files} synthetic CT files, {size_kb:.0f} KB each, best of {args.rounds} rounds")
        print(f"{'step':<34} {'files/s':>9} {'vs floor':>9}")
        floor_rate = args.files / best[steps[0][0]]
        for name, _ in steps:
            rate = args.files / best[name]
            print(f"{name:<34} {rate:>9.0f} {rate / floor_rate:>9.2f}")
        ratio = (args.files / best[steps[1][0]]) / floor_rate
        print(f"ratio b/a = {ratio:.2f} (target >= 0.7)")
        scaling = best[steps[2][0]] / best[steps[3][0]]
        print(f"deid_folder 2 processes / 1 process = {scaling:.2f} (target >= 1.7)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
