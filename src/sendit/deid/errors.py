"""Why an image could not be de-identified. Every message names the tag and the rule, never a value
(the underlying exception is dropped with ``from None``: its text may quote the value)."""

from __future__ import annotations


class DeidError(Exception):
    """An image could not be de-identified and must not be sent. The message carries no PHI."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BurnedInError(DeidError):
    """The image may show identifying text in its pixels and no rule can blank it: quarantine."""
