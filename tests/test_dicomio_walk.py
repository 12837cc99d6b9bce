"""The one folder walk (``sendit.dicomio.walk``) that the relay's scan and ``sendit deid`` share."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from sendit.dicomio import Kind, walk


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_the_walk_is_sorted_counts_what_it_ignores_and_never_follows_a_link(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for name in ("b/2.dcm", "a.dcm", "c.dcm.tmp123", ".hidden", ".cache/3.dcm", "part.TMP/4.dcm"):
        _touch(root / name)
    _touch(tmp_path / "outside" / "5.dcm")
    (root / "link").symlink_to(tmp_path / "outside")
    (root / "link.dcm").symlink_to(tmp_path / "outside" / "5.dcm")
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(root / "pipe")
    ignored: Counter[str] = Counter()

    found = [(entry.rel, entry.kind) for entry in walk(root, ignored=ignored)]

    assert found == [
        ("a.dcm", Kind.FILE),
        ("b/2.dcm", Kind.FILE),
        ("dangling", Kind.LINK),
        ("link", Kind.LINK),
        ("link.dcm", Kind.LINK),
        ("pipe", Kind.SPECIAL),
    ]
    assert ignored == {"in_progress": 2, "hidden": 2}  # a folder so named counts once, its files not at all


def test_a_declined_folder_is_reported_and_names_are_given_to_the_caller(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _touch(root / "keep" / "1.dcm")
    _touch(root / "skip" / "2.dcm")

    found = list(walk(root, name=str.upper, enter=lambda path, rel: rel != "SKIP"))

    assert [(entry.rel, entry.kind) for entry in found] == [("KEEP/1.DCM", Kind.FILE), ("SKIP", Kind.FOLDER)]
    assert found[0].path == root / "keep" / "1.dcm"


def test_a_folder_that_cannot_be_listed_is_reported_and_the_rest_walked(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _touch(root / "closed" / "1.dcm")
    _touch(root / "open" / "2.dcm")
    (root / "closed").chmod(0)
    try:
        if os.access(root / "closed", os.R_OK):
            pytest.skip("this user reads any folder (root)")
        found = [(entry.rel, entry.kind) for entry in walk(root)]
    finally:
        (root / "closed").chmod(0o755)
    assert found == [("closed", Kind.UNREADABLE_FOLDER), ("open/2.dcm", Kind.FILE)]
