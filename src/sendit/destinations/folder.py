"""The embedded default destination: a plain folder, laid out by pseudonym / study / series.

The layout, ``<pseudonym>/<study UID>/<series UID>/<SOP instance UID>.dcm``, is defined here once
(:func:`series_path`, :func:`image_path`) and shared with ``sendit deid IN OUT``. Every path
component is a pseudonym or a de-identified UID, so no PHI can appear in a path. Files are written
under a temporary name and renamed, so a crash never leaves a half file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from sendit.destinations.base import OutgoingImage, SendResult

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_path_part(text: str) -> str:
    """A pseudonym or UID as one path component: only [A-Za-z0-9._-], never empty, '.' or '..'.

    An identifier service's pseudonym is not trusted to be a file name (a '/' or '..' in it).
    """
    part = _UNSAFE.sub("_", text)
    return part if part.strip(".") else f"_{part}"


def series_path(root: Path, patient_id: str, study_uid: str, series_uid: str) -> Path:
    """Where one series' images go: ``<root>/<pseudonym>/<study UID>/<series UID>``, each part safe."""
    return root.joinpath(safe_path_part(patient_id), safe_path_part(study_uid), safe_path_part(series_uid))


def image_path(series_folder: Path, sop_instance_uid: str) -> Path:
    """One image in its series folder (:func:`series_path`): ``<SOP instance UID>.dcm``."""
    return series_folder / f"{safe_path_part(sop_instance_uid)}.dcm"


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class FolderDestination:
    name = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root

    def target(self, image: OutgoingImage) -> Path:
        series = series_path(self.root, image.patient_id, image.study_uid, image.series_uid)
        return image_path(series, image.sop_instance_uid)

    def send(self, images: Sequence[OutgoingImage]) -> list[SendResult]:
        results: list[SendResult] = []
        written_to: set[Path] = set()
        for image in images:
            target = self.target(image)
            partial = target.with_name(target.name + ".part")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image.path, partial)
                with open(partial, "rb+") as handle:  # on disk before the original may be deleted
                    os.fsync(handle.fileno())
                os.replace(partial, target)
                written_to.add(target.parent)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    partial.unlink(missing_ok=True)
                full = exc.errno == errno.ENOSPC
                reason = "no space left on the output folder" if full else f"folder write failed: {exc.strerror}"
                # a full disk is the folder's fault, not the image's: not counted against the image
                message = f"image {image.image_id}: {reason}"
                results.append(SendResult(image.image_id, delivered=False, message=message, destination_fault=full))
                continue
            results.append(SendResult(image.image_id, delivered=True))
        for folder in written_to:  # the renames are durable before anything is reported delivered
            _fsync_directory(folder)
        return results

    def missing(self, series_uid: str, sop_instance_uids: set[str]) -> set[str]:
        # any pseudonym and study: the series UID alone names the folder (see series_path)
        found = {path.stem for path in self.root.glob(f"*/*/{safe_path_part(series_uid)}/*.dcm")}
        return sop_instance_uids - found

    def check(self) -> str | None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"output folder cannot be created: {exc.strerror}"
        if not os.access(self.root, os.W_OK):
            return "output folder is not writable"
        return None

    def close(self) -> None:
        return None
