"""Destination adapters: where de-identified images go."""

from sendit.destinations.base import Destination, DestinationError, OutgoingImage, SendResult

__all__ = ["Destination", "DestinationError", "OutgoingImage", "SendResult"]
