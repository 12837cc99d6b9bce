"""Walking an input folder: which entries are looked at, and what each one is. One walk, two users:
the relay's scan (:mod:`sendit.relay.ingest`) and ``sendit deid IN OUT`` (:mod:`sendit.deid.folder`).

Rules (docs/operations.md):

* in progress: a name whose last dot-part starts with ``tmp``, any case (``NAME.tmp``,
  ``NAME.tmpXXXX``, also ``x.tmpl``); never read; a folder so named is not entered.
* hidden: a name starting with ``.``; never read; a hidden folder is not entered.
* both are counted by rule (:data:`IN_PROGRESS`, :data:`HIDDEN`), never silently dropped.
* a symbolic link is never followed, at any depth below the root: it is reported as a link.
* a device, pipe or socket is reported as such, never opened.
* the walk is sorted name by name at every level, so the order is the same on every scan (of two
  copies of one instance, the one whose path sorts first comes first).
* an entry that disappears between the listing and the look at it is passed over: the next walk
  sees whatever is there.
"""

from __future__ import annotations

import enum
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Counter keys: entries left alone on purpose, by rule.
IN_PROGRESS = "in_progress"
HIDDEN = "hidden"

# Reasons for the entries that are not files to read.
SYMLINK = "symbolic link; not followed"
NOT_REGULAR = "not a regular file (a device, pipe or socket)"


def in_progress(name: str) -> bool:
    """The producer's convention `NAME.tmpXXXX`: the last dot-part of the name starts with `tmp` (any case)."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot + 1 :].lower().startswith("tmp")


def hidden(name: str) -> bool:
    """Hidden files (`.name`): editors' and rsync's temporary files, `.DS_Store`; never read."""
    return name.startswith(".")


class Kind(enum.Enum):
    """What a walked entry is."""

    FILE = "file"  # a regular file: the one kind to read
    LINK = "link"  # a symbolic link (to anything, or to nothing): never followed
    SPECIAL = "special"  # a device, pipe or socket
    UNREADABLE_FOLDER = "unreadable folder"  # a folder whose listing failed (permissions)
    FOLDER = "folder"  # a folder the caller's ``enter`` declined


@dataclass(frozen=True, slots=True)
class Found:
    """One entry of a walk; ``rel`` is its path below the root, names joined by ``/``; ``problem``
    says why anything but a FILE cannot be read."""

    path: Path
    rel: str
    kind: Kind
    problem: str = ""


def walk(
    root: Path,
    *,
    ignored: Counter[str] | None = None,
    name: Callable[[str], str] = str,
    enter: Callable[[Path, str], bool] | None = None,
    listed: Callable[[Path, int], None] | None = None,
) -> Iterator[Found]:
    """Every entry under ``root`` (in name order at each level) except those ignored by rule, which
    are counted in ``ignored``.

    ``name`` turns each name as the OS gives it into its part of ``rel`` (the relay escapes
    undecodable bytes). A folder is entered when ``enter(path, rel)`` says so (default: always),
    else reported as :attr:`Kind.FOLDER`. ``listed(folder, n)`` hears of each folder listed, ``root``
    first, with its number of entries of any kind (the relay's watcher tidies away the folders it
    emptied). ``root`` itself may be a link; nothing below it is followed. Raises only when ``root``
    cannot be listed.
    """
    counts: Counter[str] = ignored if ignored is not None else Counter()
    stack = [iter(_listing(root, "", name, listed))]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        dirent, rel = item
        if in_progress(dirent.name):
            counts[IN_PROGRESS] += 1
            continue
        if hidden(dirent.name):
            counts[HIDDEN] += 1
            continue
        path = Path(dirent.path)
        try:
            link = dirent.is_symlink()
            folder = dirent.is_dir(follow_symlinks=False)
            regular = dirent.is_file(follow_symlinks=False)
        except OSError:
            continue  # gone since the listing
        if link:
            yield Found(path, rel, Kind.LINK, SYMLINK)
        elif folder:
            if enter is not None and not enter(path, rel):
                yield Found(path, rel, Kind.FOLDER)
                continue
            try:
                stack.append(iter(_listing(path, rel, name, listed)))
            except (FileNotFoundError, NotADirectoryError):
                pass  # moved or removed since the listing: the next walk sees what is there
            except OSError as exc:
                yield Found(path, rel, Kind.UNREADABLE_FOLDER, f"folder cannot be read ({exc.strerror})")
        elif not regular:
            yield Found(path, rel, Kind.SPECIAL, NOT_REGULAR)
        else:
            yield Found(path, rel, Kind.FILE)


def _listing(
    folder: Path, rel: str, name: Callable[[str], str], listed: Callable[[Path, int], None] | None
) -> list[tuple[os.DirEntry[str], str]]:
    with os.scandir(folder) as entries:
        ordered = sorted(entries, key=lambda entry: entry.name)
    if listed is not None:
        listed(folder, len(ordered))
    prefix = rel + "/" if rel else ""
    return [(entry, prefix + name(entry.name)) for entry in ordered]
