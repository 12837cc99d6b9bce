"""What every process of one installation agrees on before it starts work: one schema, one key.

Many workers on many hosts start at once: the schema is migrated by one of them at a time (a
PostgreSQL advisory lock, or a lock file beside the SQLite database), and a process whose SECRET_KEY
differs from the one the database was first used with refuses to start — its UIDs and pseudonyms
would not match the ones already delivered.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.db import connection

#: an arbitrary, fixed 64-bit number: the advisory lock all Sendit processes take to migrate
MIGRATION_LOCK = 0x53454E444954  # "SENDIT"
KEY_FINGERPRINT = "secret_key_fingerprint"


class KeyMismatch(Exception):
    """This process's SECRET_KEY is not the installation's."""


@contextmanager
def _migration_lock(data_dir: Path) -> Iterator[None]:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK])
        try:
            yield
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK])
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "migrate.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def migrate(data_dir: Path) -> None:
    """Bring the schema up to date; processes starting together take turns (the later ones find
    nothing to do)."""
    from django.core.management import call_command

    with _migration_lock(data_dir):
        call_command("migrate", verbosity=0, interactive=False)


def key_fingerprint(secret_key: str) -> str:
    """A keyed digest: tells keys apart without revealing or weakening them."""
    return hmac.new(secret_key.encode(), b"sendit installation key fingerprint", hashlib.sha256).hexdigest()[:16]


def check_key(secret_key: str) -> None:
    """Record the key's fingerprint on first use; refuse a different key afterwards."""
    from sendit.relay.models import Installation

    mine = key_fingerprint(secret_key)
    # ignore_conflicts: another process recording it at the same moment wins; its row is read below
    Installation.objects.bulk_create([Installation(name=KEY_FINGERPRINT, value=mine)], ignore_conflicts=True)
    recorded = Installation.objects.filter(name=KEY_FINGERPRINT).values_list("value", flat=True).first()
    if recorded is not None and recorded != mine:
        raise KeyMismatch(
            f"SECRET_KEY differs from the key this database was first used with (fingerprint {recorded[:8]}…, "
            f"this key {mine[:8]}…): use that installation's key on every host"
        )
