"""Template context every page gets: the running version, for the header (an operator reporting a
problem should not have to ask the host which release it runs)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest


def version(request: HttpRequest) -> dict[str, Any]:
    """The version, and what the user's role allows (the pages show only the buttons that work)."""
    from sendit.relay import roles
    from sendit.web import actions

    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"sendit_version": settings.SENDIT_VERSION}
    return {
        "sendit_version": settings.SENDIT_VERSION,
        "role": roles.role_of(user),
        "allowed_actions": " ".join(actions.allowed(user)),
        "may_review": user.has_perm(roles.REVIEW),
    }
