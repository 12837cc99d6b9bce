"""The store interface on its folder adapter, and the storage settings: no server needed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sendit.config import ConfigError, load_config
from sendit.storage import FolderStore, S3Store, StoreConflict, open_store


def test_a_create_only_write_keeps_the_first_bytes_and_names_a_conflict(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "store")
    first, other = tmp_path / "first.dcm", tmp_path / "other.dcm"
    first.write_bytes(b"first bytes")
    other.write_bytes(b"other bytes")
    digest = hashlib.sha256(b"first bytes").hexdigest()

    assert store.put_new(f"originals/{digest}", first, digest) is True
    assert store.put_new(f"originals/{digest}", first, digest) is False  # already there: the same bytes
    assert store.put_new(f"originals/{digest}", b"first bytes", digest) is False  # from memory alike
    with pytest.raises(StoreConflict, match="other content"):
        store.put_new(f"originals/{digest}", other, hashlib.sha256(b"other bytes").hexdigest())
    with pytest.raises(StoreConflict, match="other content"):
        store.put_new(f"originals/{digest}", b"other bytes", hashlib.sha256(b"other bytes").hexdigest())

    fetched = tmp_path / "fetched.dcm"
    store.get(f"originals/{digest}", fetched)
    assert fetched.read_bytes() == b"first bytes"
    store.delete(f"originals/{digest}")
    store.delete(f"originals/{digest}")  # twice is no error: clean-up may run again
    with pytest.raises(FileNotFoundError):
        store.get(f"originals/{digest}", fetched)
    assert [p.name for p in (tmp_path / "store" / "originals").iterdir()] == []  # no temporary left


def test_storage_url_names_a_bucket_a_folder_or_nothing() -> None:
    assert open_store("") is None
    assert isinstance(open_store("file:///srv/originals"), FolderStore)
    s3 = open_store("s3://sendit-originals/site-a", endpoint_url="http://127.0.0.1:9", access_key_id="k")
    assert isinstance(s3, S3Store) and s3.location == "s3://sendit-originals/site-a/ at http://127.0.0.1:9"


@pytest.mark.parametrize(
    "url", ["s3://", "s3://Bad_Bucket/x", "s3://key:secret@bucket/x", "ftp://host/x", "/srv/originals"]
)
def test_a_wrong_storage_url_is_one_line_without_the_secret(tmp_path: Path, url: str) -> None:
    env = {"SENDIT_SECRET_KEY": "k" * 40, "SENDIT_DATA_DIR": str(tmp_path), "SENDIT_STORAGE_URL": url}
    with pytest.raises(ConfigError) as info:
        load_config(None, env=env)
    assert info.value.problems == [
        "STORAGE_URL: must be empty, s3://bucket/prefix or file:///folder (credentials go in S3_*)"
    ]
    assert "secret" not in str(info.value)


def test_the_s3_secret_is_never_shown(tmp_path: Path) -> None:
    env = {
        "SENDIT_SECRET_KEY": "k" * 40,
        "SENDIT_DATA_DIR": str(tmp_path),
        "SENDIT_STORAGE_URL": "s3://sendit-originals/site-a",
        "SENDIT_S3_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "SENDIT_S3_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-example-secret",
    }
    shown = load_config(None, env=env).masked()
    assert shown["S3_SECRET_ACCESS_KEY"] == "****** (set)"
    assert "wJalrXUtnFEMI" not in repr(shown)
