"""Google clients built from the settings, the retry policy, and Google's errors in Sendit's words.

Credentials come from GOOGLE_APPLICATION_CREDENTIALS (a service-account key file) or, when it is
empty, from the environment's default credentials (``gcloud auth application-default login``, the
metadata server of a Google VM). With ``STORAGE_EMULATOR_HOST`` / ``DATASTORE_EMULATOR_HOST`` set the
clients talk to an emulator and need none. A credential, or the text of a Google error (which may
quote a request), never goes into a message: only the HTTP status or the error's type.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from sendit.destinations.base import DestinationError
from sendit.destinations.google.settings import GoogleSettings

# Back-off of the Google clients' own retry (api_core.retry: exponential, with full jitter), bounded
# by GOOGLE_TIMEOUT in all for one call.
INITIAL_BACKOFF = 0.5
MAXIMUM_BACKOFF = 8.0


def credentials(settings: GoogleSettings) -> Any:
    """The key file's credentials, or None for the environment's default (or an emulator)."""
    if not settings.credentials_file:
        return None
    from google.oauth2 import service_account

    try:
        return service_account.Credentials.from_service_account_file(settings.credentials_file)
    except (OSError, ValueError, KeyError) as exc:  # the file's content is a secret: its type only
        raise DestinationError(
            f"GOOGLE_APPLICATION_CREDENTIALS: not a usable service-account key file ({type(exc).__name__})",
            retryable=False,
        ) from None


def project_of(settings: GoogleSettings, creds: Any) -> str | None:
    return settings.project or getattr(creds, "project_id", None) or None


def transient(exc: BaseException) -> bool:
    """429, 5xx, time-outs and dropped connections: worth another try after a back-off."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    return isinstance(
        exc,
        gexc.TooManyRequests
        | gexc.InternalServerError
        | gexc.BadGateway
        | gexc.ServiceUnavailable
        | gexc.GatewayTimeout
        | gexc.DeadlineExceeded
        | requests.ConnectionError
        | requests.Timeout
        | ConnectionError
        | TimeoutError
        | auth_exc.TransportError,
    ) or (isinstance(exc, gexc.GoogleAPICallError) and exc.code is not None and int(exc.code) >= 500)


def retry_policy(settings: GoogleSettings) -> Any:
    from google.api_core.retry import Retry

    return Retry(
        predicate=transient,
        initial=INITIAL_BACKOFF,
        maximum=MAXIMUM_BACKOFF,
        multiplier=2.0,
        timeout=settings.timeout,
    )


def preload() -> None:
    """Import the Google client libraries (about a second of CPU) without making any client."""
    import google.api_core.retry  # noqa: F401
    import google_crc32c  # noqa: F401
    from google.cloud import datastore, storage  # type: ignore[attr-defined]  # noqa: F401


_SHARED: dict[tuple[Any, ...], Any] = {}
_SHARED_LOCK = threading.Lock()


def shared_client(kind: str, settings: GoogleSettings) -> Any:
    """One client per process, thread and settings, kept for the process's life.

    A fresh client pays for its connection on its first call (Datastore's gRPC channel: up to a
    second), and adapters are made anew for every series; a client is never shared between threads,
    nor used again after a fork (the key holds the PID)."""
    key = (kind, os.getpid(), threading.get_ident(), settings)
    with _SHARED_LOCK:
        client = _SHARED.get(key)
    if client is None:
        client = storage_client(settings) if kind == "storage" else datastore_client(settings)
        with _SHARED_LOCK:
            _SHARED[key] = client
            alive = {thread.ident for thread in threading.enumerate()}
            gone = [k for k in _SHARED if k[1] != os.getpid() or k[2] not in alive]
            dropped = [_SHARED.pop(k) for k in gone]  # a finished thread's (a dashboard check's)
        for old in dropped:
            with contextlib.suppress(Exception):
                old.close()
    return client


def storage_client(settings: GoogleSettings) -> Any:
    from google.auth import exceptions as auth_exc
    from google.cloud import storage  # type: ignore[attr-defined]

    creds = credentials(settings)
    try:
        return storage.Client(project=project_of(settings, creds), credentials=creds)
    except auth_exc.DefaultCredentialsError:
        raise no_credentials() from None


def datastore_client(settings: GoogleSettings) -> Any:
    from google.auth import exceptions as auth_exc
    from google.cloud import datastore

    creds = credentials(settings)
    try:
        return datastore.Client(project=project_of(settings, creds), credentials=creds)
    except auth_exc.DefaultCredentialsError:
        raise no_credentials() from None
    except OSError as exc:  # no project could be determined
        raise DestinationError(f"GOOGLE_PROJECT: no project ({type(exc).__name__})", retryable=False) from None


def no_credentials() -> DestinationError:
    return DestinationError(
        "no Google credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file",
        retryable=False,
    )


def explain(exc: BaseException, *, service: str, setting: str, doing: str) -> DestinationError:
    """A Google failure as a DestinationError with words: a refusal or a missing resource is the
    configuration's (not retried, naming the setting to check); the rest passes with time."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    cause = exc.cause if isinstance(exc, gexc.RetryError) and exc.cause is not None else exc
    if isinstance(cause, gexc.Unauthorized | gexc.Forbidden | gexc.PermissionDenied | gexc.Unauthenticated):
        code = getattr(cause, "code", None)
        return DestinationError(
            f"{doing}: {service} refused access ({_status(code)}); check GOOGLE_APPLICATION_CREDENTIALS and "
            f"the account's roles on {setting} (docs/destinations.md)",
            retryable=False,
        )
    if isinstance(cause, auth_exc.RefreshError) and getattr(cause, "retryable", False):
        return DestinationError(f"{doing}: the token service did not answer in time or was busy")
    if isinstance(cause, auth_exc.RefreshError):
        return DestinationError(
            f"{doing}: the credentials were refused ({type(cause).__name__}); check GOOGLE_APPLICATION_CREDENTIALS",
            retryable=False,
        )
    if isinstance(cause, auth_exc.DefaultCredentialsError):
        return no_credentials()
    if isinstance(cause, gexc.NotFound):
        return DestinationError(f"{doing}: {service} answered 404 Not Found; check {setting}", retryable=False)
    if transient(cause) or isinstance(exc, gexc.RetryError):
        return DestinationError(f"{doing}: {service} did not answer in time or was busy ({_status_of(cause)})")
    if isinstance(cause, gexc.GoogleAPICallError):
        return DestinationError(f"{doing}: {service} refused the request ({_status_of(cause)})", retryable=False)
    return DestinationError(f"{doing}: {service} failed ({type(cause).__name__})")


def _status(code: Any) -> str:
    return f"HTTP {int(code)}" if isinstance(code, int) or (code is not None and str(code).isdigit()) else str(code)


def _status_of(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if code is not None and str(code).isdigit():
        return f"HTTP {code}"
    return type(exc).__name__
