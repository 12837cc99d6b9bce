"""The one small interface every destination adapter implements.

The shell hands a destination de-identified files of one series; the destination says, per image,
whether it was delivered, and can later count what it holds for that series (verification).

A *series destination* keeps something per series rather than per image (a NIfTI volume made from
the whole series, a metadata entity): the shell hands it the series once every image of it has been
delivered to and verified at every image destination, and the images become DONE only after it
answered. What it returns (links to what it made, notes) is handed to the series destinations after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


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


@dataclass(frozen=True)
class OutgoingSeries:
    """One series whose images every image destination holds; all values free of PHI.

    ``metadata`` is the allow-listed document of :mod:`sendit.deid.metadata` (None when it could not
    be made); ``links`` what the series destinations before this one made (``gs://...`` names).
    """

    patient_id: str  # the pseudonym
    study_uid: str
    series_uid: str
    images: tuple[OutgoingImage, ...]
    metadata: dict[str, Any] | None = None
    links: tuple[str, ...] = ()


@dataclass(frozen=True)
class SeriesOutcome:
    """What a series destination made (``links``) and what the operator should know (``notes``, e.g.
    "not convertible to NIfTI"); a failure is a DestinationError instead."""

    links: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


class SeriesDestination(Protocol):
    name: str

    def deliver_series(self, series: OutgoingSeries) -> SeriesOutcome:
        """Deliver and read back the series-level object(s); idempotent (a second call changes nothing).

        Raises DestinationError (retryable or not) when it could not; the images then wait.
        """
        ...

    def check(self) -> str | None:
        """None when reachable and writable, otherwise a one-line reason."""
        ...

    def close(self) -> None: ...
