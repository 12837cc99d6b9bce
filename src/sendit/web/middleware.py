"""A number in a request that the database cannot hold is the client's error (400), not a server error.

Django turns most too-large ids into "not found" itself, but not all lookups (the admin's filters on a
foreign key, `?series=99999999999999999999999`): SQLite then raises OverflowError and PostgreSQL
"numeric value out of range" (SQLSTATE 22003). The API validates its ids before any query (422).
"""

from __future__ import annotations

from collections.abc import Callable

from django.db import DataError
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

OUT_OF_RANGE_SQLSTATE = "22003"


def out_of_range(exc: BaseException) -> bool:
    if isinstance(exc, OverflowError):
        return "SQLite INTEGER" in str(exc)  # sqlite3: "Python int too large to convert to SQLite INTEGER"
    if isinstance(exc, DataError):
        cause = exc.__cause__
        return getattr(cause, "sqlstate", None) == OUT_OF_RANGE_SQLSTATE or getattr(cause, "pgcode", None) == (
            OUT_OF_RANGE_SQLSTATE
        )
    return False


class OutOfRangeMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if out_of_range(exception):
            return HttpResponseBadRequest("a number in the request is out of range", content_type="text/plain")
        return None
