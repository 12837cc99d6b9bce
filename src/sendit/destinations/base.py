"""The one small interface every destination adapter implements.

The shell hands a destination de-identified files of one series; the destination says, per image,
whether it was delivered, and can later count what it holds for that series (verification).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class DestinationError(Exception):
    """A destination-wide failure (unreachable, refused) that stops a whole batch."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class OutgoingImage:
    """A de-identified file ready to deliver; all values here are already free of PHI."""

    image_id: int
    path: Path
    patient_id: str  # the pseudonym
    study_uid: str  # de-identified
    series_uid: str  # de-identified
    sop_instance_uid: str  # de-identified
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class SendResult:
    """The outcome for one image. ``permanent`` failures are not retried."""

    image_id: int
    delivered: bool
    permanent: bool = False
    status: int | None = None
    message: str = ""

    @property
    def warning(self) -> bool:
        return self.delivered and bool(self.message)


class Destination(Protocol):
    name: str

    def send(self, images: Sequence[OutgoingImage]) -> list[SendResult]:
        """Deliver what it can; one result per image, in order. Raises DestinationError when it can't try."""
        ...

    def missing(self, series_uid: str, sop_instance_uids: set[str]) -> set[str]:
        """The SOPInstanceUIDs of this series that the destination does not hold."""
        ...

    def check(self) -> str | None:
        """None when reachable and writable, otherwise a one-line reason."""
        ...

    def close(self) -> None: ...
