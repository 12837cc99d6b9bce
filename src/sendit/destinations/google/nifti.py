"""NIfTI for researchers: dcm2niix on a series' de-identified working copies, gzip, a filtered sidecar.

1. Link the series' working copies (only those: never an original) into a private temp folder, with
   the series' instances an earlier delivery put in the bucket (the series arrived in two drops).
2. Run dcm2niix with the BIDS sidecar anonymised (``-ba y``), no comment, no user defaults file
   (``-g i``), one series folder deep; bounded in time.
3. Compress as :data:`COMPRESSION` says — measured as the fastest correct way here: dcm2niix's own
   zlib at level 1 (``-z i -1``), no pigz needed (docs/performance.md, "NIfTI compression"). Its
   output is the same bytes for the same series, so a re-upload finds an equal object.
4. The JSON sidecar keeps only the keys of :data:`SIDECAR_KEYS` whose values are numbers or short
   codes: dcm2niix copies header values into it, and it passes the same allow-list idea as the
   series metadata (sendit.deid.metadata).
5. A series dcm2niix cannot make a volume of (SR, RT, a lone secondary capture) gives a note, not an
   error: its DICOM is delivered regardless.

:class:`GoogleNiftiDestination` uploads the results beside the series' DICOM objects.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sendit.destinations.base import DestinationError, OutgoingImage, OutgoingSeries, SeriesOutcome
from sendit.destinations.folder import safe_path_part
from sendit.destinations.google.client import retry_policy
from sendit.destinations.google.layout import instance_name, series_prefix
from sendit.destinations.google.settings import GoogleSettings
from sendit.destinations.google.storage import Conflict, Damaged, GoogleStorageDestination, Vanished

log = logging.getLogger("sendit.destinations.google")

CONVERT_TIMEOUT = 900.0  # seconds for one series; a 2,000-slice CT takes well under a minute
#: How a .nii becomes .nii.gz: "dcm2niix-zlib1" (dcm2niix -z i -1: its own zlib), "dcm2niix-pigz1"
#: (-z y -1), "dcm2niix" (-z y: pigz at level 6 where installed), "zlib1" (-z n, then Python's zlib at
#: level 1), "pigz1" (-z n, then pigz -1 -n). Measured by benchmarks/bench_google.py
#: --nifti-compression; the numbers and the choice are in docs/performance.md.
COMPRESSION = "dcm2niix-zlib1"
COMPRESSIONS = ("zlib1", "pigz1", "dcm2niix", "dcm2niix-pigz1", "dcm2niix-zlib1")
_BASENAME = "series"

#: Sidecar keys that leave: acquisition physics and geometry, the converter. No descriptions, names,
#: dates, times, institution, station, serial numbers or UIDs. Values must also pass :func:`_safe_value`.
SIDECAR_KEYS = frozenset(
    {
        "Modality",
        "MagneticFieldStrength",
        "ImagingFrequency",
        "Manufacturer",
        "ManufacturersModelName",
        "BodyPartExamined",
        "PatientPosition",
        "MRAcquisitionType",
        "ScanningSequence",
        "SequenceVariant",
        "ScanOptions",
        "ImageType",
        "SliceThickness",
        "SpacingBetweenSlices",
        "EchoTime",
        "RepetitionTime",
        "InversionTime",
        "FlipAngle",
        "EchoTrainLength",
        "PixelBandwidth",
        "PhaseEncodingSteps",
        "AcquisitionMatrixPE",
        "ReconMatrixPE",
        "PercentPhaseFOV",
        "PercentSampling",
        "InPlanePhaseEncodingDirectionDICOM",
        "PhaseEncodingDirection",
        "SliceTiming",
        "MultibandAccelerationFactor",
        "ParallelReductionFactorInPlane",
        "EffectiveEchoSpacing",
        "TotalReadoutTime",
        "XRayExposure",
        "XRayTubeCurrent",
        "ExposureTime",
        "KVP",
        "ImageOrientationPatientDICOM",
        "RawImage",
        "ConversionSoftware",
        "ConversionSoftwareVersion",
    }
)
_CODE = re.compile(r"^[A-Za-z0-9 _.+\-]{0,64}$")


@dataclass(frozen=True)
class NiftiFile:
    """One output of a series: ``suffix`` is what dcm2niix appended (``""``, ``"_e2"``, ``"_ph"``…)."""

    suffix: str
    volume: Path  # .nii.gz
    sidecar: Path | None  # .json


def dcm2niix_binary() -> str | None:
    """The binary the PyPI wheel ``dcm2niix`` ships, else one on PATH."""
    try:
        import dcm2niix

        if Path(dcm2niix.bin).exists():
            return str(dcm2niix.bin)
    except ImportError:
        pass
    return shutil.which("dcm2niix")


def _safe_value(value: Any) -> bool:
    if isinstance(value, bool | int | float):
        return True
    if isinstance(value, str):
        return bool(_CODE.match(value))
    if isinstance(value, list):
        return all(_safe_value(item) and not isinstance(item, list) for item in value)
    return False


def filter_sidecar(sidecar: dict[str, Any]) -> dict[str, Any]:
    """Only allow-listed keys with numbers or short codes as values."""
    return {key: value for key, value in sorted(sidecar.items()) if key in SIDECAR_KEYS and _safe_value(value)}


def gzip_file(source: Path, target: Path, method: str = COMPRESSION) -> None:
    """``source`` (.nii) → ``target`` (.nii.gz), without name or time in the gzip header."""
    if method == "pigz1" and shutil.which("pigz"):
        with open(target, "wb") as out:
            subprocess.run(["pigz", "-1", "-n", "-c", str(source)], stdout=out, check=True, timeout=CONVERT_TIMEOUT)
        return
    with (
        open(source, "rb") as raw,
        open(target, "wb") as out,
        gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=out, mtime=0) as packed,
    ):
        for block in iter(lambda: raw.read(4 << 20), b""):
            packed.write(block)


def convert(images: Sequence[Path], work: Path, method: str = COMPRESSION) -> tuple[list[NiftiFile], str]:
    """Convert one series in ``work`` (a private, empty folder); returns the outputs, or none and a
    note saying why. Raises OSError only for the folder itself (a full disk)."""
    binary = dcm2niix_binary()
    if binary is None:
        return [], "dcm2niix is not installed; no NIfTI made"
    source, out = work / "in", work / "out"
    source.mkdir()
    out.mkdir()
    for index, image in enumerate(images):
        target = source / f"{index:06d}.dcm"
        try:
            os.link(image, target)
        except OSError:  # another file system: a copy
            shutil.copyfile(image, target)
    internal = method.startswith("dcm2niix")
    zflag = {"dcm2niix": "y", "dcm2niix-pigz1": "y", "dcm2niix-zlib1": "i"}.get(method, "n")
    command = [binary, "-g", "i", "-b", "y", "-ba", "y", "-z", zflag, "-f", _BASENAME, "-c", "", "-d", "0"]
    command += ["-w", "1", "-v", "0", "-o", str(out)]
    if method in ("dcm2niix-zlib1", "dcm2niix-pigz1"):
        command.append("-1")
    command.append(str(source))
    try:
        done = subprocess.run(command, capture_output=True, timeout=CONVERT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return [], f"dcm2niix took longer than {CONVERT_TIMEOUT:.0f} s; no NIfTI made"
    volumes = sorted(out.glob(f"{_BASENAME}*.nii.gz" if internal else f"{_BASENAME}*.nii"))
    if not volumes:  # its output may quote header values: only its exit code is kept
        return [], f"dcm2niix made no volume of this series (exit code {done.returncode}); DICOM only"
    made: list[NiftiFile] = []
    for volume in volumes:
        stem = volume.name.removesuffix(".gz").removesuffix(".nii")
        suffix = safe_path_part(stem[len(_BASENAME) :]) if len(stem) > len(_BASENAME) else ""
        packed = volume if internal else volume.with_name(volume.name + ".gz")
        if not internal:
            gzip_file(volume, packed, method)
            volume.unlink()
        sidecar = volume.with_name(stem + ".json")
        kept: Path | None = None
        if sidecar.exists():
            try:
                filtered = filter_sidecar(json.loads(sidecar.read_text(encoding="utf-8", errors="replace")))
            except ValueError:
                filtered = {}
            kept = sidecar.with_name(stem + ".filtered.json")
            kept.write_text(json.dumps(filtered, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        made.append(NiftiFile(suffix, packed, kept))
    return made, ""


def crc_of_gzip_payload(path: Path) -> int:
    """CRC32 of a .gz file's content (for tests and the benchmark: compression is lossless)."""
    with gzip.open(path, "rb") as handle:
        crc = 0
        for block in iter(lambda: handle.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


class GoogleNiftiDestination:
    """A series destination: the series' NIfTI volume(s) and sidecar(s) beside its DICOM objects."""

    name = "google-nifti"

    def __init__(self, settings: GoogleSettings, storage: GoogleStorageDestination | None = None) -> None:
        self.settings = settings
        self.storage = storage or GoogleStorageDestination(settings)
        self.where = "dcm2niix → " + self.storage.where

    def deliver_series(self, series: OutgoingSeries) -> SeriesOutcome:
        if not series.images:
            return SeriesOutcome()
        prefix = series_prefix(self.settings.prefix, series.patient_id, series.study_uid, series.series_uid)
        base = f"{prefix}{safe_path_part(series.series_uid)}"
        images = [image.path for image in sorted(series.images, key=_instance_order)]
        work = Path(tempfile.mkdtemp(prefix=".nifti-", dir=images[0].parent))
        try:
            images += self._earlier_instances(series, prefix, work)
            made, note = convert(images, work)
            if not made:
                return SeriesOutcome(notes=(note,))
            links: list[str] = []
            notes: list[str] = []
            for output in made:
                uploads = [(output.volume, f"{base}{output.suffix}.nii.gz", "application/gzip")]
                if output.sidecar is not None:
                    uploads.append((output.sidecar, f"{base}{output.suffix}.json", "application/json"))
                for path, name, content_type in uploads:
                    if self._put(path, name, content_type):
                        notes.append(f"{name.rsplit('/', 1)[-1]} replaced: the series changed since it was made")
                    links.append(self.storage.link(name))
            return SeriesOutcome(links=tuple(links), notes=tuple(notes))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _earlier_instances(self, series: OutgoingSeries, prefix: str, work: Path) -> list[Path]:
        """The series' instances already in the bucket from an earlier delivery (the series arrived in
        two drops; those working copies are gone): downloaded, so the volume holds the whole series.
        They are the de-identified objects Sendit itself uploaded."""
        ours = {instance_name(prefix, image.sop_instance_uid) for image in series.images}
        try:
            listed = self.storage.list_objects(prefix)
            others = sorted(name for name in listed if name.endswith(".dcm") and name not in ours)
            if not others:
                return []
            folder = work / "earlier"
            folder.mkdir()
            paths = []
            for index, name in enumerate(others):
                target = folder / f"{index:06d}.dcm"
                self.storage.bucket().blob(name).download_to_filename(
                    str(target), timeout=self.storage.timeouts(), retry=retry_policy(self.settings)
                )
                paths.append(target)
            return paths
        except Exception as exc:
            raise self.storage.explain(exc, "reading the series' earlier instances") from None

    def _put(self, path: Path, name: str, content_type: str) -> bool:
        """Create-only; an equal object is fine; a different one (the series gained images since) is
        replaced, naming the generation it replaces. True when it replaced one."""
        try:
            try:
                self.storage.upload(path, name, content_type)
                return False
            except Conflict as conflict:
                blob = self.storage.bucket().blob(name)
                blob.upload_from_filename(
                    str(path),
                    content_type=content_type,
                    if_generation_match=conflict.generation,  # the one we compared, no other
                    checksum="crc32c",
                    timeout=self.storage.timeouts(),
                    retry=retry_policy(self.settings),
                )
                return True
        except (Vanished, Damaged):
            raise DestinationError(f"{name.rsplit('/', 1)[-1]}: did not arrive as sent; trying again later") from None
        except DestinationError:
            raise
        except Exception as exc:
            raise self.storage.explain(exc, "uploading the NIfTI of the series") from None

    def check(self) -> str | None:
        """dcm2niix runs; the bucket itself is google-storage's line."""
        binary = dcm2niix_binary()
        if binary is None:
            return "dcm2niix is not installed (pip install dcm2niix)"
        try:
            subprocess.run([binary, "--version"], capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"dcm2niix does not run ({type(exc).__name__})"
        return None

    def close(self) -> None:
        self.storage.close()


def _instance_order(image: OutgoingImage) -> int:
    return image.image_id
