"""Element values in and out, shared by the walk, the date shift and the marking.

Values are read as text without trusting them (raw values must be plain ASCII) and written without
pydicom's per-value validation, because every value written here is either built valid by Sendit
or checked once up front. :class:`BadValue` carries a PHI-free reason; the walk adds the tag.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydicom.config import IGNORE
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset


class BadValue(Exception):
    """A value the engine will not guess about; the text is PHI-free by construction."""


def strings(elem: DataElement | RawDataElement) -> list[str]:
    """An element's values as text, padding stripped; raw values must be plain ASCII."""
    value = elem.value
    if value is None or value == b"" or value == "":
        return []
    if isinstance(value, bytes):
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            raise BadValue("value is not ASCII") from None
        return [part.strip(" \x00") for part in text.split("\\")]
    if isinstance(value, str):
        return [value.strip(" \x00")]
    if isinstance(value, Iterable):
        return [str(v).strip(" \x00") for v in value]
    return [str(value).strip(" \x00")]


def first_text(ds: Dataset, tag: int) -> str:
    """The first value of an element as text ('' if absent or empty)."""
    if tag not in ds:
        return ""
    values = strings(ds.get_item(tag))
    return values[0] if values else ""


def element(tag: int, vr: str, value: Any) -> DataElement:
    """A new element, skipping pydicom's per-value validation (see the module's note)."""
    return DataElement(tag, vr, value, validation_mode=IGNORE)


def one_or_many(values: list[str]) -> str | list[str]:
    """One value as itself, several as a list: how pydicom takes a value of VM 1 or more."""
    return values[0] if len(values) == 1 else values
