"""The connections of an HTTP destination (Orthanc's REST API, DICOMweb): one httpx.Client with a
bounded keep-alive pool, shared by as many threads as it has connections."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import httpx

T = TypeVar("T")
R = TypeVar("R")


class HttpPool:
    """``where`` is the URL without credentials: it names the server in messages and logs."""

    def __init__(
        self,
        url: str,
        *,
        auth: httpx.Auth | None,
        concurrency: int,
        timeout: float,
        connect_timeout: float,
        verify: bool,
        thread_name: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.url = url.rstrip("/")
        self.where = str(httpx.URL(self.url).copy_with(username=None, password=None))
        self.concurrency = concurrency
        self.timeout = timeout
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(
            base_url=self.url,
            auth=auth,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            # retries=1 re-dials a failed connect once (e.g. a pooled connection to a restarted server)
            transport=httpx.HTTPTransport(retries=1, limits=limits, verify=verify),
            headers=dict(headers or {}),
        )
        self._thread_name = thread_name
        self._threads: ThreadPoolExecutor | None = None

    def map(self, work: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``work`` on each item, ``concurrency`` at a time; results in the items' order."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.concurrency, thread_name_prefix=self._thread_name)
        return list(self._threads.map(work, items))

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
        self.client.close()
