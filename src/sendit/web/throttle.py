"""Slow down password and token guessing: failed attempts lock a user name or a client address for a while.

Rule (one counter per user name for logins, one per client address for logins and one for API
tokens): failures with less than :data:`QUIET_SECONDS` between them add up (the quiet time counts
from the end of a lock-out). At :data:`USER_LIMIT` failures for a name, or :data:`ADDRESS_LIMIT`
for an address, it is locked for :data:`FIRST_LOCK_SECONDS`; each further failure doubles the lock,
up to :data:`MAX_LOCK_SECONDS`. During a lock every attempt is refused without checking the
password — the right one too — so guessing gains nothing. A successful login forgets its name's
failures (not its address's, or a guesser could reset them with an account of their own).

Logins are throttled in the authentication backend (:class:`ThrottledModelBackend`), so the admin's
login form is covered too; the dashboard's login view answers a locked attempt with 429 and the wait.
API tokens are throttled per address in :func:`sendit.web.tokens.authenticate`.

Counters live in Django's cache: the in-process LocMemCache of the settings, shared by the threads
of `sendit run`'s web server. Several web processes would each count on their own.

Logs never carry the user name (it may be a person's name): a keyed hash prefix stands for it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest

log = logging.getLogger("sendit.web.throttle")

USER_LIMIT = 5
ADDRESS_LIMIT = 20
QUIET_SECONDS = 300
FIRST_LOCK_SECONDS = 30
MAX_LOCK_SECONDS = 900
LOG_REFUSED_EVERY = 100  # the first refused attempt of a lock-out is logged, then one in this many
CACHE_PREFIX = "sendit:throttle:"
_KEEP_SECONDS = MAX_LOCK_SECONDS + QUIET_SECONDS + 60

_update = threading.Lock()


def now() -> float:
    """The clock (tests replace it)."""
    return time.time()


class Locked(Exception):
    """Too many failed attempts: refuse for ``seconds`` more."""

    def __init__(self, seconds: int) -> None:
        super().__init__(f"too many failed attempts; try again in {seconds} s")
        self.seconds = seconds


@dataclass(frozen=True)
class Counter:
    scope: str  # "login" or "token"
    kind: str  # "user" or "address"
    value: str
    limit: int

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.value.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return f"{CACHE_PREFIX}{self.scope}:{self.kind}:{digest}"

    @property
    def label(self) -> str:
        """For the log: an address as it is, a user name only as a keyed hash prefix."""
        if self.kind == "address":
            return f"address {self.value}"
        secret = str(getattr(settings, "SECRET_KEY", "")).encode("utf-8")
        tag = hmac.new(secret, self.value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:8]
        return f"user #{tag}"


def client_address(request: HttpRequest) -> str:
    """The client's address; behind the TLS proxy (HTTPS = true) the one it appended to X-Forwarded-For."""
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    sendit = getattr(settings, "SENDIT", None)
    if forwarded and sendit is not None and getattr(sendit, "HTTPS", False):
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1][:64]
    return str(request.META.get("REMOTE_ADDR") or "unknown")[:64]


def login_counters(request: HttpRequest | None, username: str) -> list[Counter]:
    """The user name's counter first, then the address's (none without a request, e.g. a shell)."""
    counters = [Counter("login", "user", username.strip().lower(), USER_LIMIT)]
    if request is not None:
        counters.append(Counter("login", "address", client_address(request), ADDRESS_LIMIT))
    return counters


def token_counters(request: HttpRequest) -> list[Counter]:
    return [Counter("token", "address", client_address(request), ADDRESS_LIMIT)]


def _lock_seconds(failures: int, limit: int) -> int:
    return int(min(MAX_LOCK_SECONDS, FIRST_LOCK_SECONDS * 2 ** min(failures - limit, 20)))


def check(counters: list[Counter]) -> None:
    """Raise :class:`Locked` when any counter is locked now; the refusal is counted for the log."""
    moment = now()
    wait = 0
    with _update:
        for counter in counters:
            state: dict[str, Any] | None = cache.get(counter.key)
            if not state or state["until"] <= moment:
                continue
            wait = max(wait, math.ceil(state["until"] - moment))
            state["refused"] += 1
            if state["refused"] % LOG_REFUSED_EVERY == 1:
                log.warning(
                    "%s attempt throttled: %s is locked for %d s more (%d refused in this lock-out)",
                    counter.scope,
                    counter.label,
                    math.ceil(state["until"] - moment),
                    state["refused"],
                )
            cache.set(counter.key, state, _KEEP_SECONDS)
    if wait:
        raise Locked(wait)


def fail(counters: list[Counter]) -> None:
    """Count one failed attempt; lock a counter that reached its limit (and log it)."""
    moment = now()
    with _update:
        for counter in counters:
            state: dict[str, Any] | None = cache.get(counter.key)
            if not state or moment - max(state["last"], state["until"]) > QUIET_SECONDS:
                state = {"failures": 0, "last": 0.0, "until": 0.0, "refused": 0}
            state["failures"] += 1
            state["last"] = moment
            if state["failures"] >= counter.limit:
                seconds = _lock_seconds(state["failures"], counter.limit)
                state["until"] = moment + seconds
                state["refused"] = 0
                log.warning(
                    "%s throttled: %s locked for %d s after %d failed attempts",
                    counter.scope,
                    counter.label,
                    seconds,
                    state["failures"],
                )
            cache.set(counter.key, state, _KEEP_SECONDS)


def forget(counters: list[Counter]) -> None:
    cache.delete_many([counter.key for counter in counters])


class ThrottledModelBackend(ModelBackend):
    """Django's user/password check behind the throttle: while locked, the password is not even checked."""

    def authenticate(
        self, request: HttpRequest | None, username: str | None = None, password: str | None = None, **kwargs: Any
    ) -> Any | None:
        if username is None:
            username = kwargs.get(get_user_model().USERNAME_FIELD)
        if username is None or password is None:
            return None
        counters = login_counters(request, str(username))
        try:
            check(counters)
        except Locked:
            raise PermissionDenied from None  # stops django.contrib.auth.authenticate: no other backend runs
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            fail(counters)
        else:
            forget(counters[:1])  # the name's failures; the address keeps its count
        return user
