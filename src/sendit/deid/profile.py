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

* Retain Longitudinal Temporal Information with Modified Dates: DA/DT shifted by the identifiers'
  jitter; TM kept (a whole-day shift leaves a time of day unchanged); other VRs keep the Basic
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
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from pydicom.datadict import dictionary_VR

DATA_FILE = "ps3.15-annex-e-attributes.json"
SAFE_PRIVATE_FILE = "safe-private-attributes.json"

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
_DATE_VRS = frozenset({"DA", "DT"})
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
    SHIFT_DATE = "S"  # DA/DT shifted by the jitter; TM kept
    WALK = "U*"  # a sequence kept and walked item by item
    CLEAN = "C"  # text cleaned (sendit.deid.clean); a sequence walked in clean mode
    RETAIN = "R"  # kept exactly as it is: no UID remap, no date shift (retain options' K on UI/DA/DT)
    RECIPE = "recipe"  # a deid recipe rule decides (engine); never produced from the table itself


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
                if vr in _DATE_VRS:
                    action = Action.SHIFT_DATE
                elif vr == "TM":
                    action = Action.KEEP
            elif cleaning and vr in _CLEANABLE_VRS:
                action = Action.CLEAN
                fallback[row.value] = basic
        exact[row.value] = action
    return ActionTable(
        exact=exact,
        removed_groups=frozenset(removed_groups),
        private=private,
        rows=len(load_rows()),
        fallback=fallback,
    )
