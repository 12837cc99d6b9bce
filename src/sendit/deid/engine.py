"""The de-identification engine: one walk over each data set with a precompiled action table.

Why a hand-rolled walk: ``remove_private_tags()`` plus a pass per rule costs more than reading and
writing the file (see DESIGN.md, "Measured"). Here every element is looked at once, in every
nested sequence, and untouched elements stay in pydicom's raw form, so writing them is a byte copy.

What happens to an element (the table comes from :mod:`sendit.deid.profile`; each action has one
handler in :meth:`Deidentifier._action_handlers`):

* private (odd group), curves (50xx), overlays (60xx), group lengths (gggg,0000), command and file
  meta groups inside the data set (0000, 0002: they do not belong there), and public tags
  that neither the table nor pydicom's data dictionary knows (we cannot tell what they hold) are
  removed;
* table actions: X removes, Z empties (a sequence gets no items), D writes the dummy of the VR
  (:data:`DUMMY_VALUES`; a sequence keeps its items with every value inside replaced), U remaps the
  UID (:mod:`sendit.deid.uids`), and ``U*`` sequences are walked;
* text the table does not list and the profile's rule for the unlisted removes (person names, free
  text, identity: :func:`sendit.deid.profile.unlisted_attributes`) is emptied, or given a dummy where
  the standard makes it Type 1, at every depth where values are kept as they are; inside a cleaned or
  dummied sequence it is cleaned or dummied like any other kept value;
* everything else is kept, except that every UI value anywhere (file meta included) that is not a
  registered DICOM UID is remapped, every DA/DT/TM value is shifted (the identifiers' jitter in days
  plus a keyed time of day offset, :mod:`sendit.deid.dates`) when the modified-dates option is on,
  and every kept sequence is walked;
* a deid recipe's rule, where there is one, decides first (:mod:`sendit.deid.recipe_rules`).

After the walk the image records what was done (:mod:`sendit.deid.marking`). Files are read by
:mod:`sendit.dicomio.reading` (which decides whether a file is whole) and written by
:mod:`sendit.deid.writer`.

Any failure raises :class:`DeidError` whose message names the tag and what failed, never a value;
the underlying exception is dropped (``from None``) because its text may quote the value.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import MAX_VALUE_LEN

from sendit.deid.clean import identifier_tokens, name_tokens
from sendit.deid.dates import Carried, Shift, shift_element
from sendit.deid.elements import BadValue, element, first_text, one_or_many, strings
from sendit.deid.errors import DeidError
from sendit.deid.marking import check_identifiers, mark, rebuild_file_meta
from sendit.deid.ocr import OcrSettings
from sendit.deid.pixels import PixelOutcome, PixelRules, decide, resolve
from sendit.deid.profile import (
    Action,
    DeidOptions,
    build_action_table,
    descriptor_tags,
    required_text_tags,
    safe_private_attributes,
)
from sendit.deid.recipe import HeaderPlan, Recipe, default_filter
from sendit.deid.recipe_rules import RecipeRules
from sendit.deid.scrub import scrub_words
from sendit.deid.uids import uid_remapper
from sendit.deid.writer import InvalidElementError, write_part10
from sendit.dicomio.headers import missing_uids
from sendit.dicomio.quiet import quiet
from sendit.dicomio.reading import UnreadableFile, read_dicom, read_dicom_digest
from sendit.dicomio.tags import (
    SERIES_INSTANCE_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    dictionary_vr,
    tag_text,
    tags_of,
)
from sendit.identifiers.base import Identifiers

# -- constants of the walk ---------------------------------------------------------------------------

_ZEROS = b"\x00" * 8
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
    "OB": _ZEROS,
    "OD": _ZEROS,
    "OF": _ZEROS,
    "OL": _ZEROS,
    "OV": _ZEROS,
    "OW": _ZEROS,
    "UN": _ZEROS,
}

_NORMAL, _CLEAN, _DUMMY = 0, 1, 2  # how a walk treats kept values: as is, cleaned, replaced by dummies
#: In a dummied sequence these keep their values: coded strings and binary numbers hold structure.
_KEPT_WHEN_DUMMY = frozenset({"CS", "IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "OF", "OD"})
#: Text VRs that the clean action works on (CS is a constrained code string and is kept).
_CLEAN_VRS = frozenset({"AE", "LO", "LT", "SH", "ST", "UC", "UT"})
#: In clean mode these stay as they are: they are parts of codes and of the SR tree's structure.
_CODE_TAGS = tags_of(
    "CodeValue",
    "CodingSchemeDesignator",
    "CodingSchemeVersion",
    "MappingResource",
    "ContextIdentifier",
    "ContextUID",
    "TemplateIdentifier",
    "ValueType",
    "RelationshipType",
)
#: Values read for the clean action's known identifiers (names, IDs, dates the profile changes).
_TEXT_FOR_KNOWN = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "DA", "DT"})


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
    #: What the burned-in text step decided (an OCR reading and its confidence, regions blanked);
    #: empty when no rule applied. Free of PHI: it never holds what OCR read.
    pixels: str = ""
    #: SHA-256 of the source file's bytes, the very bytes that were parsed (``digest=True`` only).
    sha256: str = ""


class _WalkState:
    """Per-image state of one walk: the date and time shift (and the days times carried into their
    dates), the identifiers the clean action cuts, the recipe's variables, how many attributes a
    recipe kept that the profile changes, and how the sequence being walked treats kept values
    (``mode``: as is, cleaned, or dummied)."""

    __slots__ = ("shift", "carried", "known", "variables", "retained", "mode")

    def __init__(self, shift: Shift, variables: Mapping[str, str]) -> None:
        self.shift = shift
        self.carried: Carried = {}
        self.known: frozenset[str] = frozenset()
        self.variables = variables
        self.retained = 0
        self.mode = _NORMAL


_Elem = DataElement | RawDataElement
#: One action's handler: (data set, tag, element, its VR, the dictionary's VR, walk state).
_Handler = Callable[[Dataset, int, _Elem, str, str, _WalkState], None]


class Deidentifier:
    """PS3.15 Basic Profile (+ options, + a deid recipe, + burned-in text rules); thread- and
    process-safe.

    Construct once per process and reuse: the action table is compiled here and UID remaps are
    cached. Pickling passes only the key, options and recipes, so it can go to a process pool.

    ``recipe`` layers its ``%header`` rules on top of the profile (and its ``%filter`` rules join the
    pixel rules); ``pixel_filter`` is the burned-in text filter (default: the shipped one, see
    :func:`sendit.deid.recipe.default_filter`; ``None`` for none — Burned In Annotation YES is
    still checked); ``ocr`` says how the images it flags are read (:mod:`sendit.deid.ocr`; default:
    OCR on, text blanked).
    """

    def __init__(
        self,
        secret_key: str | bytes,
        options: DeidOptions | None = None,
        *,
        recipe: Recipe | None = None,
        pixel_filter: Recipe | None | str = "default",
        ocr: OcrSettings | None = None,
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
        self.ocr = ocr if ocr is not None else OcrSettings()
        self._table = build_action_table(self.options.columns())
        self._profile = self._table.exact
        self._fallback = self._table.fallback
        self._unlisted_actions = self._table.unlisted
        self._plan: HeaderPlan = recipe.header_plan() if recipe is not None else HeaderPlan({}, (), ())
        exact = dict(self._profile)
        for tag in self._plan.public:
            exact[tag] = Action.RECIPE
        self._handlers = self._action_handlers()
        # the dispatch table resolved per tag once, so the walk does one look-up per element
        self._tag_handlers: dict[int, _Handler] = {tag: self._handlers[action] for tag, action in exact.items()}
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
        self._remap = uid_remapper(key, retain=self.options.retain_uids)
        self._recipe_rules = RecipeRules(self._plan, self._profile, key, self.remap_uid)

    def __repr__(self) -> str:  # never show the key
        return f"Deidentifier(options={self.options!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._key, self.options, self.recipe, self.pixel_filter, self.ocr))

    def remap_uid(self, uid: str) -> str:
        """The UID this engine writes for ``uid``: registered DICOM UIDs unchanged, any other UID
        ``2.25.<int>`` from a keyed HMAC-SHA256 (≤ 44 characters, deterministic per key); with the
        Retain UIDs option every UID unchanged."""
        return self._remap(uid.strip(" \x00"))

    # -- files --------------------------------------------------------------------------------

    def deidentify_file(self, src: Path, dst: Path, ids: Identifiers, *, digest: bool = False) -> DeidResult:
        """Read ``src``, de-identify, write ``dst`` atomically (``.part`` then rename).

        With ``digest`` the result carries the SHA-256 of ``src``, computed in the same read as the
        parse (the relay's content identity of an original, without reading it twice); a missing
        ``src`` then raises FileNotFoundError instead of DeidError.

        The transfer syntax and pixel data are kept byte for byte (nothing is decoded). On any
        failure no output file is left behind and :class:`DeidError` says why. A file without a SOP
        Instance UID is refused in ingest's words, and so is a result a recipe left without one.
        """
        src, dst = Path(src), Path(dst)
        with quiet():
            sha256 = ""
            try:
                if digest:
                    ds, sha256 = read_dicom_digest(src)
                else:
                    ds = read_dicom(src)
            except UnreadableFile as exc:
                raise DeidError(exc.reason) from None
            if not first_text(ds, SOP_INSTANCE_UID):  # ingest refuses it too, in these words
                raise DeidError(missing_uids(["SOPInstanceUID"]))
            outcome = self._deidentify(ds, ids)
            sop_instance = first_text(ds, SOP_INSTANCE_UID)
            if not sop_instance:  # a recipe emptied it: the file could not be stored anywhere
                raise DeidError(f"{missing_uids(['SOPInstanceUID'])} after de-identification")
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
            study_uid=first_text(ds, STUDY_INSTANCE_UID),
            series_uid=first_text(ds, SERIES_INSTANCE_UID),
            sop_instance_uid=sop_instance,
            sop_class_uid=first_text(ds, SOP_CLASS_UID),
            transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
            patient_id=ids.patient_id,
            path=dst,
            pixels=outcome.note,
            sha256=sha256,
        )

    # -- data sets ----------------------------------------------------------------------------

    def deidentify(self, ds: Dataset, ids: Identifiers) -> Dataset:
        """De-identify ``ds`` in place (and its file meta, if any) and return it.

        Raises :class:`BurnedInError` when the pixels may show identifying text that no rule blanks.
        """
        self._deidentify(ds, ids)
        return ds

    def _deidentify(self, ds: Dataset, ids: Identifiers) -> PixelOutcome:
        """:meth:`deidentify`, returning what the burned-in text step did."""
        check_identifiers(ids)
        with quiet():  # pydicom's warnings quote values; none may reach a log
            outcome = self._pixels(ds)
            shift = Shift(ids.jitter_days, ids.jitter_seconds if ids.jitter_days else 0)
            state = _WalkState(shift, self._variables(ids) if self._plan else {})
            if self._needs_known:
                state.known = self.known_identifiers(ds)
            self._walk(ds, state)
            try:
                recipe_source = self.recipe.source if self.recipe is not None else None
                mark(ds, ids, self.options, recipe_source, retained=state.retained, pixels=outcome.blanked)
                self._recipe_rules.add(ds, state)
                rebuild_file_meta(ds, self.remap_uid)
            except DeidError:
                raise
            except Exception as exc:
                raise DeidError(f"could not write de-identification attributes ({type(exc).__name__})") from None
        return outcome

    def _pixels(self, ds: Dataset) -> PixelOutcome:
        """Apply the burned-in text rules and OCR (:func:`sendit.deid.pixels.resolve`)."""
        try:
            decision = decide(ds, self._pixel_rules)
        except Exception as exc:
            raise DeidError(f"burned-in text rules could not be evaluated ({type(exc).__name__})") from None
        return resolve(ds, decision, self.ocr)

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

    # -- the walk -------------------------------------------------------------------------------

    def _walk(self, ds: Dataset, state: _WalkState) -> None:
        """Every element of ``ds`` once, in tag order, each through the handler of its action."""
        tag_handlers = self._tag_handlers
        keep = self._keep
        removed_groups = self._removed_groups
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
                        self._private(ds, tag, state, pending_creators, kept_blocks)
                    continue
                if (group >> 8) in removed_groups or not tag & 0xFFFF or group <= 2:
                    del ds[tag]
                    continue
                known_vr = dictionary_vr(tag)
                if known_vr is None:  # a public tag neither the table nor pydicom knows: it might hold anything
                    del ds[tag]
                    continue
                elem = ds.get_item(tag)
                vr = elem.VR
                if vr is None or vr == "UN":
                    vr = known_vr
                tag_handlers.get(tag, keep)(ds, tag, elem, vr, known_vr, state)
            except DeidError as exc:
                raise DeidError(f"{tag_text(tag)} > {exc.reason}") from None
            except BadValue as exc:
                raise DeidError(f"{tag_text(tag)}: {exc}") from None
            except Exception as exc:
                raise DeidError(f"{tag_text(tag)}: {type(exc).__name__} while de-identifying") from None
        if pending_creators:
            for creator in pending_creators:
                if (creator >> 16, creator & 0xFF) not in kept_blocks:
                    del ds[creator]

    def _action_handlers(self) -> dict[Action, _Handler]:
        """The dispatch table: what each action of the profile (or a recipe) does to one element."""
        return {
            Action.KEEP: self._keep,
            Action.REMOVE: self._remove,
            Action.EMPTY: self._empty,
            Action.DUMMY: self._dummy,
            Action.REMAP_UID: self._remap_uid,
            Action.SHIFT_DATE: self._shift_date,
            Action.WALK: self._walk_items,
            Action.CLEAN: self._clean,
            Action.RETAIN: self._retain,
            Action.RECIPE: self._recipe,
            Action.UNLISTED: self._unlisted,
        }

    def _keep(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """K: kept, but a UID is remapped (also one a vendor encoded with another VR), a sequence is
        walked, and a dummied or cleaned walk, or the modified-dates option, changes the value."""
        mode = state.mode
        if vr == "UI" or known_vr == "UI":
            self._remap_element(ds, tag, elem)
        elif vr == "SQ":
            self._walk_sequence(ds, tag, state, mode)
        elif mode == _DUMMY:
            if vr not in _KEPT_WHEN_DUMMY and elem.value not in (None, b"", ""):
                ds[tag] = element(tag, vr, DUMMY_VALUES.get(vr, _ZEROS))
        elif self._shift and (vr == "DA" or vr == "DT" or vr == "TM"):
            shift_element(ds, tag, elem, vr, state.shift, state.carried)
        elif mode == _CLEAN:
            if vr == "PN":
                ds[tag] = element(tag, vr, "")
            elif vr in _CLEAN_VRS and tag not in _CODE_TAGS:
                self._clean_element(ds, tag, elem, vr, state, Action.EMPTY)

    def _remove(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """X: removed."""
        del ds[tag]

    def _empty(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """Z: present with no value; a sequence with no items."""
        ds[tag] = element(tag, vr, Sequence() if vr == "SQ" else empty_value_for_VR(vr))

    def _dummy(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """D: a dummy value. A sequence keeps its items, every value inside replaced by a dummy of its
        VR (codes, numbers and UIDs stay valid: CS and numbers kept, UIDs remapped), so Type 1
        attributes inside stay present; an empty sequence stays empty (an added empty item would lack
        the item's Type 1 attributes)."""
        if vr == "UI":
            self._remap_element(ds, tag, elem)
        elif vr == "SQ":
            if ds[tag].value:
                self._walk_sequence(ds, tag, state, _DUMMY)
        else:
            ds[tag] = element(tag, vr, DUMMY_VALUES.get(vr, _ZEROS))

    def _remap_uid(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """U: every UID remapped."""
        self._remap_element(ds, tag, elem)

    def _shift_date(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """Modified dates: DA/DT/TM shifted (days and a time of day offset); anything else kept."""
        if vr == "DA" or vr == "DT" or vr == "TM":
            shift_element(ds, tag, elem, vr, state.shift, state.carried)

    def _walk_items(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """U*: a sequence walked item by item; anything else so marked is emptied."""
        if vr == "SQ":
            self._walk_sequence(ds, tag, state, state.mode)
        else:
            self._empty(ds, tag, elem, vr, known_vr, state)

    def _clean(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """C: text cleaned (its fallback when it cannot be); a sequence walked in clean mode."""
        if vr == "SQ":
            self._walk_sequence(ds, tag, state, _DUMMY if state.mode == _DUMMY else _CLEAN)
        else:
            self._clean_element(ds, tag, elem, vr, state, self._fallback.get(tag, Action.REMOVE))

    def _retain(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """R: kept exactly as it is (a retain option's K on a UID or date)."""

    def _unlisted(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """Unlisted text to remove: emptied, a dummy (Type 1 somewhere) or cleaned (technical text) —
        where values are kept as they are; in a cleaned or dummied sequence, as any kept value there.
        A vendor's odd encoding (a sequence, a UID) under such a tag is kept and walked or remapped."""
        if state.mode != _NORMAL or vr == "SQ" or vr == "UI":
            self._keep(ds, tag, elem, vr, known_vr, state)
            return
        action = self._unlisted_actions[tag]
        if action is Action.CLEAN:
            self._clean_element(ds, tag, elem, vr, state, self._fallback[tag])
        else:
            self._handlers[action](ds, tag, elem, vr, known_vr, state)

    def _recipe(self, ds: Dataset, tag: int, elem: _Elem, vr: str, known_vr: str, state: _WalkState) -> None:
        """A recipe rule decides; when it defers, the profile's action carries on."""
        action = self._recipe_rules.apply(ds, tag, elem, vr, state)
        if action is not None:
            self._handlers[action](ds, tag, elem, vr, known_vr, state)

    def _walk_sequence(self, ds: Dataset, tag: int, state: _WalkState, mode: int) -> None:
        """Walk each item of a sequence, its kept values treated as ``mode`` says."""
        outer, state.mode = state.mode, mode
        try:
            for index, item in enumerate(ds[tag].value):
                try:
                    self._walk(item, state)
                except DeidError as exc:
                    raise DeidError(f"item {index} > {exc.reason}") from None
        finally:
            state.mode = outer

    def _remap_element(self, ds: Dataset, tag: int, elem: _Elem) -> None:
        values = strings(elem)
        if values:
            remap = self._remap
            ds[tag] = element(tag, "UI", one_or_many([remap(v) for v in values]))

    def _apply_fallback(self, ds: Dataset, tag: int, elem: _Elem, vr: str, action: Action, state: _WalkState) -> None:
        """What a cleaned value that cannot be cleaned gets instead: a dummy, empty, or removed."""
        if action is Action.DUMMY:
            self._dummy(ds, tag, elem, vr, vr, state)
        elif action is Action.EMPTY:
            self._empty(ds, tag, elem, vr, vr, state)
        else:
            del ds[tag]

    def _clean_element(self, ds: Dataset, tag: int, elem: _Elem, vr: str, state: _WalkState, fallback: Action) -> None:
        """The C action on text: keep what :func:`scrub_words` leaves; anything else → ``fallback``."""
        try:
            value = ds[tag].value  # decoded with the data set's character set
        except Exception:
            value = None
        if value is None or value == "":
            return
        values = list(value) if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]
        if not all(isinstance(v, str) for v in values):
            self._apply_fallback(ds, tag, elem, vr, fallback, state)
            return
        known = set(state.known)
        cleaned = [scrub_words(v, known) for v in values]  # the same scrubber as researchers' metadata
        limit = MAX_VALUE_LEN.get(vr)
        cleaned = [c[:limit] if limit else c for c in cleaned]
        if not any(cleaned):
            if fallback in (Action.EMPTY, Action.REMOVE) and tag in required_text_tags():
                fallback = Action.DUMMY  # nothing left of a Type 1 value (a CodeMeaning): a dummy keeps it valid
            self._apply_fallback(ds, tag, elem, vr, fallback, state)
            return
        ds[tag] = element(tag, vr, cleaned[0] if len(cleaned) == 1 else cleaned)

    def _private(
        self, ds: Dataset, tag: int, state: _WalkState, pending_creators: list[int], kept_blocks: set[tuple[int, int]]
    ) -> None:
        """A private element: kept if safe-listed (Retain Safe Private) or a recipe says so."""
        group, element_number = tag >> 16, tag & 0xFFFF
        if element_number < 0x10:  # private group length and reserved elements
            del ds[tag]
            return
        if element_number < 0x100:  # a private creator: decided after its block
            pending_creators.append(tag)
            return
        block = element_number >> 8
        rule = self._plan.for_private(tag) if self._plan.private_rules else None
        keep = False
        if rule is not None and rule.action in ("KEEP", "REPLACE", "ADD"):
            keep = True
            if rule.action != "KEEP":
                elem = ds.get_item(tag)
                vr = elem.VR if elem.VR not in (None, "UN") else "LO"
                ds[tag] = element(tag, vr, self._recipe_rules.value(rule, ds, tag, vr, state))
            state.retained += 1
        elif rule is None and self._safe_private:
            creator_tag = (group << 16) | block
            creator = ""
            if creator_tag in ds:
                raw = ds[creator_tag].value
                creator = (raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)).strip(" \x00")
            keep = (creator, group, element_number & 0xFF) in safe_private_attributes()
        if not keep:
            del ds[tag]
            return
        elem = ds.get_item(tag)
        if elem.VR == "SQ" and not isinstance(elem, RawDataElement):
            self._walk_sequence(ds, tag, state, _NORMAL)
        kept_blocks.add((group, block))


def _rebuild(
    key: bytes, options: DeidOptions, recipe: Recipe | None, pixel_filter: Recipe | None, ocr: OcrSettings
) -> Deidentifier:
    return Deidentifier(key, options, recipe=recipe, pixel_filter=pixel_filter, ocr=ocr)
