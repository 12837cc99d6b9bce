"""The de-identification engine: one walk over each data set with a precompiled action table.

Why a hand-rolled walk: ``remove_private_tags()`` plus a pass per rule costs more than reading and
writing the file (see DESIGN.md, "Measured"). Here every element is looked at once, in every
nested sequence, and untouched elements stay in pydicom's raw form, so writing them is a byte copy.

What happens to an element (the table comes from :mod:`sendit.deid.profile`):

* private (odd group), curves (50xx), overlays (60xx), group lengths (gggg,0000), command and file
  meta groups inside the data set (0000, 0002: they do not belong there), and public tags
  that neither the table nor pydicom's data dictionary knows (we cannot tell what they hold) are
  removed;
* table actions: X removes, Z empties (a sequence gets no items), D writes the dummy of the VR
  (:data:`DUMMY_VALUES`; a sequence gets one empty item because its content, codes included, may
  name a person or place), U remaps the UID, and ``U*`` sequences are walked;
* everything else is kept, except that every UI value anywhere (file meta included) that is not a
  registered DICOM UID is remapped, every DA/DT value is shifted by the identifiers' jitter when
  the modified-dates option is on, and every kept sequence is walked.

UIDs become ``2.25.<first 128 bits of HMAC-SHA256(key, uid)>``: the same input UID maps to the same
output for the same key in every process and run, so references inside sequences keep pointing at
their targets and a re-send lands on the same instance. Registered UIDs (SOP classes, transfer
syntaxes, coding schemes, well-known frames of reference: those in pydicom's UID dictionary) are
kept; so are the file meta's TransferSyntaxUID and ImplementationClassUID, which describe software,
not patients.

Any failure raises :class:`DeidError` whose message names the tag and what failed, never a value;
the underlying exception is dropped (``from None``) because its text may quote the value.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.config import IGNORE
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID_dictionary,
)

from sendit import __version__
from sendit.deid.clean import clean_text, identifier_tokens, name_tokens
from sendit.deid.pixels import PixelError, PixelRules, blank_regions, decide
from sendit.deid.profile import (
    BASIC_PROFILE_CODE,
    OPTIONS,
    Action,
    DeidOptions,
    OptionInfo,
    build_action_table,
    descriptor_tags,
)
from sendit.deid.recipe import FUNCTIONS, PREDICATES, FuncContext, HeaderPlan, HeaderRule, Recipe, default_filter
from sendit.deid.writer import InvalidElementError, dictionary_vr, tag_text, write_part10
from sendit.identifiers.base import Identifiers

#: Registered DICOM UIDs are public knowledge and are never remapped.
REGISTERED_UIDS: frozenset[str] = frozenset(UID_dictionary)

#: The value D writes, per VR. Text fits every VR's maximum length (AE/CS/SH: 16).
DUMMY_VALUES: dict[str, Any] = {
    "AE": "ANONYMIZED",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UR": "urn:sendit:anonymized",
    "UT": "ANONYMIZED",
    "AT": 0,
    "FD": 0.0,
    "FL": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
    "OB": b"\x00" * 8,
    "OD": b"\x00" * 8,
    "OF": b"\x00" * 8,
    "OL": b"\x00" * 8,
    "OV": b"\x00" * 8,
    "OW": b"\x00" * 8,
    "UN": b"\x00" * 8,
}

_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_ACCESSION = 0x00080050
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_IDENTITY_REMOVED = 0x00120062
_METHOD = 0x00120063
_METHOD_CODES = 0x00120064
_LONGITUDINAL_MODIFIED = 0x00280303
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD) sequence delimitation item
_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float / Double Float Pixel Data

_DT_RE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{6}(?:\.\d{1,6})?|\d{4}|\d{2})?([+-]\d{4})?$")


class _RedactValues(logging.Filter):
    """pydicom logs every invalid value it meets, quoted ("Invalid value for VR DA: '…'"): that text
    is often PHI. Quoted parts are blanked before any handler sees the record."""

    _QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._QUOTED.sub("'<redacted>'", record.getMessage())
        record.args = None
        return True


def _redact_pydicom_logs() -> None:
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, _RedactValues) for f in logger.filters):
        logger.addFilter(_RedactValues())


_redact_pydicom_logs()


class DeidError(Exception):
    """An image could not be de-identified and must not be sent. The message carries no PHI."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DeidResult:
    """The de-identified identity of one written file (every value here is already free of PHI)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str
    path: Path


class _BadValue(Exception):
    """A value the engine will not guess about; the text is PHI-free by construction."""


_dictionary_vr = dictionary_vr  # the writer's cached look-up, shared


def _strings(elem: DataElement | RawDataElement) -> list[str]:
    """An element's values as text, padding stripped; raw values must be plain ASCII."""
    value = elem.value
    if value is None or value == b"" or value == "":
        return []
    if isinstance(value, bytes):
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            raise _BadValue("value is not ASCII") from None
        return [part.strip(" \x00") for part in text.split("\\")]
    if isinstance(value, str):
        return [value.strip(" \x00")]
    if isinstance(value, Iterable):
        return [str(v).strip(" \x00") for v in value]
    return [str(value).strip(" \x00")]


def _days_shifted(year: int, month: int, day: int, days: int) -> dt.date:
    try:
        return dt.date(year, month, day) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        raise _BadValue("date is not a valid calendar date or leaves the supported range") from None


def shift_da(value: str, days: int) -> str:
    """Shift one DA value (``YYYYMMDD``; legacy ``YYYY.MM.DD`` accepted) by whole days."""
    text = value.strip()
    if len(text) == 10 and text[4] == "." and text[7] == ".":
        text = text[:4] + text[5:7] + text[8:]
    if len(text) != 8 or not text.isdigit():
        raise _BadValue("malformed DA value")
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
        raise _BadValue("malformed DT value")
    year, month, day, time_part, offset = match.groups()
    if time_part is not None and day is None:
        raise _BadValue("malformed DT value")
    new = _days_shifted(int(year), int(month or 1), int(day or 1), days)
    if month is None:
        date_text = f"{new.year:04d}"
    elif day is None:
        date_text = f"{new.year:04d}{new.month:02d}"
    else:
        date_text = f"{new.year:04d}{new.month:02d}{new.day:02d}"
    return date_text + (time_part or "") + (offset or "")


def _elem(tag: int, vr: str, value: Any) -> DataElement:
    """A new element, skipping pydicom's per-value validation: every value written here is either
    built valid by this module or checked once up front (the identifiers)."""
    return DataElement(tag, vr, value, validation_mode=IGNORE)


def _one_or_many(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values


#: Text VRs that the clean action works on (CS is a constrained code string and is kept).
_CLEAN_VRS = frozenset({"AE", "LO", "LT", "SH", "ST", "UC", "UT"})
#: In clean mode these stay as they are: they are parts of codes and of the SR tree's structure.
_CODE_TAGS = frozenset(
    {0x00080100, 0x00080102, 0x00080103, 0x00080105, 0x0008010F, 0x00080117, 0x0040DB00, 0x0040A040, 0x0040A010}
)
_NUMERIC_VRS = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float, "AT": int}
_BURNED_IN = 0x00280301
CLEAN_PIXEL_CODE = OptionInfo("", "113101", "Clean Pixel Data Option")


_NORMAL, _CLEAN, _DUMMY = 0, 1, 2  # how a walk treats kept values: as is, cleaned, replaced by dummies
#: In a dummied sequence these keep their values: coded strings and binary numbers hold structure.
_KEPT_WHEN_DUMMY = frozenset({"CS", "IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "OF", "OD"})


class BurnedInError(DeidError):
    """The image may show identifying text in its pixels and no rule can blank it: quarantine."""


class _Ctx:
    """Per-image state of one walk: the shift, the recipe's variables, what was kept on purpose."""

    __slots__ = ("jitter", "known", "variables", "retained")

    def __init__(self, jitter: int, variables: Mapping[str, str]) -> None:
        self.jitter = jitter
        self.known: frozenset[str] = frozenset()
        self.variables = variables
        self.retained = 0


def _identity(uid: str) -> str:
    return uid.strip(" \x00")


class Deidentifier:
    """PS3.15 Basic Profile (+ options, + a deid recipe, + burned-in text rules); thread- and
    process-safe.

    Construct once per process and reuse: the action table is compiled here and UID remaps are
    cached. Pickling passes only the key, options and recipes, so it can go to a process pool.

    ``recipe`` layers its ``%header`` rules on top of the profile (and its ``%filter`` rules join the
    pixel rules); ``pixel_filter`` is the burned-in text filter (default: the shipped one, see
    :func:`sendit.deid.recipe.default_filter`; ``None`` for none — Burned In Annotation YES is
    still quarantined).
    """

    def __init__(
        self,
        secret_key: str | bytes,
        options: DeidOptions | None = None,
        *,
        recipe: Recipe | None = None,
        pixel_filter: Recipe | None | str = "default",
    ) -> None:
        key = secret_key.encode("utf-8") if isinstance(secret_key, str) else bytes(secret_key)
        if not key:
            raise ValueError("the de-identification secret key must not be empty")
        self._key = key
        self.options = options if options is not None else DeidOptions()
        self.recipe = recipe
        if isinstance(pixel_filter, str):
            if pixel_filter != "default":
                raise ValueError("pixel_filter is a Recipe, None, or 'default'")
            pixel_filter = default_filter()
        self.pixel_filter = pixel_filter
        self._table = build_action_table(self.options.columns())
        self._profile = self._table.exact
        self._fallback = self._table.fallback
        self._plan: HeaderPlan = recipe.header_plan() if recipe is not None else HeaderPlan({}, (), ())
        exact = dict(self._profile)
        for tag in self._plan.public:
            exact[tag] = Action.RECIPE
        self._exact = exact
        self._removed_groups = self._table.removed_groups
        self._shift = self.options.retain_long_modified_dates
        self._safe_private = self._table.private is Action.CLEAN
        self._simple_private = not self._safe_private and not self._plan.private_rules
        self._needs_known = (
            any(action is Action.CLEAN for action in self._profile.values())
            or any(
                rule.value is not None and rule.value.text in ("clean_text", "contains_identifier")
                for rule in self.recipe.header
            )
            if self.recipe is not None
            else any(action is Action.CLEAN for action in self._profile.values())
        )
        recipes = [r for r in (self.recipe, pixel_filter) if r is not None]
        self._pixel_rules = PixelRules.from_recipes(recipes)
        self._remap: Callable[[str], str] = (
            _identity if self.options.retain_uids else lru_cache(maxsize=65536)(self._remap_uncached)
        )

    def __repr__(self) -> str:  # never show the key
        return f"Deidentifier(options={self.options!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._key, self.options, self.recipe, self.pixel_filter))

    # -- UIDs ---------------------------------------------------------------------------------

    def remap_uid(self, uid: str) -> str:
        """The UID this engine writes for ``uid``: registered DICOM UIDs unchanged, any other UID
        ``2.25.<int>`` from a keyed HMAC-SHA256 (≤ 44 characters, deterministic per key); with the
        Retain UIDs option every UID unchanged."""
        return self._remap(uid.strip(" \x00"))

    def _remap_uncached(self, uid: str) -> str:
        if not uid or uid in REGISTERED_UIDS:
            return uid
        digest = hmac.new(self._key, uid.encode("utf-8"), hashlib.sha256).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"

    # -- data sets ----------------------------------------------------------------------------

    def deidentify(self, ds: Dataset, ids: Identifiers) -> Dataset:
        """De-identify ``ds`` in place (and its file meta, if any) and return it.

        Raises :class:`BurnedInError` when the pixels may show identifying text that no rule blanks.
        """
        self._check_identifiers(ids)
        with warnings.catch_warnings():
            # pydicom's warnings quote values; none may reach a log.
            warnings.simplefilter("ignore")
            cleaned_pixels = self._pixels(ds)
            ctx = _Ctx(ids.jitter_days, self._variables(ids) if self._plan else {})
            if self._needs_known:
                ctx.known = self.known_identifiers(ds)
            self._walk(ds, ctx, _NORMAL)
            try:
                if cleaned_pixels:
                    ds[_BURNED_IN] = _elem(_BURNED_IN, "CS", "NO")
                self._mark(ds, ids, ctx, cleaned_pixels)
                self._add(ds, ctx)
                self._rebuild_file_meta(ds)
            except DeidError:
                raise
            except Exception as exc:
                raise DeidError(f"could not write de-identification attributes ({type(exc).__name__})") from None
        return ds

    def _pixels(self, ds: Dataset) -> bool:
        """Apply the burned-in text rules; True when regions were blanked."""
        try:
            decision = decide(ds, self._pixel_rules)
        except Exception as exc:
            raise DeidError(f"burned-in text rules could not be evaluated ({type(exc).__name__})") from None
        if decision.action == "pass":
            return False
        if decision.action == "quarantine":
            raise BurnedInError(f"burned-in annotation: {decision.label}")
        try:
            blank_regions(ds, decision.regions)
        except PixelError as exc:
            raise BurnedInError(f"burned-in annotation: {decision.label}; {exc}") from None
        return True

    def _variables(self, ids: Identifiers) -> dict[str, str]:
        """What ``var:NAME`` can name: the identifiers, their aliases in deid's recipes, custom fields."""
        values = {str(k): str(v) for k, v in ids.custom_fields.items()}
        values.update(
            patient_id=ids.patient_id,
            patient_name=ids.patient_name,
            accession_number=ids.accession_number,
            jitter_days=str(ids.jitter_days),
            jitter=str(ids.jitter_days),
            entity_id=ids.patient_id,
            item_id=ids.accession_number,
        )
        return values

    def known_identifiers(self, ds: Dataset) -> frozenset[str]:
        """Tokens the clean action cuts (see :mod:`sendit.deid.clean`), read before anything changes."""
        names: list[str] = []
        others: list[str] = []
        descriptors = descriptor_tags()

        def collect(item: Dataset) -> None:
            for tag in list(item.keys()):
                if tag >> 16 & 1:
                    continue
                elem = item[tag]
                vr = elem.VR
                if vr == "SQ":
                    for sub in elem.value or ():
                        collect(sub)
                    continue
                if vr not in _TEXT_FOR_KNOWN or elem.value in (None, ""):
                    continue
                values = [str(v) for v in elem.value] if elem.VM > 1 else [str(elem.value)]
                if vr == "PN":
                    names.extend(values)
                elif tag not in descriptors and self._table_basic(tag) in (
                    Action.REMOVE,
                    Action.EMPTY,
                    Action.DUMMY,
                ):
                    others.extend(values)

        collect(ds)
        return frozenset(name_tokens(names) | identifier_tokens(others))

    def _table_basic(self, tag: int) -> Action:
        """The action the profile (with options) takes, or its fallback for a cleaned attribute."""
        action = self._profile.get(tag, Action.KEEP)
        return self._fallback.get(tag, action) if action is Action.CLEAN else action

    def _check_identifiers(self, ids: Identifiers) -> None:
        for name, value, limit in (
            ("patient_id", ids.patient_id, 64),
            ("accession_number", ids.accession_number, 16),
            ("patient_name", ids.patient_name, 64),
        ):
            if len(value) > limit or "\\" in value:
                raise DeidError(f"replacement {name} is not a valid DICOM value (too long or has '\\')")
        if not ids.patient_id:
            raise DeidError("replacement patient_id is empty")

    def _walk(self, ds: Dataset, ctx: _Ctx, mode: int) -> None:
        exact = self._exact
        pending_creators: list[int] | None = None
        kept_blocks: set[tuple[int, int]] = set()
        for tag in list(ds.keys()):
            try:
                group = tag >> 16
                if group & 1:
                    if self._simple_private:
                        del ds[tag]
                    else:
                        if pending_creators is None:
                            pending_creators = []
                        self._private(ds, tag, ctx, pending_creators, kept_blocks)
                    continue
                if (group >> 8) in self._removed_groups or not tag & 0xFFFF or group <= 2:
                    del ds[tag]
                    continue
                known_vr = _dictionary_vr(tag)
                if known_vr is None:  # a public tag neither the table nor pydicom knows: it might hold anything
                    del ds[tag]
                    continue
                elem = ds.get_item(tag)
                vr = elem.VR
                if vr is None or vr == "UN":
                    vr = known_vr
                action: Action | None = exact.get(tag, Action.KEEP)
                if action is Action.RECIPE:
                    action = self._recipe(ds, tag, elem, vr, ctx)
                    if action is None:
                        continue
                if action is Action.KEEP:
                    if vr == "UI" or known_vr == "UI":  # also a UID a vendor encoded with another VR
                        self._remap_element(ds, tag, elem)
                    elif vr == "SQ":
                        self._walk_sequence(ds, tag, ctx, mode)
                    elif mode == _DUMMY:
                        if vr not in _KEPT_WHEN_DUMMY and elem.value not in (None, b"", ""):
                            ds[tag] = _elem(tag, vr, DUMMY_VALUES.get(vr, b"\x00" * 8))
                    elif self._shift and (vr == "DA" or vr == "DT"):
                        self._shift_element(ds, tag, elem, vr, ctx.jitter)
                    elif mode == _CLEAN:
                        if vr == "PN":
                            ds[tag] = _elem(tag, vr, "")
                        elif vr in _CLEAN_VRS and tag not in _CODE_TAGS:
                            self._clean_element(ds, tag, elem, vr, ctx, Action.EMPTY)
                elif action is Action.REMOVE:
                    del ds[tag]
                elif action is Action.REMAP_UID:
                    self._remap_element(ds, tag, elem)
                elif action is Action.SHIFT_DATE:
                    if vr == "DA" or vr == "DT":
                        self._shift_element(ds, tag, elem, vr, ctx.jitter)
                elif action is Action.WALK and vr == "SQ":
                    self._walk_sequence(ds, tag, ctx, mode)
                elif action is Action.RETAIN:
                    pass
                elif action is Action.CLEAN:
                    if vr == "SQ":
                        self._walk_sequence(ds, tag, ctx, _DUMMY if mode == _DUMMY else _CLEAN)
                    else:
                        self._clean_element(ds, tag, elem, vr, ctx, self._fallback.get(tag, Action.REMOVE))
                elif action is Action.DUMMY:
                    self._dummy(ds, tag, elem, vr, ctx)
                else:  # EMPTY, or WALK on something that is not a sequence
                    ds[tag] = _elem(tag, vr, Sequence() if vr == "SQ" else empty_value_for_VR(vr))
            except DeidError as exc:
                raise DeidError(f"{tag_text(tag)} > {exc.reason}") from None
            except _BadValue as exc:
                raise DeidError(f"{tag_text(tag)}: {exc}") from None
            except Exception as exc:
                raise DeidError(f"{tag_text(tag)}: {type(exc).__name__} while de-identifying") from None
        if pending_creators:
            for creator in pending_creators:
                if (creator >> 16, creator & 0xFF) not in kept_blocks:
                    del ds[creator]

    def _dummy(self, ds: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str, ctx: _Ctx) -> None:
        """D: a dummy value. A sequence keeps its items, every value inside replaced by a dummy of its
        VR (codes, numbers and UIDs stay valid: CS and numbers kept, UIDs remapped), so Type 1
        attributes inside stay present; an empty sequence stays empty (an added empty item would lack
        the item's Type 1 attributes)."""
        if vr == "UI":
            self._remap_element(ds, tag, elem)
        elif vr == "SQ":
            if ds[tag].value:
                self._walk_sequence(ds, tag, ctx, _DUMMY)
        else:
            ds[tag] = _elem(tag, vr, DUMMY_VALUES.get(vr, b"\x00" * 8))

    def _apply_fallback(
        self, ds: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str, action: Action, ctx: _Ctx
    ) -> None:
        if action is Action.DUMMY:
            self._dummy(ds, tag, elem, vr, ctx)
        elif action is Action.EMPTY:
            ds[tag] = _elem(tag, vr, Sequence() if vr == "SQ" else empty_value_for_VR(vr))
        else:
            del ds[tag]

    def _clean_element(
        self, ds: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str, ctx: _Ctx, fallback: Action
    ) -> None:
        """The C action on text: keep what :func:`clean_text` leaves; anything else → ``fallback``."""
        try:
            value = ds[tag].value  # decoded with the data set's character set
        except Exception:
            value = None
        if value is None or value == "":
            return
        values = list(value) if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]
        if not all(isinstance(v, str) for v in values):
            self._apply_fallback(ds, tag, elem, vr, fallback, ctx)
            return
        known = set(ctx.known)
        cleaned = [clean_text(v, known) for v in values]
        limit = _MAX_TEXT.get(vr)
        cleaned = [c[:limit] if limit else c for c in cleaned]
        if not any(cleaned):
            self._apply_fallback(ds, tag, elem, vr, fallback, ctx)
            return
        ds[tag] = _elem(tag, vr, cleaned[0] if len(cleaned) == 1 else cleaned)

    def _private(
        self, ds: Dataset, tag: int, ctx: _Ctx, pending_creators: list[int], kept_blocks: set[tuple[int, int]]
    ) -> None:
        """A private element: kept if safe-listed (Retain Safe Private) or a recipe says so."""
        group, element = tag >> 16, tag & 0xFFFF
        if element < 0x10:  # private group length and reserved elements
            del ds[tag]
            return
        if element < 0x100:  # a private creator: decided after its block
            pending_creators.append(tag)
            return
        block = element >> 8
        rule = self._plan.for_private(tag) if self._plan.private_rules else None
        keep = False
        if rule is not None and rule.action in ("KEEP", "REPLACE", "ADD"):
            keep = True
            if rule.action != "KEEP":
                elem = ds.get_item(tag)
                vr = elem.VR if elem.VR not in (None, "UN") else "LO"
                ds[tag] = _elem(tag, vr, self._value(rule, ds, tag, vr, ctx))
            ctx.retained += 1
        elif rule is None and self._safe_private:
            creator_tag = (group << 16) | block
            creator = ""
            if creator_tag in ds:
                raw = ds[creator_tag].value
                creator = (raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)).strip(" \x00")
            keep = (creator, group, element & 0xFF) in safe_private_attributes()
        if not keep:
            del ds[tag]
            return
        elem = ds.get_item(tag)
        if elem.VR == "SQ" and not isinstance(elem, RawDataElement):
            self._walk_sequence(ds, tag, ctx, _NORMAL)
        kept_blocks.add((group, block))

    def _recipe(self, ds: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str, ctx: _Ctx) -> Action | None:
        """Apply the recipe rule for ``tag``; returns the profile action to carry on with, or None."""
        rule = self._plan.public[tag]
        profile = self._profile.get(tag, Action.KEEP)
        action = rule.action
        if action == "KEEP":
            if vr == "SQ":
                if profile not in (Action.KEEP, Action.WALK):
                    ctx.retained += 1
                return Action.WALK
            if profile not in (Action.KEEP, Action.RETAIN):
                ctx.retained += 1
            return None
        if action in ("REPLACE", "ADD"):
            if vr == "SQ":
                raise DeidError("a recipe cannot write a text value into a sequence")
            ds[tag] = _elem(tag, vr, self._value(rule, ds, tag, vr, ctx))
            return None
        if action == "JITTER":
            if vr not in ("DA", "DT"):
                return profile
            assert rule.value is not None
            days = self._resolve_text(rule, ds, tag, vr, ctx)
            try:
                shift = int(days)
            except ValueError:
                raise DeidError("recipe JITTER value is not a whole number of days") from None
            self._shift_element(ds, tag, elem, vr, shift)
            return None
        if action == "REMOVE":
            predicate = PREDICATES[rule.value.text] if rule.value is not None else None  # REMOVE f func:p
            if predicate is not None and not predicate(self._func_context(ds, tag, vr, ctx)):
                return profile
            del ds[tag]
            return None
        # BLANK
        ds[tag] = _elem(tag, vr, Sequence() if vr == "SQ" else empty_value_for_VR(vr))
        return None

    def _func_context(self, ds: Dataset, tag: int, vr: str, ctx: _Ctx) -> FuncContext:
        try:
            value = ds[tag].value if tag in ds else ""
        except Exception:
            value = ""
        if isinstance(value, bytes):
            raise DeidError("a recipe function cannot read a binary value")
        text = "\\".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value or "")
        return FuncContext(text, vr, self._key, ctx.known, self.remap_uid)

    def _resolve_text(self, rule: HeaderRule, ds: Dataset, tag: int, vr: str, ctx: _Ctx) -> str:
        value = rule.value
        assert value is not None
        if value.kind == "literal":
            return value.text
        if value.kind == "var":
            if value.text not in ctx.variables:
                raise DeidError(f"recipe variable {value.text!r} is not defined for this image")
            return ctx.variables[value.text]
        return str(FUNCTIONS[value.text](self._func_context(ds, tag, vr, ctx)))

    def _value(self, rule: HeaderRule, ds: Dataset, tag: int, vr: str, ctx: _Ctx) -> Any:
        text = self._resolve_text(rule, ds, tag, vr, ctx)
        convert = _NUMERIC_VRS.get(vr)
        try:
            if convert is not None:
                parts = [convert(part) for part in text.split("\\") if part.strip()]
                return parts[0] if len(parts) == 1 else parts
            if vr in _BYTES_VRS:
                return text.encode("utf-8")
        except ValueError:
            raise DeidError(f"recipe value is not valid for VR {vr}") from None
        if vr == "UI" and text and not _UID_RE.match(text):
            raise DeidError("recipe value is not a valid UID")
        return text if "\\" not in text else text.split("\\")

    def _add(self, ds: Dataset, ctx: _Ctx) -> None:
        """The recipe's ``ADD <attribute> <value>`` rules: set on the top level (created if absent)."""
        for rule in self._plan.adds:
            tag = rule.field.tag
            assert tag is not None
            vr = _dictionary_vr(tag) or "LO"
            if vr == "SQ":
                raise DeidError(f"{tag_text(tag)}: a recipe cannot ADD a sequence")
            try:
                ds[tag] = _elem(tag, vr, self._value(rule, ds, tag, vr, ctx))
            except DeidError as exc:
                raise DeidError(f"{tag_text(tag)}: {exc.reason}") from None

    def _walk_sequence(self, ds: Dataset, tag: int, ctx: _Ctx, mode: int) -> None:
        for index, item in enumerate(ds[tag].value):
            try:
                self._walk(item, ctx, mode)
            except DeidError as exc:
                raise DeidError(f"item {index} > {exc.reason}") from None

    def _remap_element(self, ds: Dataset, tag: int, elem: DataElement | RawDataElement) -> None:
        values = _strings(elem)
        if values:
            remap = self._remap
            ds[tag] = _elem(tag, "UI", _one_or_many([remap(v) for v in values]))

    def _shift_element(self, ds: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str, jitter: int) -> None:
        values = _strings(elem)
        if values:
            shift = shift_da if vr == "DA" else shift_dt
            shifted = [shift(v, jitter) if v else v for v in values]
            ds[tag] = _elem(tag, vr, _one_or_many(shifted))

    def method_description(self, jitter_days: int, *, retained: int = 0, pixels: bool = False) -> list[str]:
        """(0012,0063) values: each ≤ 64 characters, as LO requires."""
        lines = [f"Sendit {__version__}: PS3.15 Basic Profile"]
        lines += [meaning for _, meaning in self._option_codes(jitter_days)]
        if pixels:
            lines.append(CLEAN_PIXEL_CODE.meaning + " (regions blanked)")
        if self.recipe is not None:
            lines.append(f"recipe {self.recipe.source}"[:64])
            if retained:
                lines.append(f"recipe kept {retained} attribute(s) the profile changes"[:64])
        return lines

    def _option_codes(self, jitter_days: int) -> list[tuple[str, str]]:
        codes: list[tuple[str, str]] = []
        for name in self.options.enabled():
            info = OPTIONS[name]
            if name == "retain_long_modified_dates" and jitter_days == 0:
                # A zero shift keeps the real dates: say so rather than claim they were modified.
                info = OPTIONS["retain_long_full_dates"]
            codes.append((info.code, info.meaning))
        return codes

    def _mark(self, ds: Dataset, ids: Identifiers, ctx: _Ctx, pixels: bool) -> None:
        """Write the identifiers and say what was done (0012,0062/0063/0064; 0028,0303)."""
        ds[_PATIENT_ID] = _elem(_PATIENT_ID, "LO", ids.patient_id)
        ds[_PATIENT_NAME] = _elem(_PATIENT_NAME, "PN", ids.patient_name)
        ds[_ACCESSION] = _elem(_ACCESSION, "SH", ids.accession_number)
        ds[_IDENTITY_REMOVED] = _elem(_IDENTITY_REMOVED, "CS", "YES")
        description = self.method_description(ids.jitter_days, retained=ctx.retained, pixels=pixels)
        ds[_METHOD] = _elem(_METHOD, "LO", _one_or_many(description))
        codes = [(BASIC_PROFILE_CODE.code, BASIC_PROFILE_CODE.meaning)]
        if pixels:
            codes.append((CLEAN_PIXEL_CODE.code, CLEAN_PIXEL_CODE.meaning))
        codes += self._option_codes(ids.jitter_days)
        items = []
        for code, meaning in codes:
            item = Dataset()
            item[0x00080100] = _elem(0x00080100, "SH", code)
            item[0x00080102] = _elem(0x00080102, "SH", "DCM")
            item[0x00080104] = _elem(0x00080104, "LO", meaning)
            items.append(item)
        ds[_METHOD_CODES] = _elem(_METHOD_CODES, "SQ", Sequence(items))
        if self._shift:
            modified = "MODIFIED" if ids.jitter_days else "UNMODIFIED"
        elif self.options.retain_long_full_dates:
            modified = "UNMODIFIED"
        else:
            modified = "REMOVED"
        ds[_LONGITUDINAL_MODIFIED] = _elem(_LONGITUDINAL_MODIFIED, "CS", modified)

    def _rebuild_file_meta(self, ds: Dataset) -> None:
        """A fresh file meta: only what Part 10 needs, SOP UIDs taken from the de-identified data set.

        Anything else the source put there (source/sending AE titles, private information) is dropped.
        """
        old = getattr(ds, "file_meta", None)
        if old is None:
            return
        transfer_syntax = old.get("TransferSyntaxUID") or _transfer_syntax_of(ds)
        meta = FileMetaDataset()
        meta[0x00020001] = _elem(0x00020001, "OB", b"\x00\x01")
        sop_class = _first(ds, _SOP_CLASS) or self.remap_uid(str(old.get("MediaStorageSOPClassUID", "")))
        sop_instance = _first(ds, _SOP_INSTANCE) or self.remap_uid(str(old.get("MediaStorageSOPInstanceUID", "")))
        for tag, vr, value in (
            (0x00020002, "UI", sop_class),
            (0x00020003, "UI", sop_instance),
            (0x00020010, "UI", transfer_syntax),
            (0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID),
            (0x00020013, "SH", f"SENDIT_{__version__}"[:16]),
        ):
            if value:
                meta[tag] = _elem(tag, vr, value)
        ds.file_meta = meta

    # -- files --------------------------------------------------------------------------------

    def deidentify_file(self, src: Path, dst: Path, ids: Identifiers) -> DeidResult:
        """Read ``src``, de-identify, write ``dst`` atomically (``.part`` then rename).

        The transfer syntax and pixel data are kept byte for byte (nothing is decoded). On any
        failure no output file is left behind and :class:`DeidError` says why.
        """
        src, dst = Path(src), Path(dst)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dicom(src)
            self.deidentify(ds, ids)
            sop_instance = _first(ds, _SOP_INSTANCE)
            if not sop_instance:
                raise DeidError("(0008,0018) SOPInstanceUID is missing")
            part = dst.with_suffix(".part")
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                write_part10(ds, part)
                os.replace(part, dst)
            except BaseException as exc:
                part.unlink(missing_ok=True)
                if isinstance(exc, InvalidElementError):  # names the tag and the rule, never the value
                    raise DeidError(str(exc)) from None
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise  # a full disk is the folder's problem, not the image's: the caller retries
                if isinstance(exc, Exception):
                    raise DeidError(f"could not write the de-identified file ({type(exc).__name__})") from None
                raise
        return DeidResult(
            study_uid=_first(ds, _STUDY_UID),
            series_uid=_first(ds, _SERIES_UID),
            sop_instance_uid=sop_instance,
            sop_class_uid=_first(ds, _SOP_CLASS),
            transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
            patient_id=ids.patient_id,
            path=dst,
        )


def _rebuild(key: bytes, options: DeidOptions, recipe: Recipe | None, pixel_filter: Recipe | None) -> Deidentifier:
    return Deidentifier(key, options, recipe=recipe, pixel_filter=pixel_filter)


_TEXT_FOR_KNOWN = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "DA", "DT"})
_MAX_TEXT = {"AE": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240}
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@cache
def safe_private_attributes() -> frozenset[tuple[str, int, int]]:
    """(creator, group, element low byte) of every private attribute the Retain Safe Private option keeps."""
    text = resources.files("sendit.deid").joinpath("data", "safe-private-attributes.json").read_text(encoding="utf-8")
    return frozenset(
        (str(entry["creator"]), int(entry["group"], 16), int(entry["element"], 16))
        for entry in json.loads(text)["attributes"]
    )


def read_dicom(path: Path, *, headers_only: bool = False) -> Dataset:
    """Read a Part 10 file, refusing non-DICOM and truncated files with a PHI-free reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, force=False, stop_before_pixels=headers_only)
    except FileNotFoundError:
        raise DeidError("file not found") from None
    except Exception as exc:
        name = type(exc).__name__
        reason = "not a DICOM file" if name == "InvalidDicomError" else f"unreadable DICOM file ({name})"
        raise DeidError(reason) from None
    if not headers_only:
        _check_complete(ds, Path(path))
    return ds


def _check_complete(ds: Dataset, path: Path) -> None:
    """pydicom reads a file cut short without complaint; catch the cuts that leave a trace.

    A cut inside an element leaves it shorter than its declared length; a cut inside an
    undefined-length sequence or encapsulated pixel data leaves no closing delimiter at the end of the
    file; a cut anywhere before the pixel data leaves an image without pixels. (A non-image object
    cut exactly between two top-level elements is indistinguishable from a shorter object.)
    """
    keys = list(ds.keys())
    if not keys:
        raise DeidError("truncated file: no data elements")
    last_tag = keys[-1]
    last = ds.get_item(last_tag)
    if isinstance(last, RawDataElement):
        declared, value = last.length, last.value
        if declared != _UNDEFINED_LENGTH and value is not None and len(value) < declared:
            raise DeidError(f"truncated file: {tag_text(last_tag)} is shorter than its declared length")
    else:
        declared = _UNDEFINED_LENGTH if last.is_undefined_length else 0
    if declared == _UNDEFINED_LENGTH:
        little = ds.original_encoding[1] is not False
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 8))
            tail = handle.read(8)
        if tail != (_DELIMITER_LE if little else _DELIMITER_BE):
            raise DeidError(f"truncated file: {tag_text(last_tag)} has no closing delimiter")
    if not any(tag in ds for tag in _PIXEL_TAGS) and (0x00280010 in ds or _is_image_class(ds)):
        raise DeidError("truncated file: an image without pixel data")


def _is_image_class(ds: Dataset) -> bool:
    values = _strings(ds.get_item(_SOP_CLASS)) if _SOP_CLASS in ds else []
    return bool(values) and "Image Storage" in UID_dictionary.get(values[0], ("",))[0]


def _first(ds: Dataset, tag: int) -> str:
    """The first value of a UI element as text ('' if absent or empty)."""
    if tag not in ds:
        return ""
    values = _strings(ds.get_item(tag))
    return values[0] if values else ""


def _transfer_syntax_of(ds: Dataset) -> UID | None:
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return None
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian
