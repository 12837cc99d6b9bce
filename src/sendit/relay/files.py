"""Where files live: originals (relative to the input folder), working copies, quarantine, kept originals.

Names on disk are bytes; names in the database are text. A name that is not valid UTF-8 (common in
European exports: ``M\\xfcller``) is stored escaped, so that it can be shown and still leads back
to its file: each byte that is not part of valid UTF-8, and each control character, is written as
``\\xNN``, and a backslash as ``\\\\``. Every other name is stored as it is. ``original()`` undoes the
escaping, so every caller that opens, moves or deletes ``original(image.path)`` finds the real file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

from sendit.relay.runtime import config

# Linux: a path handed to the kernel is at most 4,095 bytes (PATH_MAX with its terminating NUL).
PATH_MAX = 4096
# The path columns (Image.path, ReceivedFile.path and .stored_at) hold 1,024 characters.
RECORD_MAX = 1024
_UNIQUE_ROOM = 8  # ".NNN" that _unique may append, and a slash
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def sha256_of(path: Path) -> str:
    """Content identity of a file: tells a duplicate from a conflict, and ours from a new arrival."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def escape_name(raw: str) -> str:
    """A path as the OS gave it (undecodable bytes as surrogates) → printable text for the database."""
    text = os.fsencode(raw).decode("utf-8", "surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text  # the usual case: nothing to escape
    out: list[str] = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not part of valid UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0x7F <= code < 0xA0:  # control characters: no line breaks in logs or pages
            out.extend(f"\\x{byte:02x}" for byte in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out)


def real_name(stored: str) -> str:
    """The inverse of ``escape_name``: the name to hand to the OS (surrogates for undecodable bytes)."""
    if "\\" not in stored:
        return stored
    data = bytearray()
    position = 0
    for match in _ESCAPE.finditer(stored):
        data += stored[position : match.start()].encode("utf-8", "surrogateescape")
        token = match.group(1)
        data += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        position = match.end()
    data += stored[position:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(data))


def original(stored: str) -> Path:
    """Stored paths are relative to the input folder, or absolute for `sendit import` of another folder."""
    path = Path(real_name(stored))
    return path if path.is_absolute() else Path(config().INPUT_FOLDER) / path


def input_root() -> Path:
    """The input folder with its symbolic links resolved (it may itself be a link: configured so)."""
    return Path(config().INPUT_FOLDER).resolve()


def stored_name(path: Path, follow: bool = False, root: Path | None = None) -> str:
    """How a path is recorded: relative to the input folder (else absolute), escaped.

    Only the folders above are resolved, never the entry itself unless ``follow`` (the folder given
    to a scan): a symbolic link is recorded as the link. Never raises for a link loop.
    """
    base = root if root is not None else input_root()
    try:
        full = path.resolve() if follow else path.parent.resolve() / path.name
    except (OSError, RuntimeError):  # a loop among the folders above: record the path as given
        full = Path(os.path.abspath(path))
    try:
        relative = str(full.relative_to(base))
    except ValueError:
        relative = str(full)
    return escape_name(relative)


def inside_input(stored: str) -> bool:
    return not Path(stored).is_absolute()


def _set_aside_bases() -> list[Path]:
    cfg = config()
    data = Path(cfg.DATA_DIR)
    return [Path(cfg.QUARANTINE_FOLDER), data / "skipped", data / "kept"]


def longest_name() -> int:
    """The longest stored name whose set-aside place (quarantine/NAME.N, ...) still fits its column."""
    return RECORD_MAX - max(len(str(base)) for base in _set_aside_bases()) - _UNIQUE_ROOM


def too_long(path: Path, stored: str) -> str:
    """Why a path cannot be recorded or opened (its length), or "" when it can."""
    limit = longest_name()
    if len(stored) > limit:
        return f"path too long to record (over {limit} characters inside the input folder)"
    longest_base = max(len(os.fsencode(base)) for base in _set_aside_bases())
    if len(os.fsencode(path)) >= PATH_MAX or longest_base + len(stored.encode()) + _UNIQUE_ROOM >= PATH_MAX:
        return f"path too long to open (over {PATH_MAX - 1} bytes)"
    return ""


def recordable(stored: str) -> str:
    """A stored name that fits its column: a too-long one is cut, with a digest that keeps it unique."""
    limit = longest_name()
    if len(stored) <= limit:
        return stored
    digest = hashlib.sha256(stored.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{stored[: max(limit - 20, 0)]}…#{digest}"


def masked(stored: str) -> str:
    """A stored name for a log line: each part holding a ``^`` (a DICOM person name) or ``,`` is ***.

    Folders are often named after the patient (``DOE^JOHN``, ``Doe, John``); other parts (study,
    series and file names) are kept so that an operator can find the file.
    """
    return "/".join("***" if "^" in part or "," in part else part for part in stored.split("/"))


def series_folder(series_id: int) -> Path:
    """The series' working folder: its de-identified copies and metadata.json."""
    return Path(config().WORK_FOLDER) / f"series-{series_id}"


def working_copy(series_id: int, image_id: int) -> Path:
    return series_folder(series_id) / f"{image_id}.dcm"


# --- originals in a store (STORAGE_URL): keyed by content, so any host finds them by the image row ---


def original_key(digest: str) -> str:
    """An original's key in the store: its SHA-256, so a second upload of the same bytes is a no-op."""
    return f"originals/{digest}"


def kept_key(stored: str) -> str:
    """Where KEEP_ORIGINALS keeps an original in the store: under its name in the input folder."""
    return f"kept/{stored}"


def fetched_original(series_id: int, image_id: int, tag: str) -> Path:
    """A worker's local copy of an original from the store, named by lease generation like its output
    (a stale worker never writes into the new holder's file; leftovers are removed with the series')."""
    return series_folder(series_id) / f"{image_id}.{tag}.orig.dcm"


def _unique(target: Path) -> Path:
    candidate, number = target, 1
    while os.path.lexists(candidate):
        candidate = target.with_name(f"{target.name}.{number}")
        number += 1
    return candidate


def set_aside(stored: str, folder_name: str, source: Path | None = None) -> str:
    """Move an original out of the input folder into quarantine (or kept); returns where it went.

    Files outside the input folder (`sendit import` of another folder) are the user's: never moved.
    A symbolic link is moved as the link, never its target. Raises OSError when the move fails.
    """
    source = source if source is not None else original(stored)
    if not inside_input(stored) or not os.path.lexists(source):
        return ""
    base = Path(config().QUARANTINE_FOLDER) if folder_name == "quarantine" else Path(config().DATA_DIR) / folder_name
    # the stored (escaped, printable) name on disk too: what the dashboard shows is what is there
    target = _unique(base / stored)
    target.parent.mkdir(parents=True, exist_ok=True)
    changed = last_change(source.parent)  # before our own move changes it
    shutil.move(str(source), str(target))  # a rename; across file systems a link is re-made, not followed
    remove_empty_parents(source.parent, changed)
    return str(target)


def set_aside_long(source: Path, stored: str) -> str:
    """Move an entry whose path is too long to record or open into quarantine/too-long/, under a short name.

    Renamed through its folder's descriptor, so a path beyond the kernel's limit can still be moved;
    a folder goes as a whole. Raises OSError (another file system, no permission): it stays in place.
    """
    digest = hashlib.sha256(stored.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    tail = escape_name(source.name)[:100]
    target = _unique(Path(config().QUARANTINE_FOLDER) / "too-long" / f"{digest}-{tail}")
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(source.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        changed = changed_at(os.fstat(folder))
        os.rename(source.name, target, src_dir_fd=folder)
    finally:
        os.close(folder)
    remove_empty_parents(source.parent, changed)
    return str(target)


MAX_REVIEW_BYTES = 1 << 30  # a person's preview or download: 1 GiB at most in memory


def read_original(stored: str, set_aside_at: str = "", stored_key: str = "") -> bytes:
    """The bytes of an original for a person (review page, download of a rejected file): in the
    storage bucket when it has a key there, else where it was set aside (quarantine), else in the
    quarantine folder under its stored name, else in the input folder. The one reader of originals
    for the web.

    Raises FileNotFoundError when none is there, OSError when it cannot be read or is too large.
    A symbolic link is not followed.
    """
    if stored_key:
        return _read_stored(stored_key)
    candidates = [Path(set_aside_at)] if set_aside_at else []
    if inside_input(stored):
        candidates.append(Path(config().QUARANTINE_FOLDER) / real_name(stored))
    candidates.append(original(stored))
    for path in candidates:
        if path.is_symlink() or not path.is_file():
            continue
        if path.stat().st_size > MAX_REVIEW_BYTES:
            raise OSError("the file is too large to show")
        with open(path, "rb") as handle:
            return handle.read()
    raise FileNotFoundError("the original is gone")


def _read_stored(key: str) -> bytes:
    """An original from the storage bucket, through a scratch file in WORK_FOLDER (removed at once)."""
    import tempfile

    from sendit.relay.runtime import store
    from sendit.storage import StoreError

    found = store()
    if found is None:
        raise FileNotFoundError("the original is in a storage bucket, but STORAGE_URL is not set")
    folder = Path(config().WORK_FOLDER)
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=folder, prefix=".review-", suffix=".dcm")
    os.close(handle)
    scratch = Path(name)
    try:
        found.get(key, scratch)
        if scratch.stat().st_size > MAX_REVIEW_BYTES:
            raise OSError("the file is too large to show")
        return scratch.read_bytes()
    except StoreError as exc:
        raise OSError(str(exc)) from None
    finally:
        scratch.unlink(missing_ok=True)


def remove_original(stored: str) -> None:
    """After DONE: delete an original inside the input folder; the user's other folders are left alone."""
    if not inside_input(stored):
        return
    source = original(stored)
    changed = last_change(source.parent)
    source.unlink(missing_ok=True)
    remove_empty_parents(source.parent, changed)


def changed_at(info: os.stat_result) -> float:
    """When an entry last changed: its mtime, or its ctime when the mtime was set ahead of that (a
    tool, a wrong clock). The ctime is the kernel's own clock: it cannot be set back, and no write
    goes without it."""
    return min(info.st_mtime, info.st_ctime)


def last_change(path: Path) -> float | None:
    """When an entry (not followed if a link) last changed, or None when it cannot be looked at."""
    try:
        return changed_at(os.lstat(path))
    except OSError:
        return None


def remove_empty_parents(folder: Path, changed: float | None = None) -> None:
    """Remove emptied folders up to, not including, the input folder itself; never one that changed
    within STABLE_SECONDS, to which a producer may still be writing (the watcher removes it later).

    ``changed`` is when ``folder`` last changed before the caller emptied it (its own removal changed
    it just now); each folder above is looked at before its emptied child is removed.
    """
    settle = config().STABLE_SECONDS
    try:
        root = input_root()
        current = folder.resolve()
    except (OSError, RuntimeError):
        return
    while current != root and root in current.parents:
        if settle > 0:
            if changed is None:
                changed = last_change(current)
            if changed is None or time.time() - changed < settle:
                return
            changed = last_change(current.parent)
        try:
            os.rmdir(current)
        except OSError:
            return
        current = current.parent
