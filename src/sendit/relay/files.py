"""Where files live: originals (relative to the input folder), working copies, quarantine, kept originals."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from sendit.relay.runtime import config


def sha256_of(path: Path) -> str:
    """Content identity of a file: tells a duplicate from a conflict, and ours from a new arrival."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def original(stored: str) -> Path:
    """Stored paths are relative to the input folder, or absolute for `sendit import` of another folder."""
    path = Path(stored)
    return path if path.is_absolute() else Path(config().INPUT_FOLDER) / path


def stored_name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path(config().INPUT_FOLDER).resolve()))
    except ValueError:
        return str(path.resolve())


def inside_input(stored: str) -> bool:
    return not Path(stored).is_absolute()


def working_copy(series_id: int, image_id: int) -> Path:
    return Path(config().WORK_FOLDER) / f"series-{series_id}" / f"{image_id}.dcm"


def _unique(target: Path) -> Path:
    candidate, number = target, 1
    while candidate.exists():
        candidate = target.with_name(f"{target.name}.{number}")
        number += 1
    return candidate


def set_aside(stored: str, folder_name: str) -> str:
    """Move an original out of the input folder into quarantine (or kept); returns where it went.

    Files outside the input folder (`sendit import` of another folder) are the user's: never moved.
    """
    source = original(stored)
    if not inside_input(stored) or not source.exists():
        return ""
    base = Path(config().QUARANTINE_FOLDER) if folder_name == "quarantine" else Path(config().DATA_DIR) / folder_name
    target = _unique(base / stored)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
    remove_empty_parents(source.parent)
    return str(target)


def remove_original(stored: str) -> None:
    """After DONE: delete an original inside the input folder; the user's other folders are left alone."""
    if not inside_input(stored):
        return
    source = original(stored)
    source.unlink(missing_ok=True)
    remove_empty_parents(source.parent)


def remove_empty_parents(folder: Path) -> None:
    """Remove emptied folders up to, not including, the input folder itself."""
    root = Path(config().INPUT_FOLDER).resolve()
    current = folder.resolve()
    while current != root and root in current.parents:
        try:
            os.rmdir(current)
        except OSError:
            return
        current = current.parent
