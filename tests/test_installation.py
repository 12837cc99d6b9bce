"""One installation: one schema change at a time, one key, one requeuer (issue 13, item 3)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sendit.relay.installation import KeyMismatch, check_key, key_fingerprint
from sendit.relay.models import Installation
from tests.test_cli import SECRET, cli_env

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_first_key_is_recorded_and_another_is_refused() -> None:
    check_key("the-installations-key-0123456789-abcdefghij")
    check_key("the-installations-key-0123456789-abcdefghij")  # the same key again: fine
    with pytest.raises(KeyMismatch) as refused:
        check_key("another-key-0123456789-abcdefghij-klmnopqrs")
    assert "SECRET_KEY differs" in str(refused.value)
    assert "another-key" not in str(refused.value) and "installations-key" not in str(refused.value)
    stored = Installation.objects.get().value
    assert stored == key_fingerprint("the-installations-key-0123456789-abcdefghij")
    assert "0123456789" not in stored  # a digest, never the key


def test_one_consumer_of_many_runs_the_periodic_requeue() -> None:
    from sendit.relay.tasks import my_turn

    assert my_turn("requeue", 50)
    assert not my_turn("requeue", 50)  # a second consumer in the same minute: skips
    assert my_turn("other-job", 50)


def _fresh_postgres_url() -> tuple[str, str] | None:
    from django.db import connection

    if connection.vendor != "postgresql":
        return None
    settings = connection.settings_dict
    name = f"sendit_fresh_{uuid.uuid4().hex[:8]}"
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    url = f"postgres://{settings['USER']}@{settings['HOST'] or '127.0.0.1'}:{settings['PORT'] or 5432}/{name}"
    return url, name


@pytest.mark.slow
def test_three_hosts_starting_at_once_on_a_fresh_database_all_start(tmp_path: Path) -> None:
    """Every worker migrates at start (`sendit migrate` is the same step): they take turns instead of one
    crashing in `migrate`."""
    from django.db import connection

    (tmp_path / "sendit.toml").write_text(f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\n')
    fresh = _fresh_postgres_url()
    extra = {"DATABASE_URL": fresh[0]} if fresh else {}
    try:
        starts = [
            subprocess.Popen(
                [sys.executable, "-m", "sendit", "migrate"],
                cwd=tmp_path,
                env=cli_env(tmp_path, **extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in starts]
        for process in starts:
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()
        assert [code for code, _ in results] == [0, 0, 0], [err[-300:] for _, err in results]
    finally:
        if fresh:
            with connection.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{fresh[1]}" WITH (FORCE)')


@pytest.mark.slow
def test_a_process_with_another_key_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "sendit.toml").write_text(f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\n')
    first = subprocess.run(
        [sys.executable, "-m", "sendit", "migrate"], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    other = cli_env(tmp_path, SENDIT_SECRET_KEY="a-different-key-0123456789-abcdefghijklmn")
    refused = subprocess.run(
        [sys.executable, "-m", "sendit", "migrate"], cwd=tmp_path, env=other, capture_output=True, text=True
    )
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SECRET_KEY differs" in lines[0], refused.stderr
    assert "a-different-key" not in refused.stderr and SECRET not in refused.stderr
    assert os.path.exists(tmp_path / "data")
