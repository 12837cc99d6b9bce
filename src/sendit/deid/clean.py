"""The words of an image's own identifiers, which the scrubber (:mod:`sendit.deid.scrub`) always cuts.

Read before anything changes: every component (≥ 2 characters) of every person name in the data set,
and every token (≥ 3 characters) of the original values of the patient ID, other IDs, accession
number, birth date and of every attribute the profile removes, empties or replaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_SPLIT = re.compile(r"[^\w]+|_", re.UNICODE)


def identifier_tokens(values: Iterable[str], *, min_length: int = 3) -> set[str]:
    """Lower-cased tokens of ``values`` at least ``min_length`` long (the words to cut from text)."""
    tokens: set[str] = set()
    for value in values:
        for token in _SPLIT.split(value):
            if len(token) >= min_length:
                tokens.add(token.lower())
    return tokens


def name_tokens(names: Iterable[str]) -> set[str]:
    """Components of person names (``Family^Given^Middle^Prefix^Suffix``, any group), ≥ 2 characters."""
    return identifier_tokens(names, min_length=2)
