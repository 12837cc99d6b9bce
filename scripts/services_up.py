"""Exit 0 when the PostgreSQL and Redis given as URLs answer; the test script's second pass needs both."""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

import psycopg
import redis


def main(pg_url: str, redis_url: str) -> int:
    problems = []
    try:
        maintenance = urlsplit(pg_url)._replace(path="/postgres").geturl()  # the test database may not exist yet
        with psycopg.connect(maintenance, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        problems.append(f"PostgreSQL: {type(exc).__name__}")
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=3).ping()
    except Exception as exc:
        problems.append(f"Redis: {type(exc).__name__}")
    for line in problems:
        print(f"services: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
