"""Shared fixtures. Tests that touch the database are marked `db` and run again on PostgreSQL + Redis."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

pytest_plugins = ["tests.orthanc", "tests.dasher_server", "tests.google", "tests.s3"]


# Fixtures that start a server process (Orthanc, the Google stand-ins, the stand-in S3 server): a test
# using one, directly or through another fixture, is slow, so `pytest -m "not slow"` stays a fast loop.
# CI runs everything.
SLOW_FIXTURES = frozenset(
    {"orthanc_factory", "orthanc_server", "gcs_server", "datastore_emulator", "google_env", "s3_server", "s3_bucket"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("django_db"):
            item.add_marker(pytest.mark.db)
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def sendit_dirs(tmp_path: Path, settings: object) -> Iterator[dict[str, Path]]:
    """Fresh input/work/quarantine/output folders for one test, wired into the live configuration."""
    from django.conf import settings as dj

    from sendit.relay import runtime

    folders = {name: tmp_path / name.lower() for name in ("INPUT_FOLDER", "WORK_FOLDER", "QUARANTINE_FOLDER")}
    folders["OUTPUT_FOLDER"] = tmp_path / "output"
    folders["DATA_DIR"] = tmp_path
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    old = dj.SENDIT
    dj.SENDIT = replace(old, **folders)
    runtime.identifier_provider.cache_clear()
    yield folders
    dj.SENDIT = old
    runtime.identifier_provider.cache_clear()


@pytest.fixture
def reconfigure(sendit_dirs: dict[str, Path]) -> Iterator[object]:
    """Change configuration values for one test (restored by ``sendit_dirs``)."""
    from django.conf import settings as dj

    from sendit.relay import runtime

    def apply(**values: object) -> None:  # a misspelt key or a value of the wrong type is a TypeError
        dj.SENDIT = replace(dj.SENDIT, **values)
        runtime.identifier_provider.cache_clear()

    yield apply
