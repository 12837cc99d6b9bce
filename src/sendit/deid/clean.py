"""The "C" (clean) action for text: a conservative, documented token filter.

What :func:`clean_text` does to one value, in this order:

1. date- and time-like patterns are cut out: ``2024-01-15``, ``15/01/2024``, ``15.01.24``,
   ``20240115``, ``Jan 15 2024``, ``15 January``, ``10:32``, ``10h32``;
2. the value is split into tokens at every character that is not a letter, digit or ``^``-free
   word character (spaces, punctuation, ``^``, ``/``…); a token is dropped when

   * it contains a run of 3 or more digits (IDs, MRNs, phone numbers, years, room numbers), or an
     ``@`` (e-mail addresses are cut before splitting);
   * it equals, case-insensitively, a *known identifier* of the image: every component (≥ 2
     characters) of every person name in the data set, and every token (≥ 3 characters) of the
     original values of the patient ID, other IDs, accession number, birth date and of every
     attribute the profile removes, empties or replaces (institution, station, physicians…);

3. the surviving tokens are joined with single spaces; an empty result means "nothing left".

Limits (why this is only "conservative"): a name the image does not carry anywhere (a relative, a
nurse named only in free text) survives unless it has 3+ digits; a 1–2 digit number survives (an
age, a day of the month); spelling variants of a known name survive; the text's punctuation and
line breaks are lost. A value that cannot be decoded is never kept (the caller falls back to the
Basic Profile action).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_DATE_PATTERNS = re.compile(
    r"""
    \b\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}\b                # 2024-01-15, 15/01/2024, 15.01.24
    | \b\d{1,2}[:h]\d{2}(?::\d{2}(?:\.\d+)?)?\b        # 10:32, 10h32, 10:32:05.1
    | \b\d{1,2}\s*(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?(?:\s*,?\s*\d{2,4})?\b
    | \b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s*\d{1,2}(?:st|nd|rd|th)?
      (?:\s*,?\s*\d{2,4})?\b
    | \S+@\S+                                           # e-mail addresses
    """,
    re.IGNORECASE | re.VERBOSE,
)
_SPLIT = re.compile(r"[^\w]+|_", re.UNICODE)
_DIGIT_RUN = re.compile(r"\d{3,}")


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


def clean_text(value: str, known: set[str]) -> str:
    """``value`` with dates, times, long digit runs and known identifiers removed (module docstring)."""
    text = _DATE_PATTERNS.sub(" ", value)
    kept = []
    for token in _SPLIT.split(text):
        if not token or _DIGIT_RUN.search(token) or token.lower() in known:
            continue
        kept.append(token)
    return " ".join(kept)
