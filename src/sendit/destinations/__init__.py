"""Destination adapters: where de-identified images go."""

from sendit.destinations.base import (
    Destination,
    DestinationError,
    OutgoingImage,
    OutgoingSeries,
    SendResult,
    SeriesDestination,
    SeriesOutcome,
)

__all__ = [
    "Destination",
    "DestinationError",
    "OutgoingImage",
    "OutgoingSeries",
    "SendResult",
    "SeriesDestination",
    "SeriesOutcome",
]
