"""deid recipes (the pydicom/deid format) read strictly: what we cannot do is an error at load time.

A recipe is a text file::

    FORMAT dicom

    %filter graylist
    LABEL GE dose report                      # a comment
      contains Modality CT
      + contains Manufacturer GE
      + contains SeriesDescription Dose Report || equals ImageType SCREEN SAVE
      ctpcoordinates 0,0,512,110

    %header
    KEEP StudyDescription
    REPLACE InstitutionName var:site
    JITTER endswith:Date var:jitter_days
    REMOVE startswith:Referring
    BLANK contains:Comments
    ADD ClinicalTrialSponsorName My Sponsor
    REMOVE ALL func:contains_identifier

Supported: ``FORMAT dicom``; ``%header`` with ``ADD``, ``REPLACE``, ``KEEP``, ``BLANK``, ``REMOVE``,
``JITTER``; fields as keywords, tag numbers (``(0010,0010)``, ``0010,0010``, ``00100010``),
``startswith:``, ``endswith:``, ``contains:`` (case-insensitive, on keywords and on the tag's hex
digits) and ``ALL``; values as literal text, ``var:NAME`` (from the mapping given per image: the
identifiers and the service's custom fields) and ``func:NAME`` (only :data:`FUNCTIONS`);
``%filter NAME`` for the groups ``whitelist``, ``graylist`` (or ``greylist``) and ``blacklist`` with
``LABEL`` blocks whose criteria are ``contains``, ``notcontains``, ``equals``, ``notequals``,
``missing``, ``present``, ``empty`` joined by ``+`` (and) and ``||`` (or), evaluated left to right
(a line without a leading operator is and-ed, as deid does), and ``coordinates x0,y0,x1,y1`` /
``ctpcoordinates x,y,width,height``. Anything else — another section, ``select:``, ``except:``,
``keepcoordinates``, ``coordinates from:``, an unknown keyword or function, a regular expression
that does not compile — raises :class:`RecipeError` naming the line.

Precedence when several header rules hit one attribute is deid's:
``KEEP > ADD > REPLACE > JITTER > REMOVE > BLANK``; between two rules of one kind the later wins.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydicom.datadict import DicomDictionary, keyword_dict

from sendit.deid.scrub import scrub_words
from sendit.dicomio import tags


class RecipeError(ValueError):
    """A recipe line we cannot honour; the message names the file and line (never a DICOM value)."""


HEADER_ACTIONS = ("KEEP", "ADD", "REPLACE", "JITTER", "REMOVE", "BLANK")
PRECEDENCE = {name: rank for rank, name in enumerate(reversed(HEADER_ACTIONS))}  # higher wins
FILTER_GROUPS = {"whitelist": "whitelist", "graylist": "graylist", "greylist": "graylist", "blacklist": "blacklist"}
FILTER_TESTS = ("contains", "notcontains", "equals", "notequals", "missing", "present", "empty")
_NO_VALUE_TESTS = frozenset({"missing", "present", "empty"})

#: Attributes a recipe may not name directly: the file meta, the de-identification record and the
#: pixel data are the engine's. The identifiers are the identifier service's (see KEEP below).
PROTECTED_TAGS = frozenset(
    {
        tags.PATIENT_IDENTITY_REMOVED,
        tags.DEIDENTIFICATION_METHOD,
        tags.DEIDENTIFICATION_METHOD_CODES,
        tags.LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
        tags.BURNED_IN_ANNOTATION,
        tags.PIXEL_DATA,
    }
)
IDENTIFIER_TAGS = frozenset({tags.PATIENT_ID, tags.PATIENT_NAME, tags.ACCESSION_NUMBER})

_TAG_FORMS = (
    re.compile(r"^\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)$"),
    re.compile(r"^([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})$"),
    re.compile(r"^([0-9A-Fa-f]{4})([0-9A-Fa-f]{4})$"),
)
_KEYWORDS_LOWER = {kw.lower(): tag for kw, tag in keyword_dict.items()}


# -- the function registry ----------------------------------------------------------------------


@dataclass(frozen=True)
class FuncContext:
    """What a recipe function sees: the element's current text and a keyed helper; no data set."""

    value: str
    vr: str
    key: bytes
    known_identifiers: frozenset[str]
    remap_uid: Callable[[str], str]


def _keyed_hash(call: FuncContext) -> str:
    digest = hmac.new(call.key, call.value.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:16].upper()


def _age_bucket(call: FuncContext) -> str:
    """An AS value (``047Y``) → its 5-year bucket's lower bound (``045Y``); 90 and over → ``090Y``."""
    match = re.fullmatch(r"(\d{3})([DWMY])", call.value.strip())
    if match is None:
        return ""
    number, unit = int(match.group(1)), match.group(2)
    years = number if unit == "Y" else 0
    return f"{min(90, years - years % 5):03d}Y"


def _year_only(call: FuncContext) -> str:
    text = call.value.strip()
    return f"{text[:4]}0101" if len(text) >= 4 and text[:4].isdigit() else ""


FUNCTIONS: Mapping[str, Callable[[FuncContext], Any]] = {
    "keyed_hash": _keyed_hash,  # 16 hex digits of HMAC-SHA256(secret key, value)
    "remap_uid": lambda call: call.remap_uid(call.value),  # the engine's keyed UID remap
    "hashuid": lambda call: call.remap_uid(call.value),  # deid's example name for the same thing
    "age_bucket": _age_bucket,
    "year_only": _year_only,
    "clean_text": lambda call: scrub_words(call.value, set(call.known_identifiers)),
    "empty": lambda call: "",
}


#: Functions that answer a yes/no question, for ``REMOVE <field> func:NAME``.
def _contains_identifier(call: FuncContext) -> bool:
    """True when a word of the value is an identifier known for the image (sendit.deid.clean's tokens)."""
    return any(token.lower() in call.known_identifiers for token in re.split(r"[^\w]+|_", call.value) if token)


PREDICATES: Mapping[str, Callable[[FuncContext], bool]] = {
    "contains_identifier": _contains_identifier,
    "is_empty": lambda call: not call.value.strip(),
}


# -- the parsed recipe --------------------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    kind: str  # "literal", "var", "func"
    text: str


@dataclass(frozen=True)
class FieldExpr:
    kind: str  # "tag", "startswith", "endswith", "contains", "all"
    text: str
    tag: int | None = None

    def matches(self, tag: int, keyword: str) -> bool:
        if self.kind == "tag":
            return tag == self.tag
        if self.kind == "all":
            return True
        needle = self.text.lower()
        hexes = (f"{tag:08x}", f"({tag >> 16:04x},{tag & 0xFFFF:04x})")
        key = keyword.lower()
        if self.kind == "startswith":
            return key.startswith(needle) if key else any(h.startswith(needle) for h in hexes)
        if self.kind == "endswith":
            return key.endswith(needle) if key else any(h.endswith(needle) for h in hexes)
        return needle in key or any(needle in h for h in hexes)


@dataclass(frozen=True)
class HeaderRule:
    line: int
    action: str
    field: FieldExpr
    value: Value | None

    @property
    def rank(self) -> tuple[int, int]:
        return (PRECEDENCE[self.action], self.line)


@dataclass(frozen=True)
class Criterion:
    test: str
    field: str
    tag: int
    pattern: re.Pattern[str] | None
    alternatives: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class Label:
    """One ``LABEL`` block: ``clauses`` are (operator, [(inner operator, criterion)…]) per line."""

    group: str
    name: str
    line: int
    clauses: tuple[tuple[str, tuple[tuple[str, Criterion], ...]], ...]
    regions: tuple[tuple[int, int, int, int], ...]  # (x0, y0, x1, y1), end-exclusive


@dataclass
class Recipe:
    """A parsed recipe; :meth:`header_plan` compiles its header rules for the engine."""

    source: str
    header: list[HeaderRule] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)

    def filters(self, group: str) -> list[Label]:
        return [label for label in self.labels if label.group == group]

    def header_plan(self) -> HeaderPlan:
        return _compile_header(self.header)

    def extended(self, other: Recipe) -> Recipe:
        """This recipe's rules, then ``other``'s (filters of both; header rules of both)."""
        return Recipe(f"{self.source}+{other.source}", self.header + other.header, self.labels + other.labels)


@dataclass(frozen=True)
class HeaderPlan:
    """Header rules resolved per public tag (from the data dictionary) plus the rules that can hit
    private or unknown tags, which are matched when such an element is met."""

    public: Mapping[int, HeaderRule]
    private_rules: tuple[HeaderRule, ...]
    adds: tuple[HeaderRule, ...]  # ADD of one named attribute: set on the top level after the walk

    def __bool__(self) -> bool:
        return bool(self.public or self.private_rules or self.adds)

    def for_private(self, tag: int) -> HeaderRule | None:
        best: HeaderRule | None = None
        for rule in self.private_rules:
            if rule.field.matches(tag, "") and (best is None or rule.rank > best.rank):
                best = rule
        return best


# -- parsing ------------------------------------------------------------------------------------


def _tag_of(text: str) -> int | None:
    for form in _TAG_FORMS:
        match = form.match(text)
        if match:
            return int(match.group(1) + match.group(2), 16)
    return _KEYWORDS_LOWER.get(text.lower())


def _field(text: str, where: str) -> FieldExpr:
    lower = text.lower()
    if lower in ("all", "allfields"):
        return FieldExpr("all", "")
    for prefix in ("startswith", "endswith", "contains"):
        if lower.startswith(prefix + ":"):
            needle = text[len(prefix) + 1 :]
            if not needle:
                raise RecipeError(f"{where}: '{prefix}:' needs a text to match")
            return FieldExpr(prefix, needle)
    if ":" in lower:
        raise RecipeError(f"{where}: field expression {text.split(':', 1)[0]!r}: is not supported")
    tag = _tag_of(text)
    if tag is None:
        raise RecipeError(f"{where}: unknown attribute {text!r} (not a keyword or tag number)")
    return FieldExpr("tag", text, tag)


def _value(text: str, where: str, *, predicate: bool = False) -> Value:
    if text.startswith("var:"):
        name = text[4:]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
            raise RecipeError(f"{where}: bad variable name in {text!r}")
        return Value("var", name)
    if text.startswith("func:"):
        name = text[5:]
        registry: Mapping[str, Any] = PREDICATES if predicate else FUNCTIONS
        if name not in registry:
            raise RecipeError(
                f"{where}: unknown function {name!r} (known: {', '.join(sorted(registry))}); "
                "only Sendit's registered functions can be used"
            )
        return Value("func", name)
    if predicate:
        raise RecipeError(f"{where}: REMOVE takes no value except func:NAME")
    return Value("literal", text)


def _criterion(words: list[str], where: str) -> Criterion:
    if not words:
        raise RecipeError(f"{where}: empty criterion")
    test = words[0].lower()
    if test not in FILTER_TESTS:
        raise RecipeError(f"{where}: unknown filter test {words[0]!r} (known: {', '.join(FILTER_TESTS)})")
    if len(words) < 2:
        raise RecipeError(f"{where}: {test} needs a field")
    name = words[1]
    tag = _tag_of(name)
    if tag is None:
        raise RecipeError(f"{where}: unknown attribute {name!r} in a filter")
    value = " ".join(words[2:])
    if test in _NO_VALUE_TESTS:
        if value:
            raise RecipeError(f"{where}: {test} takes no value")
        return Criterion(test, name, tag, None, (), f"{test} {name}")
    if not value:
        raise RecipeError(f"{where}: {test} needs a value")
    try:
        pattern = re.compile(value, re.IGNORECASE)
    except re.error:
        raise RecipeError(f"{where}: {value!r} is not a valid regular expression") from None
    alternatives = tuple(part.strip().lower() for part in value.split("|"))
    return Criterion(test, name, tag, pattern, alternatives, f"{test} {name} {value}")


def _clause(text: str, where: str) -> tuple[str, tuple[tuple[str, Criterion], ...]]:
    words = text.split()
    operator = "and"
    if words and words[0] in ("+", "||"):
        operator = "and" if words.pop(0) == "+" else "or"
    parts: list[tuple[str, Criterion]] = []
    current: list[str] = []
    inner = "and"
    for word in words + ["||"]:
        if word in ("+", "||"):
            if not current:
                raise RecipeError(f"{where}: '{word}' without a criterion before it")
            parts.append((inner, _criterion(current, where)))
            current, inner = [], ("and" if word == "+" else "or")
        else:
            current.append(word)
    return operator, tuple(parts)


def _region(kind: str, text: str, where: str) -> tuple[int, int, int, int]:
    if text.startswith("from:"):
        raise RecipeError(f"{where}: coordinates from: an attribute are not supported")
    numbers = [part.strip() for part in text.split(",")]
    if len(numbers) != 4 or not all(re.fullmatch(r"\d+", n) for n in numbers):
        raise RecipeError(f"{where}: {kind} needs four whole numbers")
    a, b, c, d = (int(n) for n in numbers)
    region = (a, b, a + c, b + d) if kind == "ctpcoordinates" else (a, b, c, d)
    if region[2] <= region[0] or region[3] <= region[1]:
        raise RecipeError(f"{where}: {kind} describe an empty region")
    return region


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    """Parse recipe text; ``source`` names it in error messages."""
    recipe = Recipe(source)
    section: str | None = None
    group = ""
    seen_format = False
    label: dict[str, Any] | None = None

    def close_label() -> None:
        nonlocal label
        if label is None:
            return
        if not label["clauses"] and not label["regions"]:
            raise RecipeError(f"{source}:{label['line']}: LABEL {label['name']!r} has no criteria")
        recipe.labels.append(
            Label(group, label["name"], label["line"], tuple(label["clauses"]), tuple(label["regions"]))
        )
        label = None

    for number, raw in enumerate(text.splitlines(), start=1):
        where = f"{source}:{number}"
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        head = words[0]
        if head.upper() == "FORMAT":
            if len(words) != 2 or words[1].lower() != "dicom":
                raise RecipeError(f"{where}: only 'FORMAT dicom' is supported")
            seen_format = True
            continue
        if head.startswith("%"):
            close_label()
            name = head[1:].lower()
            if name == "header" and len(words) == 1:
                section = "header"
            elif name == "filter" and len(words) == 2 and words[1].lower() in FILTER_GROUPS:
                section, group = "filter", FILTER_GROUPS[words[1].lower()]
            elif name == "filter":
                raise RecipeError(f"{where}: filter group must be one of {', '.join(sorted(FILTER_GROUPS))}")
            else:
                raise RecipeError(f"{where}: section {head!r} is not supported (only %header and %filter)")
            continue
        if not seen_format:
            raise RecipeError(f"{where}: a recipe starts with 'FORMAT dicom'")
        if section == "header":
            recipe.header.append(_header_rule(words, where, number))
        elif section == "filter":
            if head.upper() == "LABEL":
                close_label()
                if len(words) < 2:
                    raise RecipeError(f"{where}: LABEL needs a name")
                label = {"name": " ".join(words[1:]), "line": number, "clauses": [], "regions": []}
            elif label is None:
                raise RecipeError(f"{where}: a filter criterion outside a LABEL block")
            elif head.lower() in ("coordinates", "ctpcoordinates"):
                label["regions"].append(_region(head.lower(), "".join(words[1:]), where))
            elif head.lower() in ("keepcoordinates", "ctpkeepcoordinates"):
                raise RecipeError(f"{where}: {head} is not supported")
            else:
                label["clauses"].append(_clause(line, where))
        else:
            raise RecipeError(f"{where}: a rule outside a %header or %filter section")
    close_label()
    if not seen_format:
        raise RecipeError(f"{source}: a recipe starts with 'FORMAT dicom'")
    return recipe


def _header_rule(words: list[str], where: str, number: int) -> HeaderRule:
    action = words[0].upper()
    if action not in HEADER_ACTIONS:
        raise RecipeError(f"{where}: unknown header action {words[0]!r} (known: {', '.join(HEADER_ACTIONS)})")
    if len(words) < 2:
        raise RecipeError(f"{where}: {action} needs a field")
    expr = _field(words[1], where)
    rest = " ".join(words[2:])
    if expr.kind == "tag":
        assert expr.tag is not None
        if expr.tag in PROTECTED_TAGS or expr.tag >> 16 == 0x0002:
            raise RecipeError(f"{where}: {words[1]} is set by the engine and cannot be changed by a recipe")
        if action in ("KEEP", "BLANK", "REMOVE") and expr.tag in IDENTIFIER_TAGS:
            raise RecipeError(
                f"{where}: {words[1]} always gets the identifier service's value; use REPLACE with var: to change it"
            )
    value: Value | None = None
    if action in ("KEEP", "BLANK"):
        if rest:
            raise RecipeError(f"{where}: {action} takes no value")
    elif action == "REMOVE":
        if rest:
            value = _value(rest, where, predicate=True)
    elif action == "JITTER":
        if not rest:
            raise RecipeError(f"{where}: JITTER needs a number of days or var:NAME")
        value = _value(rest, where)
        if value.kind == "func" or (value.kind == "literal" and not re.fullmatch(r"[+-]?\d+", rest)):
            raise RecipeError(f"{where}: JITTER takes a whole number of days or var:NAME")
    else:  # ADD, REPLACE
        if not rest:
            raise RecipeError(f"{where}: {action} needs a value")
        value = _value(rest, where)
    return HeaderRule(number, action, expr, value)


def _compile_header(rules: Iterable[HeaderRule]) -> HeaderPlan:
    rules = list(rules)
    public: dict[int, HeaderRule] = {}
    private: list[HeaderRule] = []
    adds: list[HeaderRule] = []
    for rule in rules:
        if rule.action == "ADD" and rule.field.kind == "tag":
            adds.append(rule)
            continue
        if rule.field.kind == "tag":
            assert rule.field.tag is not None
            targets: Iterable[int] = [rule.field.tag]
            if (rule.field.tag >> 16) & 1:
                private.append(rule)
                continue
        else:
            targets = [tag for tag, keyword in _dictionary_keywords() if rule.field.matches(tag, keyword)]
            private.append(rule)  # an expression may also hit private tags (by their hex digits)
        for tag in targets:
            if tag in PROTECTED_TAGS or tag >> 16 == 0x0002:
                continue
            if tag in IDENTIFIER_TAGS and rule.action in ("KEEP", "BLANK", "REMOVE"):
                continue  # the identifier service's values win (see module docstring)
            current = public.get(tag)
            if current is None or rule.rank > current.rank:
                public[tag] = rule
    return HeaderPlan(public, tuple(private), tuple(adds))


@cache
def _dictionary_keywords() -> tuple[tuple[int, str], ...]:
    return tuple(
        (tag, str(entry[4]))
        for tag, entry in DicomDictionary.items()
        if entry[4] and isinstance(tag, int) and tag >> 16 != 0x0002
    )


# -- loading --------------------------------------------------------------------------------------

DEFAULT_FILTER = "deid.dicom.sendit-filter"


def load_recipe(path: str | Path) -> Recipe:
    """Read and parse a recipe file; ``default`` names the shipped filter."""
    if str(path) == "default":
        return default_filter()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: the recipe is not UTF-8 text") from None
    return parse_recipe(text, path.name)


@cache
def default_filter() -> Recipe:
    """The shipped filter (package data ``data/deid.dicom.sendit-filter``)."""
    text = resources.files("sendit.deid").joinpath("data", DEFAULT_FILTER).read_text(encoding="utf-8")
    return parse_recipe(text, DEFAULT_FILTER)
