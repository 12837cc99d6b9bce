"""A deid recipe's ``%header`` rules applied to one element, during the engine's single walk.

The recipe (:mod:`sendit.deid.recipe`) is parsed and planned once; here a rule meets an element:
KEEP (the profile's change undone, counted in the de-identification record), REPLACE/ADD (a value
from a literal, a variable of the identifiers, or a function), JITTER (dates shifted by the rule's
days), REMOVE (optionally only when a predicate holds), BLANK. When a rule defers (a JITTER on a
value that is not a date, a REMOVE whose predicate does not hold) the profile's action carries on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from sendit.deid.dates import shift_element
from sendit.deid.elements import element
from sendit.deid.errors import DeidError
from sendit.deid.profile import Action
from sendit.deid.recipe import FUNCTIONS, PREDICATES, FuncContext, HeaderPlan, HeaderRule
from sendit.dicomio.tags import dictionary_vr, tag_text

#: How a recipe's text value becomes a value of a binary VR.
_NUMERIC_VRS = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float, "AT": int}
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_UID_SYNTAX = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class RuleState(Protocol):
    """What a rule reads and counts of the walk's per-image state."""

    variables: Mapping[str, str]
    known: frozenset[str]
    retained: int


class RecipeRules:
    """The planned rules of one recipe, with what its functions need: the key and the UID remap."""

    def __init__(
        self, plan: HeaderPlan, profile: Mapping[int, Action], key: bytes, remap_uid: Callable[[str], str]
    ) -> None:
        self._plan = plan
        self._profile = profile
        self._key = key
        self._remap_uid = remap_uid

    def apply(
        self, ds: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str, state: RuleState
    ) -> Action | None:
        """Apply the recipe rule for ``tag``; returns the profile action to carry on with, or None."""
        rule = self._plan.public[tag]
        profile = self._profile.get(tag, Action.KEEP)
        action = rule.action
        if action == "KEEP":
            if vr == "SQ":
                if profile not in (Action.KEEP, Action.WALK):
                    state.retained += 1
                return Action.WALK
            if profile not in (Action.KEEP, Action.RETAIN):
                state.retained += 1
            return None
        if action in ("REPLACE", "ADD"):
            if vr == "SQ":
                raise DeidError("a recipe cannot write a text value into a sequence")
            ds[tag] = element(tag, vr, self.value(rule, ds, tag, vr, state))
            return None
        if action == "JITTER":
            if vr not in ("DA", "DT"):
                return profile
            assert rule.value is not None
            days = self._resolve_text(rule, ds, tag, vr, state)
            try:
                shift = int(days)
            except ValueError:
                raise DeidError("recipe JITTER value is not a whole number of days") from None
            shift_element(ds, tag, elem, vr, shift)
            return None
        if action == "REMOVE":
            predicate = PREDICATES[rule.value.text] if rule.value is not None else None  # REMOVE f func:p
            if predicate is not None and not predicate(self._func_context(ds, tag, vr, state)):
                return profile
            del ds[tag]
            return None
        # BLANK
        ds[tag] = element(tag, vr, Sequence() if vr == "SQ" else empty_value_for_VR(vr))
        return None

    def _func_context(self, ds: Dataset, tag: int, vr: str, state: RuleState) -> FuncContext:
        """What a recipe function sees of the element: its current text, never a binary value."""
        try:
            value = ds[tag].value if tag in ds else ""
        except Exception:
            value = ""
        if isinstance(value, bytes):
            raise DeidError("a recipe function cannot read a binary value")
        text = "\\".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value or "")
        return FuncContext(text, vr, self._key, state.known, self._remap_uid)

    def _resolve_text(self, rule: HeaderRule, ds: Dataset, tag: int, vr: str, state: RuleState) -> str:
        """A rule's value as text: the literal, the identifiers' variable, or the function's answer."""
        value = rule.value
        assert value is not None
        if value.kind == "literal":
            return value.text
        if value.kind == "var":
            if value.text not in state.variables:
                raise DeidError(f"recipe variable {value.text!r} is not defined for this image")
            return state.variables[value.text]
        return str(FUNCTIONS[value.text](self._func_context(ds, tag, vr, state)))

    def value(self, rule: HeaderRule, ds: Dataset, tag: int, vr: str, state: RuleState) -> Any:
        """A REPLACE or ADD rule's value as ``vr`` takes it; refused when it is not valid for it."""
        text = self._resolve_text(rule, ds, tag, vr, state)
        convert = _NUMERIC_VRS.get(vr)
        try:
            if convert is not None:
                parts = [convert(part) for part in text.split("\\") if part.strip()]
                return parts[0] if len(parts) == 1 else parts
            if vr in _BYTES_VRS:
                return text.encode("utf-8")
        except ValueError:
            raise DeidError(f"recipe value is not valid for VR {vr}") from None
        if vr == "UI" and text and not _UID_SYNTAX.match(text):
            raise DeidError("recipe value is not a valid UID")
        return text if "\\" not in text else text.split("\\")

    def add(self, ds: Dataset, state: RuleState) -> None:
        """The recipe's ``ADD <attribute> <value>`` rules: set on the top level (created if absent)."""
        for rule in self._plan.adds:
            tag = rule.field.tag
            assert tag is not None
            vr = dictionary_vr(tag) or "LO"
            if vr == "SQ":
                raise DeidError(f"{tag_text(tag)}: a recipe cannot ADD a sequence")
            try:
                ds[tag] = element(tag, vr, self.value(rule, ds, tag, vr, state))
            except DeidError as exc:
                raise DeidError(f"{tag_text(tag)}: {exc.reason}") from None
