"""The PS3.15 Annex E action table, built from the standard's own data at import time.

``data/ps3.15-annex-e-attributes.json`` is Table E.1-1 (2024 edition, 621 rows, as extracted by the
innolitics dicom-standard project, MIT). Nothing here is typed in by hand: the rows are parsed, their
tags (including the wildcard rows) turned into integers, and each row's Basic Profile code — or the
code of an enabled option column — resolved to one :class:`Action`.

Combined codes (the standard lets the implementer choose) are resolved to the least destructive
choice that keeps the object valid, because the engine cannot know whether an attribute is Type 1, 2
or 3 in the object at hand:

========  =====================================================================================
X/Z       Z  (present but empty: valid for Type 2 and 3)
X/D       D  (dummy value: valid for every type)
Z/D       D
X/Z/D     D
X/Z/U*    for a sequence: keep it and walk its items, so every UID inside is remapped (``U*``);
          for any other VR: Z
========  =====================================================================================

Option columns override the Basic Profile code when the option is on (the option's ``K`` or ``C``
wins; PS3.15 E.3 says an option's action replaces the profile's). What ``C`` means per column:

* Retain Longitudinal Temporal Information with Modified Dates: DA, DT and TM shifted by one offset
  per patient — the identifiers' jitter in days plus a keyed time of day offset
  (:mod:`sendit.deid.dates`), a time's day carried into its paired date; other VRs keep the Basic
  Profile code. With Full Dates (``K``) every date and time is kept unshifted.
* Clean Descriptors, Clean Structured Content, Clean Graphics, and the ``C`` cells of Retain Device
  Identity (AE titles) and Retain Patient Characteristics (allergies, special needs…): text is
  cleaned by :mod:`sendit.deid.clean`, a sequence is walked in *clean mode* (every text value inside
  cleaned, every person name emptied); a value that cannot be cleaned (OB, undecodable bytes) keeps
  the Basic Profile code.
* Retain Safe Private: the private row's ``C`` keeps only the private attributes listed in
  ``data/safe-private-attributes.json`` (with their private creator); everything else private goes.

When two enabled options give a row a code, ``K`` beats ``C``.

Wildcard rows: ``(50xx,xxxx)`` (curves) removes the whole group range; ``(60xx,3000)`` and
``(60xx,4000)`` (overlay data and comments) are widened to the whole 60xx group, because an overlay
module left without its data is invalid and the other overlay attributes (labels, descriptions)
are free text. The ``(gggg,eeee) where gggg is odd`` row gives the action for all private tags.

Attributes the table does not list (the rule for the unlisted, :func:`unlisted_attributes`): every
character-string attribute of pydicom's data dictionary that no row names is classed from its VR
and its keyword's words, and the class decides:

* PN: a person's name — removed;
* LT, ST, UT: free text — removed, except a short allow-list of technical text
  (:data:`TECHNICAL_TEXT`), which is cleaned;
* LO, SH, UC, UR: kept when the keyword says *coded* (a part of a code: ``...CodeValue``,
  ``...CodeMeaning``, ``CodingScheme...``) or *technical* (its head word names equipment, software,
  a kind, a mode, a label or an identifier of a thing: :data:`TECHNICAL_HEADS`), unless a word says
  free text or a person, place or travel (:data:`FREE_TEXT_WORDS`, :data:`IDENTITY_WORDS`);
  everything else (free text, identity, and any head word not known as technical) is removed;
* CS is a coded string by definition, and numbers, dates, UIDs and sequences follow their own rules
  (engine): kept.

"Removed" is the table's conservative choice for ``X/Z`` and ``X/Z/D``: the value goes and the
attribute stays empty (Z), valid where it is Type 2 or 3; where PS3.3 makes it Type 1 or 1C in some
module (``data/ps3.3-required-text-attributes.json``, derived from the standard's module tables by
``scripts/derive_required_text.py``) it gets the dummy (D) instead. With Clean Descriptors on, the
unlisted free text (not names, not identity) is cleaned like the table's descriptions. The rule
applies at every depth the walk keeps (engine: :attr:`Action.UNLISTED`).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword

DATA_FILE = "ps3.15-annex-e-attributes.json"
SAFE_PRIVATE_FILE = "safe-private-attributes.json"
REQUIRED_TEXT_FILE = "ps3.3-required-text-attributes.json"

#: Table column names of the options, in the order the standard lists them.
OPTION_COLUMNS: tuple[str, ...] = (
    "rtnSafePrivOpt",
    "rtnUIDsOpt",
    "rtnDevIdOpt",
    "rtnInstIdOpt",
    "rtnPatCharsOpt",
    "rtnLongFullDatesOpt",
    "rtnLongModifDatesOpt",
    "cleanDescOpt",
    "cleanStructContOpt",
    "cleanGraphOpt",
)

_TAG_RE = re.compile(r"^\(([0-9A-FX]{4}),([0-9A-FX]{4})\)$")
_PRIVATE_ROW = "(GGGG,EEEE) WHERE GGGG IS ODD"
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})


@dataclass(frozen=True)
class DeidOptions:
    """Which PS3.15 options apply on top of the Basic Profile.

    ``retain_long_modified_dates`` is on by default (dates are shifted by the identifiers' jitter).
    ``retain_long_full_dates`` and ``retain_long_modified_dates`` exclude each other.
    """

    retain_safe_private: bool = False
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    retain_long_full_dates: bool = False
    retain_long_modified_dates: bool = True
    clean_descriptors: bool = False
    clean_structured_content: bool = False
    clean_graphics: bool = False

    def __post_init__(self) -> None:
        if self.retain_long_full_dates and self.retain_long_modified_dates:
            raise ValueError("retain_long_full_dates and retain_long_modified_dates exclude each other")

    @classmethod
    def from_names(cls, names: Iterable[str]) -> DeidOptions:
        """Options from a list of names (``"retain_uids"``; also ``retain-uids`` or ``RETAIN_UIDS``).

        The list is complete: an option not named is off, so ``retain_long_modified_dates`` must be
        named to stay on. An unknown name raises ``ValueError`` naming it.
        """
        chosen: dict[str, bool] = dict.fromkeys(OPTIONS, False)
        for raw in names:
            name = raw.strip().lower().replace("-", "_")
            if not name:
                continue
            if name not in OPTIONS:
                raise ValueError(f"unknown de-identification option {raw.strip()!r} (known: {', '.join(OPTIONS)})")
            chosen[name] = True
        return cls(**chosen)

    def enabled(self) -> tuple[str, ...]:
        """Names of the options that are on, in the standard's order."""
        return tuple(name for name in OPTIONS if getattr(self, name))

    def columns(self) -> frozenset[str]:
        """The Table E.1-1 option columns these options switch on."""
        return frozenset(OPTIONS[name].column for name in self.enabled())


@dataclass(frozen=True)
class OptionInfo:
    """How an option is named in the table and coded in (0012,0064) (PS3.16 CID 7050)."""

    column: str
    code: str
    meaning: str


OPTIONS: Mapping[str, OptionInfo] = {
    "retain_safe_private": OptionInfo("rtnSafePrivOpt", "113111", "Retain Safe Private Option"),
    "retain_uids": OptionInfo("rtnUIDsOpt", "113110", "Retain UIDs Option"),
    "retain_device_identity": OptionInfo("rtnDevIdOpt", "113109", "Retain Device Identity Option"),
    "retain_institution_identity": OptionInfo("rtnInstIdOpt", "113112", "Retain Institution Identity Option"),
    "retain_patient_characteristics": OptionInfo("rtnPatCharsOpt", "113108", "Retain Patient Characteristics Option"),
    "retain_long_full_dates": OptionInfo(
        "rtnLongFullDatesOpt", "113106", "Retain Longitudinal Temporal Information Full Dates Option"
    ),
    "retain_long_modified_dates": OptionInfo(
        "rtnLongModifDatesOpt", "113107", "Retain Longitudinal Temporal Information Modified Dates Option"
    ),
    "clean_descriptors": OptionInfo("cleanDescOpt", "113105", "Clean Descriptors Option"),
    "clean_structured_content": OptionInfo("cleanStructContOpt", "113104", "Clean Structured Content Option"),
    "clean_graphics": OptionInfo("cleanGraphOpt", "113103", "Clean Graphics Option"),
}
IMPLEMENTED_OPTIONS = frozenset(OPTIONS)
BASIC_PROFILE_CODE = OptionInfo("", "113100", "Basic Application Confidentiality Profile")


class Action(enum.Enum):
    """What the engine does with one attribute."""

    KEEP = "K"  # unchanged (a kept UI is still remapped, a kept DA/DT still shifted: see engine)
    REMOVE = "X"
    EMPTY = "Z"  # zero-length value; an empty sequence
    DUMMY = "D"  # a fixed value valid for the VR; a UI gets remapped; a sequence gets one empty item
    REMAP_UID = "U"  # keyed UID remap
    SHIFT_DATE = "S"  # DA/DT/TM shifted (sendit.deid.dates)
    WALK = "U*"  # a sequence kept and walked item by item
    CLEAN = "C"  # text cleaned (sendit.deid.clean); a sequence walked in clean mode
    RETAIN = "R"  # kept exactly as it is: no UID remap, no date shift (retain options' K on UI/DA/DT)
    RECIPE = "recipe"  # a deid recipe rule decides (engine); never produced from the table itself
    UNLISTED = "unlisted"  # not in the table, classed as text to remove: ActionTable.unlisted says how


class ProfileError(Exception):
    """The shipped table could not be understood; the engine refuses to start."""


@dataclass(frozen=True)
class ProfileRow:
    """One row of Table E.1-1, tag parsed; ``mask``/``value`` match wildcard tags."""

    name: str
    tag_text: str
    mask: int  # bits of the tag that must equal ``value``; 0xFFFFFFFF for an exact tag
    value: int
    basic: str
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_exact(self) -> bool:
        return self.mask == 0xFFFFFFFF


@dataclass(frozen=True)
class ActionTable:
    """Everything the engine's single walk needs, precompiled.

    ``exact`` maps a tag to its action; ``removed_groups`` holds the high byte of group ranges that
    go entirely (0x50 curves, 0x60 overlays); ``private`` is the action for odd groups.
    """

    exact: Mapping[int, Action]
    removed_groups: frozenset[int]
    private: Action
    rows: int
    #: what a cleaned element falls back to when its value cannot be cleaned (the Basic Profile's action)
    fallback: Mapping[int, Action] = field(default_factory=dict)
    #: what an :attr:`Action.UNLISTED` element gets where the walk keeps values as they are: EMPTY,
    #: DUMMY (Type 1 somewhere) or CLEAN (technical text; free text under Clean Descriptors)
    unlisted: Mapping[int, Action] = field(default_factory=dict)


def parse_tag(text: str) -> tuple[int, int]:
    """``"(60xx,3000)"`` → (mask, value): a tag matches when ``tag & mask == value``."""
    match = _TAG_RE.match(text.strip().upper())
    if match is None:
        raise ProfileError(f"unrecognised tag in Annex E table: {text!r}")
    digits = match.group(1) + match.group(2)
    mask = 0
    value = 0
    for char in digits:
        mask <<= 4
        value <<= 4
        if char != "X":
            mask |= 0xF
            value |= int(char, 16)
    return mask, value


@cache
def load_rows() -> tuple[ProfileRow, ...]:
    """Rows of the shipped table (cached: the file is read once per process)."""
    text = resources.files("sendit.deid").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    rows: list[ProfileRow] = []
    for raw in json.loads(text):
        tag_text = str(raw["tag"])
        options = {col: str(raw[col]) for col in OPTION_COLUMNS if raw.get(col)}
        if tag_text.upper() == _PRIVATE_ROW:
            rows.append(ProfileRow(str(raw["name"]), tag_text, 0x00010000, 0x00010000, raw["basicProfile"], options))
            continue
        mask, value = parse_tag(tag_text)
        rows.append(ProfileRow(str(raw["name"]), tag_text, mask, value, str(raw["basicProfile"]), options))
    if not rows:
        raise ProfileError("the Annex E table is empty")
    return tuple(rows)


@cache
def safe_private_attributes() -> frozenset[tuple[str, int, int]]:
    """(creator, group, element low byte) of every private attribute the Retain Safe Private option keeps."""
    text = resources.files("sendit.deid").joinpath("data", SAFE_PRIVATE_FILE).read_text(encoding="utf-8")
    return frozenset(
        (str(entry["creator"]), int(entry["group"], 16), int(entry["element"], 16))
        for entry in json.loads(text)["attributes"]
    )


@cache
def descriptor_tags() -> frozenset[int]:
    """Tags whose text the clean options may keep (a ``C`` in a clean column): their own values are
    not "identifiers known for the image" — they are what gets cleaned."""
    columns = ("cleanDescOpt", "cleanStructContOpt", "cleanGraphOpt")
    return frozenset(row.value for row in load_rows() if row.is_exact and any(c in row.options for c in columns))


def resolve(code: str, vr: str) -> Action:
    """One table cell (``"X"``, ``"X/Z/D"``, ``"X/Z/U*"``…) → one action, by the module's rule."""
    parts = set(code.replace(" ", "").split("/"))
    if parts == {"K"}:
        return Action.KEEP
    if parts == {"U"}:
        return Action.REMAP_UID
    if "U*" in parts:
        return Action.WALK if vr == "SQ" else Action.EMPTY
    if "D" in parts:
        return Action.DUMMY
    if "Z" in parts:
        return Action.EMPTY
    if parts == {"X"}:
        return Action.REMOVE
    raise ProfileError(f"unknown Annex E action code {code!r}")


def _row_vr(row: ProfileRow) -> str:
    try:
        return str(dictionary_VR(row.value))
    except KeyError:
        return "UN"


#: Option columns whose ``C`` means "clean the text / walk the sequence in clean mode".
_CLEANING_COLUMNS = ("cleanDescOpt", "cleanStructContOpt", "cleanGraphOpt", "rtnDevIdOpt", "rtnPatCharsOpt")
_CLEANABLE_VRS = frozenset({"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT", "SQ"})


def build_action_table(enabled_columns: frozenset[str]) -> ActionTable:
    """Compile the table for a set of enabled option columns (module docstring: what each means)."""
    unknown = enabled_columns - set(OPTION_COLUMNS)
    if unknown:
        raise ProfileError(f"unknown option columns: {sorted(unknown)}")
    if {"rtnLongModifDatesOpt", "rtnLongFullDatesOpt"} <= enabled_columns:
        raise ProfileError("full dates and modified dates exclude each other")
    exact: dict[int, Action] = {}
    fallback: dict[int, Action] = {}
    removed_groups: set[int] = set()
    private = Action.REMOVE
    for row in load_rows():
        if row.mask == 0x00010000:
            private = resolve(row.basic, "UN")
            if private is not Action.REMOVE:
                raise ProfileError("the Basic Profile must remove private attributes")
            if row.options.get("rtnSafePrivOpt") == "C" and "rtnSafePrivOpt" in enabled_columns:
                private = Action.CLEAN  # keep the safe-listed ones (engine)
            continue
        if not row.is_exact:
            # (50xx,xxxx) and (60xx,3000|4000): the whole group range goes (see module docstring).
            # Clean Graphics does not bring them back: a curve or overlay bitmap cannot be cleaned.
            if resolve(row.basic, "UN") is not Action.REMOVE or (row.mask >> 16) != 0xFF00:
                raise ProfileError(f"unsupported wildcard row {row.tag_text}")
            removed_groups.add(row.value >> 24)
            continue
        vr = _row_vr(row)
        basic = resolve(row.basic, vr)
        codes = {row.options[col] for col in enabled_columns if col in row.options}
        action = basic
        if "K" in codes:
            action = Action.RETAIN if vr in ("UI", "DA", "DT", "TM") else Action.KEEP
            if vr == "SQ":
                action = Action.KEEP  # kept, and walked: UIDs inside still follow the table and options
        elif "C" in codes:
            cleaning = any(row.options.get(col) == "C" for col in _CLEANING_COLUMNS if col in enabled_columns)
            if row.options.get("rtnLongModifDatesOpt") == "C" and "rtnLongModifDatesOpt" in enabled_columns:
                if vr in _TEMPORAL_VRS:
                    action = Action.SHIFT_DATE
            elif cleaning and vr in _CLEANABLE_VRS:
                action = Action.CLEAN
                fallback[row.value] = basic
        exact[row.value] = action
    unlisted: dict[int, Action] = {}
    required = required_text_tags()
    clean_free_text = "cleanDescOpt" in enabled_columns
    for tag, kind in unlisted_attributes().items():
        if kind in KEPT_UNLISTED:
            continue
        removal = Action.DUMMY if tag in required else Action.EMPTY
        exact[tag] = Action.UNLISTED
        if kind is Unlisted.TECHNICAL_TEXT or (clean_free_text and kind is Unlisted.FREE_TEXT):
            unlisted[tag] = Action.CLEAN
            fallback[tag] = removal
        else:
            unlisted[tag] = removal
    return ActionTable(
        exact=exact,
        removed_groups=frozenset(removed_groups),
        private=private,
        rows=len(load_rows()),
        fallback=fallback,
        unlisted=unlisted,
    )


# -- attributes the table does not list ----------------------------------------------------------------


class Unlisted(enum.Enum):
    """The class the rule for unlisted attributes gives a character-string attribute (module docstring)."""

    PERSON_NAME = "person name"  # PN: removed
    FREE_TEXT = "free text"  # LT/ST/UT, or a free-text word in the keyword: removed
    TECHNICAL_TEXT = "technical text"  # LT/ST/UT on the allow-list: cleaned
    IDENTITY = "identity"  # a person, place, travel or registration word: removed
    CODED = "coded"  # a part of a code: kept
    TECHNICAL = "technical"  # equipment, software, a kind, a mode, a name or label of a thing: kept
    UNCLASSIFIED = "unclassified"  # LO/SH/UC/UR whose head word is not known as technical: removed


KEPT_UNLISTED = frozenset({Unlisted.CODED, Unlisted.TECHNICAL})

#: The VRs the rule decides. CS (coded by definition), numbers, dates, UIDs, sequences and binary
#: values are not free text and keep the engine's rules; AE has no unlisted attribute.
_PERSON_VRS = frozenset({"PN"})
_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_NAMING_VRS = frozenset({"LO", "SH", "UC", "UR"})

#: LT/ST/UT attributes that hold technical text by definition (PS3.3), cleaned rather than removed:
#: ExtendedCodeMeaning — the long form of a Code Meaning, part of a code (Table 8.8-1a);
#: CodingSchemeName — the name of a coding scheme in the Coding Scheme Identification Sequence;
#: GridAbsorbingMaterial, GridSpacingMaterial — what an anti-scatter grid is made of (DX, C.8.11.5).
TECHNICAL_TEXT = frozenset({"ExtendedCodeMeaning", "CodingSchemeName", "GridAbsorbingMaterial", "GridSpacingMaterial"})
#: Keyword endings that make an LO/SH/UC/UR attribute a part of a code (PS3.3 Section 8).
CODE_ENDINGS = (
    "CodeValue",
    "CodeMeaning",
    "CodingSchemeDesignator",
    "CodingSchemeVersion",
    "CodingSchemeRegistry",
    "CodingSchemeURL",
    "MappingResourceName",
)
#: Words that make a keyword free text (removed whatever its head word).
FREE_TEXT_WORDS = frozenset(
    {
        "Comment",
        "Comments",
        "Definition",
        "Description",
        "Descriptions",
        "Detail",
        "Explanation",
        "Information",
        "Note",
        "Notes",
        "Reason",
        "Reasons",
        "Summary",
        "Text",
        "Title",
    }
)
#: Words that make a keyword about a person, a place, travel or a registration (removed). ``Creator``
#: counts only when not a private creator (``...PrivateCreator`` names a vendor's block).
IDENTITY_WORDS = frozenset(
    {
        "Address",
        "Boarding",
        "Breed",
        "Calendar",
        "Carrier",
        "Certification",
        "Contact",
        "Creator",
        "Itinerary",
        "Location",
        "Media",
        "Operator",
        "Owner",
        "Person",
        "Physician",
        "Registration",
    }
)
#: Head words (a keyword's last word) that name something technical: equipment, software, a kind, a
#: mode or method, a setting, or a name, label or identifier of a thing (a coil, a beam, a segment).
TECHNICAL_HEADS = frozenset(
    {
        "Acquired",
        "Calibration",
        "Code",
        "Configuration",
        "Data",
        "Filter",
        "Filters",
        "Function",
        "Group",
        "ID",
        "IDs",
        "Identifier",
        "Indicator",
        "Kernel",
        "Keyword",
        "Label",
        "Manufacturer",
        "Material",
        "Method",
        "Mode",
        "Name",
        "Names",
        "Nomenclature",
        "Nucleus",
        "Number",
        "Parameters",
        "Position",
        "Power",
        "Priority",
        "Profile",
        "Protocols",
        "Radiopharmaceutical",
        "Reference",
        "Rejection",
        "Route",
        "Setting",
        "Size",
        "Source",
        "Technique",
        "Type",
        "Types",
        "Used",
        "Vector",
        "Version",
        "Versions",
    }
)
#: CamelCase words of a keyword; runs of capitals (``LUT``, ``MIME``, ``IDs``) stay one word.
_WORDS_RE = re.compile(r"[A-Z]{2,}s?(?![a-z])|[A-Z]?[a-z]+|[A-Z]|\d+")


def keyword_words(keyword: str) -> list[str]:
    """``"MIMETypeOfEncapsulatedDocument"`` → ``["MIME", "Type", "Of", "Encapsulated", "Document"]``."""
    return _WORDS_RE.findall(keyword)


def classify_unlisted(vr: str, keyword: str) -> Unlisted | None:
    """The class of an attribute the table does not list; None for VRs the rule leaves alone."""
    if vr in _PERSON_VRS:
        return Unlisted.PERSON_NAME
    if vr in _TEXT_VRS:
        return Unlisted.TECHNICAL_TEXT if keyword in TECHNICAL_TEXT else Unlisted.FREE_TEXT
    if vr not in _NAMING_VRS:
        return None
    if keyword.endswith(CODE_ENDINGS):
        return Unlisted.CODED
    words = keyword_words(keyword)
    if not words:
        return Unlisted.UNCLASSIFIED
    if FREE_TEXT_WORDS.intersection(words):
        return Unlisted.FREE_TEXT
    if keyword.endswith(("PrivateCreator", "PrivateCreatorReference")):
        return Unlisted.TECHNICAL  # names a vendor's private block
    if IDENTITY_WORDS.intersection(words) or words[0] == "Route":
        return Unlisted.IDENTITY  # a leading Route is travel (DICOS); a trailing one a route of administration
    if words[-1] in TECHNICAL_HEADS or "MIME" in words:
        return Unlisted.TECHNICAL
    return Unlisted.UNCLASSIFIED


@cache
def unlisted_attributes() -> Mapping[int, Unlisted]:
    """Every data dictionary attribute (current or retired) that no row of the table names, with its
    class; groups 0000 and 0002 are left out (the engine removes them from a data set anyway)."""
    rows = load_rows()
    listed = {row.value for row in rows if row.is_exact}
    wildcards = [(row.mask, row.value) for row in rows if not row.is_exact]
    found: dict[int, Unlisted] = {}
    for tag, (vr, _vm, _name, _retired, keyword) in DicomDictionary.items():
        if tag in listed or tag >> 16 <= 0x0002 or any(tag & mask == value for mask, value in wildcards):
            continue
        kind = classify_unlisted(vr, keyword)
        if kind is not None:
            found[tag] = kind
    return found


@cache
def required_text_tags() -> frozenset[int]:
    """Tags of the text attributes PS3.3 makes Type 1 or 1C in some module (shipped, derived data)."""
    text = resources.files("sendit.deid").joinpath("data", REQUIRED_TEXT_FILE).read_text(encoding="utf-8")
    tags = {tag_for_keyword(keyword) for keyword in json.loads(text)["keywords"]}
    tags.discard(None)
    return frozenset(tag for tag in tags if tag is not None)
