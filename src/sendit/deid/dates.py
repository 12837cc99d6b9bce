"""Date shifting: every DA and DT value moved by whole days, precision and offset kept.

A whole-day shift leaves a time of day unchanged, so TM is never touched. A value that is not a
date (malformed, or shifted out of the calendar) raises :class:`~sendit.deid.elements.BadValue`:
the engine refuses to guess, and the image is quarantined with the tag named.
"""

from __future__ import annotations

import datetime as dt
import re

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from sendit.deid.elements import BadValue, element, one_or_many, strings

#: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX], as PS3.5 Table 6.2-1 writes DT.
_DT_RE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{6}(?:\.\d{1,6})?|\d{4}|\d{2})?([+-]\d{4})?$")


def _days_shifted(year: int, month: int, day: int, days: int) -> dt.date:
    try:
        return dt.date(year, month, day) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        raise BadValue("date is not a valid calendar date or leaves the supported range") from None


def shift_da(value: str, days: int) -> str:
    """Shift one DA value (``YYYYMMDD``; legacy ``YYYY.MM.DD`` accepted) by whole days."""
    text = value.strip()
    if len(text) == 10 and text[4] == "." and text[7] == ".":
        text = text[:4] + text[5:7] + text[8:]
    if len(text) != 8 or not text.isdigit():
        raise BadValue("malformed DA value")
    new = _days_shifted(int(text[:4]), int(text[4:6]), int(text[6:]), days)
    return f"{new.year:04d}{new.month:02d}{new.day:02d}"


def shift_dt(value: str, days: int) -> str:
    """Shift one DT value by whole days, keeping its precision, time part and UTC offset.

    A value with only a year (or year and month) is shifted from the first day of that period and
    written back with the same precision.
    """
    text = value.strip()
    match = _DT_RE.match(text)
    if match is None:
        raise BadValue("malformed DT value")
    year, month, day, time_part, offset = match.groups()
    if time_part is not None and day is None:
        raise BadValue("malformed DT value")
    new = _days_shifted(int(year), int(month or 1), int(day or 1), days)
    if month is None:
        date_text = f"{new.year:04d}"
    elif day is None:
        date_text = f"{new.year:04d}{new.month:02d}"
    else:
        date_text = f"{new.year:04d}{new.month:02d}{new.day:02d}"
    return date_text + (time_part or "") + (offset or "")


def shift_element(ds: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str, days: int) -> None:
    """Replace a DA or DT element's every value (empty ones stay empty) by its shifted value."""
    values = strings(elem)
    if values:
        shift = shift_da if vr == "DA" else shift_dt
        ds[tag] = element(tag, vr, one_or_many([shift(v, days) if v else v for v in values]))
