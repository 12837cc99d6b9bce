"""Template context every page gets: the running version, for the header (an operator reporting a
problem should not have to ask the host which release it runs)."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest


def version(request: HttpRequest) -> dict[str, str]:
    return {"sendit_version": settings.SENDIT_VERSION}
