"""Free text scrubbed for researchers and for the clean action: names, dates, IDs, contacts.

Descriptions (Study/Series Description, Protocol Name, comments) are typed by people and carry what
the header's other attributes do not: a researcher's or a technologist's name, a site acronym, a
date, a phone extension. The engine's known identifiers catch only what the same image carries, so
this module recognises identifiers on its own, in two passes over one value:

1. **patterns** (first match wins, in this order): URLs, e-mail addresses, DICOM person names
   (``Family^Given``), dates (ISO, ``dd/mm/yyyy``, ``mm-dd-yy``, ``20210304``, ``4 Mar 2021``,
   ``March 4th, 2021``, ``03/2021``; English, French, German, Italian and Spanish month names),
   times of day (``10:32``, ``10h32``, ``3 pm``), numbers after a phone word (``tel``, ``ext``,
   ``bip``…), numbers and codes after an ID word (``MRN``, ``ID``, ``#``, ``Acc``, ``subject``…),
   US social security numbers, phone numbers (``+41 21 314 11 11``, ``(555) 123-4567``,
   ``555-1234``), and any run of digit groups holding 7 or more digits;
2. **words**, each decided by the first rule that applies:

   a. a word of the image's own identifiers (``known``, from the engine) → ``[NAME]`` (``[ID]``
      when it holds digits);
   b. the word after a title (``Dr``, ``Prof``, ``Mr``, ``Mme``, ``Dott``…) and the name word that
      follows it → ``[NAME]``; a bare all-capital ``DR``/``MR``/``PR``/``MS`` (modalities,
      multiple sclerosis) does not outrank a clinical word;
   c. a word of the **clinical allow-list** (``data/names/clinical-words.txt``) is kept — unless
      it stands in a name: after a given name ("Barry *White*"), before a surname ("*Rose*
      Smith"), before a comma and a given name ("*White*, Barry"), or after an initial
      ("L. *Bone*");
   d. a word of the **name lists** (US Census 1990 surnames and given names, Faker's names of 38
      locales) → ``[NAME]``;
   e. a word of the **vocabularies** (English words of SCOWL, words of the DICOM standard's code
      meanings and attribute names) is kept, and so is a word of 1–2 letters;
   f. any other word → ``[WORD]``: a word nobody listed is treated as identifying (a surname
      from elsewhere, a site acronym), failing closed;

   and a word with digits: 5 or more digits, or a run of 3+ digits outside a unit (``b1000``,
   ``2000ms``, ``512x512``) → ``[ID]``; ``1900``–``2099`` alone → ``[DATE]`` (not after ``TR``,
   ``TE``, ``b``…); otherwise kept (``T1``, ``ep2d``, ``B70f``) unless a part of it is a name.
   An initial goes with the name beside it (``J. Smith``, ``Smith J``).

:func:`scrub` writes the typed placeholders into the text (for researchers' metadata);
:func:`scrub_words` keeps only the surviving words joined by spaces (the clean action's format on
images). Limits: a lone initial and 1–2 letter words survive (``JS``, ``Li`` without a title); a name
that is also a listed clinical word survives alone (``White``); non-English words nobody listed
are replaced; identity carried by meaning (a rare disease, a small town) is not seen.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources


class Kind(StrEnum):
    """What a placeholder stands for."""

    NAME = "NAME"
    DATE = "DATE"
    TIME = "TIME"
    PHONE = "PHONE"
    EMAIL = "EMAIL"
    URL = "URL"
    ID = "ID"
    WORD = "WORD"  # a word no list knows: removed as possibly identifying


@dataclass(frozen=True, slots=True)
class Finding:
    """One identifier in a text: ``text[start:end]`` is replaced by ``[kind]``."""

    start: int
    end: int
    kind: Kind


def fold(word: str) -> str:
    """The lookup key of a word: accents dropped, case folded, apostrophes removed (``O'Brien`` → ``obrien``)."""
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(c for c in decomposed if not unicodedata.combining(c) and c not in "'’").casefold()


@dataclass(frozen=True)
class Vocabulary:
    """The word lists of ``data/names`` (README.md there gives their sources and licences)."""

    clinical: frozenset[str]
    surnames: frozenset[str]
    given: frozenset[str]
    common: frozenset[str]  # English and DICOM words: kept when no name list has them

    def is_name(self, key: str) -> bool:
        return key in self.surnames or key in self.given


def _read_list(name: str) -> frozenset[str]:
    text = resources.files("sendit.deid").joinpath("data", "names", name).read_text(encoding="utf-8")
    return frozenset(word for line in text.splitlines() if not line.startswith("#") for word in line.split() if word)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


@functools.cache
def vocabulary() -> Vocabulary:
    """The shipped lists, read once per process (about 0.1 s)."""
    return Vocabulary(
        clinical=frozenset(fold(w) for w in _read_list("clinical-words.txt")),
        surnames=_read_list("surnames.txt"),
        given=_read_list("given-names.txt"),
        common=_read_list("english-words.txt") | _read_list("dicom-words.txt"),
    )


# -- pass 1: patterns ------------------------------------------------------------------------------

_MONTH = (
    r"(?:jan(?:uary|uar|vier|v)?|feb(?:ruary|ruar)?|f[eé]v(?:rier|r)?|febbraio|febrero|mar(?:ch|s|zo)?|"
    r"m[aä]r(?:z)?|apr(?:il|ile)?|avr(?:il)?|abr(?:il)?|ma[yi]|mayo|maggio|june?|juni|juin|giugno|junio|"
    r"july?|juli|juil(?:let)?|luglio|julio|aug(?:ust)?|ao[uû]t|agosto|sep(?:t(?:ember)?)?|sept(?:embre)?|"
    r"settembre|septiembre|oct(?:ober)?|okt(?:ober)?|octobre|ottobre|octubre|nov(?:ember|embre)?|"
    r"dec(?:ember)?|dez(?:ember)?|d[eé]c(?:embre)?|dicembre|diciembre|gennaio|enero|janeiro)\.?"
)
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th|er|e)?"
_YEAR = r"(?:(?:19|20)\d{2}|'\d{2})"
_SEP = r"[-/. ]"
_TIME = r"(?:[01]?\d|2[0-3])(?:[:h][0-5]\d)(?::[0-5]\d(?:\.\d+)?)?(?:\s*[ap]\.?m\.?)?"
_PHONE_WORDS = (
    r"(?:tel|t[eé]l[eé]?phone?|telefon|phone|ph|fon|ext|extension|bip|bleep|pager|fax|mobile|cell|natel|"
    r"handy|call|dect)"
)
_ID_WORDS = (
    r"(?:mrn|mr\#|pid|ipp|nip|id|ident|acc|accession|acc\#|pat|patient|pt|subj|subject|sub|case|"
    r"no|nr|n°|num|number|ssn|nhs|avs|fall|dossier|exam|study|record|chart|visit)"
)


def _enough_digits(value: str) -> bool:
    """A run of digit groups is an ID from 7 digits on (shorter: a b-value, a matrix, a dose)."""
    return len(_DIGITS.findall(value)) >= 7


def _coded_value(value: str) -> bool:
    """After an ID word: 3+ digits (``visit 2`` and ``sub-01`` are no one's number; ``T2`` is no ID)."""
    return len(_DIGITS.findall(value)) >= 3


_DIGITS = re.compile(r"\d")
_PATTERNS: tuple[tuple[Kind, re.Pattern[str], int, Callable[[str], bool] | None], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE), group, check)
    for kind, pattern, group, check in (
        (Kind.URL, r"\b(?:https?|ftp)://\S+|\bwww\.\S+", 0, None),
        (Kind.EMAIL, r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+", 0, None),
        (
            Kind.URL,
            r"(?<![\w.-])[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|edu|gov|ch|de|fr|uk|it|nl|be|es|at|eu|io|info)\b",
            0,
            None,
        ),
        (Kind.NAME, r"(?<![\w'’.-])[^\W\d_][\w'’.-]*+(?:\^[^\s^\\]*)+", 0, None),  # DICOM PN: Family^Given
        # dates: ISO with a time, numeric, compact, with a month's name, month and year
        (Kind.DATE, r"\b(?:19|20)\d{2}-?(?:0[1-9]|1[0-2])-?(?:0[1-9]|[12]\d|3[01])[T ]" + _TIME, 0, None),
        (Kind.DATE, r"\b(?:19|20)\d{2}[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])\b", 0, None),
        (Kind.DATE, r"\b\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2})\b", 0, None),
        (Kind.DATE, r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?:\d{4,6})?\b", 0, None),
        (Kind.DATE, r"\b(?:0[1-9]|[12]\d|3[01])(?:0[1-9]|1[0-2])(?:19|20)\d{2}\b", 0, None),
        (Kind.DATE, rf"\b{_DAY}{_SEP}*{_MONTH}(?:{_SEP}*,?{_SEP}*{_YEAR})?\b", 0, None),
        (Kind.DATE, rf"\b{_MONTH}{_SEP}*{_DAY}(?:{_SEP}*,?{_SEP}*{_YEAR})?\b", 0, None),
        (Kind.DATE, rf"\b{_MONTH}{_SEP}*{_YEAR}\b", 0, None),
        (Kind.DATE, r"\b(?:0?[1-9]|1[0-2])[/.-](?:19|20)\d{2}\b|\b(?:19|20)\d{2}[/.-](?:0?[1-9]|1[0-2])\b", 0, None),
        (Kind.TIME, rf"\b{_TIME}\b|\b(?:1[0-2]|0?[1-9])\s*[ap]\.?m\b\.?", 0, None),
        (Kind.PHONE, rf"\b{_PHONE_WORDS}\b\.?\s*[:#.]?\s*(\+?\(?\d[\d ().-]*\d)\b", 1, None),
        (Kind.ID, rf"(?:\b{_ID_WORDS}\b|\#)\s*[:#.=-]?\s*(?:\#\s*)?([A-Z]{{0,4}}[-_]?\d[\w-]*)", 1, _coded_value),
        (Kind.ID, r"\b\d{3}-\d{2}-\d{4}\b", 0, None),
        (Kind.PHONE, r"(?<![\w+])\+\d{1,3}[\s.-]?(?:\(0\))?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,5}\b", 0, None),
        (Kind.PHONE, r"(?<!\w)\(\d{3}\)\s*\d{3}[\s.-]\d{4}\b|\b\d{3}[.-]\d{3}[.-]\d{4}\b", 0, None),
        (Kind.PHONE, r"\b0\d{1,3}(?:[\s./-]\d{2,4}){2,4}\b", 0, None),
        (Kind.PHONE, r"\b\d{3}[.-]\d{4}\b", 0, None),
        (Kind.ID, r"\b\d[\d\s./-]*\d\b", 0, _enough_digits),
    )
)


def _pattern_findings(text: str) -> tuple[list[Finding], str]:
    """Pass 1: identifiers found by pattern, and the text with them blanked for pass 2."""
    found: list[Finding] = []
    masked = text
    for kind, pattern, group, check in _PATTERNS:
        spans = []
        for match in pattern.finditer(masked):
            start, end = match.span(group)
            value = masked[start:end]
            if start == end or value.isspace() or (check is not None and not check(value)):
                continue
            spans.append((start, end))
        if spans:  # blank them in one pass: a value with thousands of matches stays linear
            found += [Finding(start, end, kind) for start, end in spans]
            pieces, position = [], 0
            for start, end in spans:
                pieces += [masked[position:start], " " * (end - start)]
                position = end
            masked = "".join(pieces) + masked[position:]
    return found, masked


# -- pass 2: words ---------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_LETTERS = re.compile(r"[^\W\d_]+")
_DIGIT_RUN = re.compile(r"\d+")
_UNIT = re.compile(
    r"(?:b|tr|te|ti|fa|kv|ma|mas|fov|mtx|bw|etl|ms|dir|ch|sl|kev|nex)?\d{1,4}(?:\.\d+)?"
    r"(?:ms|s|mm|cm|um|t|kv|kev|mas|ma|hz|b|px|dir|ch|x\d{1,4}|ns|p|f|d|i|ax|sl)?",
    re.IGNORECASE,
)
_YEAR_WORD = re.compile(r"(?:19|20)\d{2}")
#: Words after which a 4-digit number is a setting (``TR 2000``), not a year.
_SETTING_WORDS = _words("tr te ti b bvalue kv ma mas fov matrix mtx ms bw")
#: Titles before a name. Abbreviations that are also codes (DR, MR, PR, MS, SR) count in capitals
#: only with a dot, or before a word that is not clinical.
_TITLES = _words(
    "dr doctor drs prof professor mr mrs ms miss mx sir dott dottssa dottor dra pr herr frau "
    "mme mlle madame monsieur sr sra srta dre"
)
_CODE_TITLES = frozenset({"dr", "mr", "pr", "ms", "sr"})
#: Words after which an unlisted word is typed as a name (not only as an unknown word).
_NAME_CONTEXT = _words(
    "by attn cc pi investigator radiologist technologist tech radiographer physician nurse "
    "referring referrer signed reported read requested ordered operator performed"
)


@dataclass(slots=True)
class _Token:
    start: int
    end: int
    text: str
    key: str
    kind: Kind | None = None  # None: kept
    strong: bool = False  # a name by its own list or context, not by a neighbour


def _digit_kind(token: _Token, previous: _Token | None) -> Kind | None:
    """A word with digits: an ID, a year, or a technical word (``T1``, ``b1000``)."""
    text = token.text
    digits = sum(len(run) for run in _DIGIT_RUN.findall(text))
    if text.isdigit():
        if digits >= 5:
            return Kind.ID
        if digits == 4 and _YEAR_WORD.fullmatch(text) and (previous is None or previous.key not in _SETTING_WORDS):
            return Kind.DATE
        return None
    if not _UNIT.fullmatch(text) and (digits >= 5 or max(len(run) for run in _DIGIT_RUN.findall(text)) >= 3):
        return Kind.ID
    if len(text) >= 9:  # a long code of letters and digits (CANARY59XYZ), not a technique word (ep2d, T2W)
        return Kind.ID
    return None


def _camel_parts(word: str) -> list[str]:
    """``AAHead`` → ``AA``, ``Head``; ``JohnSmith`` → ``John``, ``Smith`` (any script's capitals)."""
    cuts = [0]
    for i in range(1, len(word)):
        before, here = word[i - 1], word[i]
        if (before.islower() and here.isupper()) or (
            before.isupper() and here.isupper() and i + 1 < len(word) and word[i + 1].islower()
        ):
            cuts.append(i)
    cuts.append(len(word))
    return [word[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def _word_kind(token: _Token, vocab: Vocabulary) -> tuple[Kind | None, bool]:
    """Rules c–f of the module docstring for one word alone: (kind, strong)."""
    key = token.key
    if key in vocab.clinical:
        return None, False
    if vocab.is_name(key):
        return Kind.NAME, True
    if len(key) <= 2 or key in vocab.common:
        return None, False
    parts = [fold(part) for part in _camel_parts(token.text)]  # AAHead, JohnSmith, longTR
    if len(parts) > 1:
        if any(vocab.is_name(p) and p not in vocab.clinical for p in parts):
            return Kind.NAME, True
        if all(len(p) <= 2 or p in vocab.clinical or p in vocab.common for p in parts):
            return None, False
    return Kind.WORD, False


def _style(word: str) -> str:
    """How a word is written: two words of one name share it (``BARRY WHITE``, ``Barry White``)."""
    return "upper" if word.isupper() else "title" if word[:1].isupper() and word[1:].islower() else "other"


def _gap(text: str, left: _Token, right: _Token) -> str:
    return text[left.end : right.start]


def _word_findings(text: str, masked: str, known: frozenset[str], vocab: Vocabulary) -> list[Finding]:
    """Pass 2: each word alone (rules a, c–f), then in its context (rules b and c's exception)."""
    tokens = [_Token(m.start(), m.end(), m.group(), fold(m.group())) for m in _WORD.finditer(masked)]
    for index, token in enumerate(tokens):
        previous = tokens[index - 1] if index else None
        lowered = token.text.lower()
        if (
            lowered in known
            or token.key in known
            or any(part.lower() in known for part in re.split("['’]", token.text) if len(part) >= 2)
        ):
            token.kind, token.strong = (Kind.ID if _DIGITS.search(token.text) else Kind.NAME), True
        elif _DIGITS.search(token.text):
            token.kind = _digit_kind(token, previous)
            if token.kind is None and any(
                len(run) >= 3
                and vocab.is_name(fold(run))
                and fold(run) not in vocab.clinical
                and fold(run) not in vocab.common
                for run in _LETTERS.findall(token.text)
            ):
                token.kind = Kind.NAME  # Smith2
        else:
            token.kind, token.strong = _word_kind(token, vocab)
    _titles(text, tokens, vocab)
    _neighbours(text, tokens, vocab)
    return [Finding(t.start, t.end, t.kind) for t in tokens if t.kind is not None]


def _titles(text: str, tokens: list[_Token], vocab: Vocabulary) -> None:
    """Rule b: the one or two words after a title are a name; after "by", "attn"… typed as one."""
    for index, token in enumerate(tokens[:-1]):
        follower = tokens[index + 1]
        if follower.kind in (Kind.ID, Kind.DATE) or _DIGITS.search(follower.text):
            continue
        if token.key in _TITLES and token.kind is None:
            dotted = text[token.end : token.end + 1] == "."
            weak = token.key in _CODE_TITLES and token.text.isupper() and not dotted
            if weak and follower.key in vocab.clinical:
                continue
            follower.kind, follower.strong = Kind.NAME, True
            if index + 2 < len(tokens):
                second = tokens[index + 2]
                if (
                    _gap(text, follower, second).strip(" .") == ""
                    and second.key not in vocab.clinical
                    and (second.kind in (Kind.NAME, Kind.WORD) or (second.text[:1].isupper() and len(second.key) > 2))
                    and not _DIGITS.search(second.text)
                ):
                    second.kind, second.strong = Kind.NAME, True
        elif token.key in _NAME_CONTEXT and follower.kind is Kind.WORD:
            follower.kind, follower.strong = Kind.NAME, True


def _neighbours(text: str, tokens: list[_Token], vocab: Vocabulary) -> None:
    """Rule c's exception, and an initial goes with the name beside it."""
    for index, token in enumerate(tokens):
        if token.kind is not None:
            continue
        before = tokens[index - 1] if index else None
        after = tokens[index + 1] if index + 1 < len(tokens) else None
        if len(token.text) == 1 and token.text.isalpha():
            _initial(text, token, before, after, vocab)
        elif token.key in vocab.clinical and len(token.key) >= 3 and _in_a_name(text, token, before, after, vocab):
            token.kind = Kind.NAME


def _initial(text: str, token: _Token, before: _Token | None, after: _Token | None, vocab: Vocabulary) -> None:
    """``J. Smith``, ``O. Einarsdóttir`` (an unlisted word after an initial is a name), ``L. Bone``
    (a clinical word that is a surname, after an initial), ``Smith J``."""
    if after is not None:
        gap = _gap(text, token, after)
        dotted = gap in (". ", ".")
        if (
            (after.kind is Kind.NAME and (dotted or gap == " "))
            or (after.kind is Kind.WORD and dotted)
            or (after.kind is None and dotted and after.key in vocab.surnames and after.text[:1].isupper())
        ):
            token.kind = after.kind = Kind.NAME
            return
    if (
        before is not None
        and before.kind is Kind.NAME
        and token.text.isupper()
        and _gap(text, before, token) in (" ", ", ")
    ):
        token.kind = Kind.NAME


def _in_a_name(text: str, token: _Token, before: _Token | None, after: _Token | None, vocab: Vocabulary) -> bool:
    """A clinical word written like its neighbour, a name by its own list: after a given name
    ("Barry White"), before a surname ("Rose Smith"), before a comma and a given name ("White, Barry")."""
    if (
        before is not None
        and before.strong
        and _style(before.text) == _style(token.text)
        and before.key in vocab.given
        and token.key in vocab.surnames
        and _gap(text, before, token) == " "
    ):
        return True
    if after is not None and after.strong and _style(after.text) == _style(token.text):
        gap = _gap(text, token, after)
        if gap == " ":
            return token.key in vocab.given and after.key in vocab.surnames and after.key not in vocab.given
        if gap in (", ", ","):
            return token.key in vocab.surnames and after.key in vocab.given
    return False


# -- the public functions --------------------------------------------------------------------------


def find(text: str, known: Iterable[str] = ()) -> list[Finding]:
    """Every identifier in ``text``, in order (``known``: the image's identifier words, lower case)."""
    found, masked = _pattern_findings(text)
    found += _word_findings(text, masked, frozenset(known), vocabulary())
    return sorted(found, key=lambda f: f.start)


def scrub(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with each identifier replaced by its typed placeholder (``[NAME]``, ``[DATE]``…)."""
    out: list[str] = []
    position = 0
    for finding in find(text, known):
        out.append(text[position : finding.start])
        out.append(f"[{finding.kind}]")
        position = finding.end
    out.append(text[position:])
    return re.sub(r"\s+", " ", "".join(out)).strip()


_SPLIT = re.compile(r"[^\w]+|_")


def scrub_words(text: str, known: Iterable[str] = ()) -> str:
    """The words of ``text`` that are not identifiers, joined by single spaces ("" if none).

    The clean action's format (see :mod:`sendit.deid.clean`): punctuation goes with the identifiers,
    so a value never carries a placeholder the original attribute did not allow room for.
    """
    removed = find(text, known)
    kept: list[str] = []
    position = 0
    for match in re.finditer(r"[^\W_]+", text):
        start, end = match.span()
        while position < len(removed) and removed[position].end <= start:
            position += 1
        if position < len(removed) and removed[position].start < end:
            continue
        kept.append(match.group())
    return " ".join(kept)


def site_tokens(names: Iterable[str]) -> set[str]:
    """Acronyms of institution names, lower case: "Centre Hospitalier Universitaire Vaudois" → ``chuv``.

    A site is written by its initials in free text more often than by its name.
    """
    tokens: set[str] = set()
    for name in names:
        words = [w for w in _LETTERS.findall(name) if len(w) > 1 or w.isupper()]
        if len(words) >= 2:
            tokens.add("".join(w[0] for w in words).lower())
            capitals = [w for w in words if w[:1].isupper()]
            if len(capitals) >= 2:
                tokens.add("".join(w[0] for w in capitals).lower())
    return tokens
