"""DIMSE status codes in words, and what each means for delivery.

The words are pynetdicom's (its Storage Service Class table, PS3.4 B.2.3 with the general statuses of
PS3.7 Annex C); the one column that is ours is what the relay does with the image: delivered, delivered
with a note, retried, or failed for good. So an operator-facing message ("0xA900 Data Set Does Not
Match SOP Class") and the retry decision come from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pynetdicom.status import (
    PROCEDURE_STEP_STATUS,
    STATUS_UNKNOWN,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)


class StatusClass(Enum):
    """What the shell should do with an image after the peer answered."""

    DELIVERED = "delivered"
    WARNING = "warning"  # delivered, with a note worth keeping
    RETRYABLE = "retryable"  # not stored; the same bytes may succeed later
    PERMANENT = "permanent"  # not stored; re-sending the same bytes will fail again


@dataclass(frozen=True)
class StatusInfo:
    code: int
    status_class: StatusClass
    meaning: str

    @property
    def delivered(self) -> bool:
        return self.status_class in (StatusClass.DELIVERED, StatusClass.WARNING)

    @property
    def permanent(self) -> bool:
        return self.status_class is StatusClass.PERMANENT

    def describe(self) -> str:
        return f"0x{self.code:04X} {self.meaning}"


_D, _W, _R, _P = StatusClass.DELIVERED, StatusClass.WARNING, StatusClass.RETRYABLE, StatusClass.PERMANENT

# Our column. A resource or protocol hiccup is retryable; anything about the data or the peer's
# capabilities is permanent, because re-sending the same bytes cannot change the answer.
_EXACT: dict[int, StatusClass] = {
    0x0000: _D,
    0x0001: _W,
    0x0107: _W,
    0x0116: _W,
    0xB000: _W,
    0xB006: _W,
    0xB007: _W,
    0x0105: _P,
    0x0106: _P,
    0x0110: _R,
    0x0117: _P,
    0x0118: _P,
    0x0119: _P,
    0x0120: _P,
    0x0121: _P,
    0x0122: _P,
    0x0124: _P,
    0x0210: _R,
    0x0211: _P,
    0x0212: _P,
    0x0213: _R,
    0xFE00: _R,
}

# Ranges, checked after exact codes: (first, last, class).
_RANGES: tuple[tuple[int, int, StatusClass], ...] = (
    (0xA700, 0xA7FF, _R),  # Refused: Out of Resources
    (0xA900, 0xA9FF, _P),  # Data Set Does Not Match SOP Class
    (0xC000, 0xCFFF, _P),  # Cannot Understand
    (0xB000, 0xBFFF, _W),  # warnings: stored
)

# Where the words come from, in order: the Storage table (with the general statuses), then a table
# that holds the one general warning the Storage table leaves out (0x0001).
_WORDS = (STORAGE_SERVICE_CLASS_STATUS, PROCEDURE_STEP_STATUS)


def _meaning(code: int) -> str:
    """pynetdicom's words for ``code``: its text, else its category (Success, Cancel, Warning...)."""
    for table in _WORDS:
        if code in table and table[code][1]:
            return table[code][1]
    category = code_to_category(code)
    return "Unknown status" if category == STATUS_UNKNOWN else category


def _status_class(code: int) -> StatusClass:
    if code in _EXACT:
        return _EXACT[code]
    for first, last, status_class in _RANGES:
        if first <= code <= last:
            return status_class
    return _R  # an unknown failure is retryable, so nothing is lost: a person sees it after N tries


def classify(code: int) -> StatusInfo:
    """Classify a C-STORE (or C-FIND / C-ECHO) response status."""
    return StatusInfo(code, _status_class(code), _meaning(code))


def describe(code: int) -> str:
    """``0xA900 Data Set Does Not Match SOP Class`` — the form used in messages."""
    return classify(code).describe()
