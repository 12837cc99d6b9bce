"""The Huey instance: SqliteHuey in the data folder by default, RedisHuey for a `redis://` QUEUE_URL
(`rediss://` for Redis over TLS: redis-py takes the certificate options from the URL's query)."""

from __future__ import annotations

from huey import RedisHuey, SqliteHuey
from huey.api import Huey

from sendit.config import Config


def make_huey(cfg: Config, immediate: bool = False) -> Huey:
    url: str = cfg.QUEUE_URL
    if url.startswith(("redis://", "rediss://")):
        return RedisHuey("sendit", url=url, immediate=immediate)
    filename = url[len("sqlite:///") :]
    return SqliteHuey("sendit", filename=filename, immediate=immediate, timeout=30)
