"""Bearer tokens for scripts (the API and /metrics): issued once, stored as SHA-256 only."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from django.http import HttpRequest
from django.utils import timezone

from sendit.relay.models import ApiToken
from sendit.web import throttle

PREFIX = "sndt_"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def issue(user: Any, name: str = "") -> str:
    """A new token for ``user``; the only time its text exists outside the caller is this return value."""
    key = PREFIX + secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, name=name[:100], key_hash=_digest(key), prefix=key[: len(PREFIX) + 6])
    return key


def user_for(key: str) -> Any | None:
    """The active user a token belongs to, or None; notes when it was last used (at most once a minute)."""
    if not key.startswith(PREFIX):
        return None
    token = ApiToken.objects.select_related("user").filter(key_hash=_digest(key)).first()
    if token is None or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used is None or token.last_used < now - timedelta(minutes=1):
        ApiToken.objects.filter(pk=token.pk).update(last_used=now)
    return token.user


def authenticate(request: HttpRequest, key: str) -> Any | None:
    """:func:`user_for`, throttled per client address: raises ``throttle.Locked`` after repeated wrong
    tokens (the right one is refused too until the lock-out ends)."""
    counters = throttle.token_counters(request)
    throttle.check(counters)
    user = user_for(key)
    if user is None:
        throttle.fail(counters)
    return user


def bearer_user(request: HttpRequest) -> Any | None:
    """The user of an ``Authorization: Bearer <token>`` header, or None; may raise ``throttle.Locked``."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return authenticate(request, key.strip())
