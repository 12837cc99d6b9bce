"""Entry points of spawned worker processes; no Django import at module level, as the child unpickles
these names before Django is set up."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sendit.relay.pipeline import Outcome


def setup() -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sendit.server.settings")
    django.setup()


def process(series_id: int) -> Outcome:
    from django.db import connections

    from sendit.relay.pipeline import process_series

    try:
        return process_series(series_id)
    finally:
        connections.close_all()
