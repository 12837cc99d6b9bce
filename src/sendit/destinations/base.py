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
    """The outcome for one image. ``permanent`` failures are not retried.

    A failure is the image's own unless ``destination_fault`` is set: then the image was not tried,
    or the destination was failing for everything when its turn came, so the failure says nothing
    about the image and must not count toward giving up on it (it is simply sent again later).
    Messages name the destination, the image by its id and the cause, never a DICOM value.
    """

    image_id: int
    delivered: bool
    permanent: bool = False
    status: int | None = None
    message: str = ""
    destination_fault: bool = False

    @property
    def warning(self) -> bool:
        return self.delivered and bool(self.message)


class Destination(Protocol):
    name: str

    def send(self, images: Sequence[OutgoingImage]) -> list[SendResult]:
        """Deliver what it can; one result per image, in order.

        One image the destination chokes on (refused, timed out, aborted) fails alone: the others are
        still sent. Raises DestinationError only when the destination as a whole fails (cannot be
        reached, refuses us, or fails every image in a row while its own health check fails too).
        """
        ...

    def missing(self, series_uid: str, sop_instance_uids: set[str]) -> set[str]:
        """The SOPInstanceUIDs of this series that the destination does not hold."""
        ...

    def check(self) -> str | None:
        """None when reachable and writable, otherwise a one-line reason."""
        ...

    def close(self) -> None: ...
