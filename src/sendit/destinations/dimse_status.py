"""DIMSE status codes in words, and what each means for delivery.

The table is data so an operator-facing message ("0xA900 Data Set does not match SOP Class") and the
retry decision come from one place. Codes from PS3.7 Annex C and PS3.4 B.2.3 (Storage Service).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    """What the shell should do with an image after the peer answered."""

    DELIVERED = "delivered"
    WARNING = "warning"  # delivered, with a note worth keeping
    RETRYABLE = "retryable"  # not stored; the same bytes may succeed later
    PERMANENT = "permanent"  # not stored; re-sending the same bytes will fail again


@dataclass(frozen=True)
class StatusInfo:
    code: int
    outcome: Outcome
    meaning: str

    @property
    def delivered(self) -> bool:
        return self.outcome in (Outcome.DELIVERED, Outcome.WARNING)

    @property
    def permanent(self) -> bool:
        return self.outcome is Outcome.PERMANENT

    def describe(self) -> str:
        return f"0x{self.code:04X} {self.meaning}"


_D, _W, _R, _P = Outcome.DELIVERED, Outcome.WARNING, Outcome.RETRYABLE, Outcome.PERMANENT

# Exact codes. A resource or protocol hiccup is retryable; anything about the data or the peer's
# capabilities is permanent, because re-sending the same bytes cannot change the answer.
_EXACT: dict[int, tuple[Outcome, str]] = {
    0x0000: (_D, "Success"),
    0x0001: (_W, "Requested optional attributes are not supported"),
    0x0107: (_W, "Attribute list error"),
    0x0116: (_W, "Attribute value out of range"),
    0xB000: (_W, "Coercion of data elements"),
    0xB006: (_W, "Elements discarded"),
    0xB007: (_W, "Data Set does not match SOP Class (stored anyway)"),
    0x0105: (_P, "No such attribute"),
    0x0106: (_P, "Invalid attribute value"),
    0x0110: (_R, "Processing failure"),
    0x0117: (_P, "Invalid SOP Instance"),
    0x0118: (_P, "No such SOP Class"),
    0x0119: (_P, "Class-instance conflict"),
    0x0120: (_P, "Missing attribute"),
    0x0121: (_P, "Missing attribute value"),
    0x0122: (_P, "SOP Class not supported"),
    0x0124: (_P, "Not authorized"),
    0x0210: (_R, "Duplicate invocation"),
    0x0211: (_P, "Unrecognized operation"),
    0x0212: (_P, "Mistyped argument"),
    0x0213: (_R, "Resource limitation"),
    0xFE00: (_R, "Cancelled"),
}

# Ranges, checked after exact codes: (first, last, outcome, meaning).
_RANGES: tuple[tuple[int, int, Outcome, str], ...] = (
    (0xA700, 0xA7FF, _R, "Refused: Out of resources"),
    (0xA900, 0xA9FF, _P, "Data Set does not match SOP Class"),
    (0xC000, 0xCFFF, _P, "Cannot understand"),
    (0xB000, 0xBFFF, _W, "Warning"),
)


def classify(code: int) -> StatusInfo:
    """Classify a C-STORE response status; an unknown failure is retryable so nothing is lost."""
    if code in _EXACT:
        outcome, meaning = _EXACT[code]
        return StatusInfo(code, outcome, meaning)
    for first, last, outcome, meaning in _RANGES:
        if first <= code <= last:
            return StatusInfo(code, outcome, meaning)
    return StatusInfo(code, Outcome.RETRYABLE, "Unknown status")


def describe(code: int) -> str:
    """``0xA900 Data Set does not match SOP Class`` — the form used in messages."""
    return classify(code).describe()
