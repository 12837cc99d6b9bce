"""UID remapping: ``2.25.<first 128 bits of HMAC-SHA256(key, uid)>``.

The same input UID maps to the same output for the same key in every process and run, so
references inside sequences keep pointing at their targets and a re-send lands on the same
instance. Registered UIDs (SOP classes, transfer syntaxes, coding schemes, well-known frames of
reference: those in pydicom's UID dictionary) are public knowledge and kept.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from functools import lru_cache, partial

from pydicom.uid import UID_dictionary

#: Registered DICOM UIDs are public knowledge and are never remapped.
REGISTERED_UIDS: frozenset[str] = frozenset(UID_dictionary)
_CACHED = 65536  # distinct UIDs remembered per process: a few large studies' worth


def keyed_uid(key: bytes, uid: str) -> str:
    """The remapped form of one UID (≤ 44 characters); empty and registered UIDs unchanged."""
    if not uid or uid in REGISTERED_UIDS:
        return uid
    digest = hmac.new(key, uid.encode("utf-8"), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _unchanged(uid: str) -> str:
    return uid.strip(" \x00")


def uid_remapper(key: bytes, *, retain: bool) -> Callable[[str], str]:
    """The engine's remap, cached; with the Retain UIDs option every UID is kept (padding stripped)."""
    return _unchanged if retain else lru_cache(maxsize=_CACHED)(partial(keyed_uid, key))
