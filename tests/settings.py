"""Test settings: Sendit's own settings on a throw-away data folder and secret.

DATABASE_URL / SENDIT_QUEUE_URL from the environment switch the run to PostgreSQL + Redis.
"""

import os
import tempfile
from pathlib import Path

_data = Path(tempfile.mkdtemp(prefix="sendit-test-"))
_config = _data / "sendit.toml"
_config.write_text("", encoding="utf-8")
os.environ["SENDIT_CONFIG"] = str(_config)
os.environ.setdefault("SENDIT_SECRET_KEY", "test-secret-key-that-is-long-enough-0123456789")
# pytest-xdist: each of its processes gets a database of its own from pytest-django (a `_gwN` suffix
# on PostgreSQL; a SQLite file in the folder above) and here a Redis database of its own, counting
# down from the pass's: gw0 keeps it, gw1 takes the one below, and so on
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
_queue = os.environ.get("SENDIT_QUEUE_URL", "")
if _worker.startswith("gw") and _queue.startswith(("redis://", "rediss://")):
    _base, _, _db = _queue.rpartition("/")
    if _db.isdigit() and int(_db) >= int(_worker[2:]):
        os.environ["SENDIT_QUEUE_URL"] = f"{_base}/{int(_db) - int(_worker[2:])}"
os.environ["SENDIT_DATA_DIR"] = str(_data)
os.environ.setdefault("SENDIT_RETRY_BASE_SECONDS", "0")
os.environ.setdefault("SENDIT_LEASE_SECONDS", "10")
# files a test writes are complete at once; tests/test_stable_files.py sets a settle time itself
os.environ.setdefault("SENDIT_STABLE_SECONDS", "0")

from sendit.server.settings import *  # noqa: E402,F403
from sendit.server.settings import DATABASES  # noqa: E402

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # a file, not memory: threads of the watcher test share it
    DATABASES["default"]["TEST"] = {"NAME": str(_data / "test.sqlite3")}

# Django's advice for test runs: a fast hasher for the many users and logins the web tests make
# (PBKDF2's 600,000 rounds cost about a second a login on these shared cores). The product keeps
# Django's default; the browser tests' `sendit run` uses the product's settings, not these.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
