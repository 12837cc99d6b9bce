"""Burned-in text: decide from the header whether an image may carry text in its pixels; read the
pixels with OCR where it may; blank the regions a rule names or OCR finds.

The decision, for an object with pixel data (:func:`decide`; non-image objects are not filtered):

1. every ``graylist`` label is checked against the *original* header; if any matches, the image has
   a known layout and the union of the matching labels' regions is blanked (``clean``) — but a
   matching label without coordinates only flags the image (``check``, below);
2. otherwise a matching ``whitelist`` label passes the image (it skips the blacklist) — unless its
   Burned In Annotation is YES;
3. otherwise the first matching ``blacklist`` label flags the image (``check``);
4. otherwise Burned In Annotation (0028,0301) = YES flags it (``check``, text expected).

A flagged image is read by OCR (:func:`resolve`, :mod:`sendit.deid.ocr`): no text found → released as
it is, the decision and its confidence recorded; text found → its lines are blanked and the image
read again until nothing is found (released), or quarantined where the operator chose
``OCR_ON_TEXT = quarantine``. With OCR off or unavailable a flagged image is quarantined (fail closed),
and so is an image whose header says YES but in which OCR finds nothing (OCR missed the text).

Blanking (:func:`blank_regions`) decodes the pixel data (native little endian, RLE and deflated
data decode with pydicom alone; JPEG, JPEG-LS, JPEG 2000 and HTJ2K with the pylibjpeg plugins, colour
coming out as RGB; big endian data is refused to keep the rewrite simple; an image that cannot be
decoded is quarantined with that reason), fills each region in every frame with black, and stores the pixels
uncompressed; the caller writes the file as Explicit VR Little Endian and sets (0028,0301) to NO.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from sendit.deid.errors import BurnedInError
from sendit.deid.ocr import OcrResult, OcrSettings, OcrUnavailable, UnreadableFrame, find_text
from sendit.deid.recipe import Criterion, Label, Recipe

_BURNED_IN = 0x00280301
_PIXEL_DATA = 0x7FE00010
_DECODABLE = frozenset(
    {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.5",
    }
)


# JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 and HTJ2K: pydicom decodes them with the
# pylibjpeg plugins (pylibjpeg-libjpeg, pylibjpeg-openjpeg), the decoders pydicom documents.
_COMPRESSED_BY_PLUGIN = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)


def _decompress(ds: Dataset) -> None:
    """Decode in place; colour data comes out as RGB and every pixel-module attribute is made to match."""
    from pydicom.pixels import decompress

    try:
        decompress(ds, as_rgb=True, generate_instance_uid=False)
    except Exception as exc:
        raise PixelError(f"compressed pixel data could not be decoded ({type(exc).__name__})") from None


class PixelError(Exception):
    """Blanking could not be done; the text says why (no values)."""


@dataclass(frozen=True)
class Decision:
    """``action`` is ``pass``, ``clean`` (blank ``regions``) or ``check`` (flagged: OCR decides, after
    blanking ``regions`` if any); ``label`` names the rule that decided; ``text_expected`` when the
    header says Burned In Annotation YES."""

    action: str
    label: str = ""
    regions: tuple[tuple[int, int, int, int], ...] = ()
    text_expected: bool = False


PASS = Decision("pass")
#: The label of step 4 of :func:`decide`.
BURNED_IN_YES = "BurnedInAnnotation is YES"
#: OCR, blank, OCR again: at most this many blankings before an image that still shows text is
#: quarantined.
BLANKING_ROUNDS = 5


@dataclass(frozen=True)
class PixelOutcome:
    """What the burned-in text step did to one image: ``blanked`` when pixels changed; ``note`` says
    what was decided and why (empty when no rule applied), for the image's record; ``ocr`` is the
    first OCR reading, if there was one."""

    blanked: bool = False
    note: str = ""
    ocr: OcrResult | None = None


@dataclass
class PixelRules:
    """The filter labels of one or more recipes, grouped, in the order they were read."""

    graylist: list[Label] = field(default_factory=list)
    whitelist: list[Label] = field(default_factory=list)
    blacklist: list[Label] = field(default_factory=list)

    @classmethod
    def from_recipes(cls, recipes: Sequence[Recipe]) -> PixelRules:
        rules = cls()
        for recipe in recipes:
            rules.graylist += recipe.filters("graylist")
            rules.whitelist += recipe.filters("whitelist")
            rules.blacklist += recipe.filters("blacklist")
        return rules

    def __len__(self) -> int:
        return len(self.graylist) + len(self.whitelist) + len(self.blacklist)


class _Header:
    """Header values as lower-cased text, looked up once per image (data set, then file meta).

    Raw elements are decoded here without converting them in the data set, so that the writer can
    still copy them byte for byte.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.meta = getattr(ds, "file_meta", None)
        self.little = ds.original_encoding[1] is not False
        self.cache: dict[int, str | None] = {}

    def get(self, tag: int) -> str | None:
        if tag in self.cache:
            return self.cache[tag]
        source = self.meta if tag >> 16 == 0x0002 else self.ds
        text: str | None = None
        if source is not None and tag in source:
            text = self._text(source, tag)
        self.cache[tag] = text
        return text

    def _text(self, source: Dataset, tag: int) -> str:
        elem = source.get_item(tag)
        if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
            vr = elem.VR if elem.VR not in (None, "UN") else _dictionary_vr(tag)
            raw = elem.value
            if vr in _BINARY and self.little:
                size, code = _BINARY[vr]
                count = len(raw) // size
                numbers = struct.unpack(f"<{count}{code}", raw[: count * size])
                return "\\".join(str(n) for n in numbers)
            if vr not in _BINARY and vr not in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV"):
                return raw.decode("latin-1").strip(" \x00").lower()
        value = source[tag].value
        if value is None:
            return ""
        if isinstance(value, bytes):
            return value.decode("latin-1").strip(" \x00").lower()
        if isinstance(value, str):
            return value.strip(" \x00").lower()
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            return "\\".join(str(v).strip() for v in value).lower()
        return str(value).strip().lower()


_BINARY = {"US": (2, "H"), "SS": (2, "h"), "UL": (4, "I"), "SL": (4, "i"), "FL": (4, "f"), "FD": (8, "d")}


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return None


def _holds(criterion: Criterion, header: _Header) -> bool:
    value = header.get(criterion.tag)
    test = criterion.test
    if test == "missing":
        return value is None
    if test == "present":
        return value is not None
    if test == "empty":
        return value is not None and value == ""
    if value is None:
        return test in ("notcontains", "notequals")
    assert criterion.pattern is not None
    if test == "contains":
        return criterion.pattern.search(value) is not None
    if test == "notcontains":
        return criterion.pattern.search(value) is None
    equal = value in criterion.alternatives
    return equal if test == "equals" else not equal


def _matches(label: Label, header: _Header) -> bool:
    if not label.clauses:
        return True  # coordinates only: applies to every image (as deid does)
    result: bool | None = None
    for operator, parts in label.clauses:
        line: bool | None = None
        for inner, criterion in parts:
            flag = _holds(criterion, header)
            line = flag if line is None else (line or flag) if inner == "or" else (line and flag)
        assert line is not None
        result = line if result is None else (result or line) if operator == "or" else (result and line)
    return bool(result)


def decide(ds: Dataset, rules: PixelRules) -> Decision:
    """What to do with the pixels of ``ds`` (module docstring); call before de-identifying."""
    if _PIXEL_DATA not in ds:
        return PASS
    header = _Header(ds)
    burned_in = header.get(_BURNED_IN) == "yes"
    matched = [label for label in rules.graylist if _matches(label, header)]
    if matched:
        regions = tuple(region for label in matched for region in label.regions)
        for label in matched:
            if not label.regions:  # a layout rule without coordinates only says "may hold text"
                return Decision("check", label.name, regions, text_expected=burned_in)
        return Decision("clean", matched[0].name, regions)
    if not burned_in and any(_matches(label, header) for label in rules.whitelist):
        return PASS
    for label in rules.blacklist:
        if _matches(label, header):
            return Decision("check", label.name, text_expected=burned_in)
    if burned_in:
        return Decision("check", BURNED_IN_YES, text_expected=True)
    return PASS


def resolve(ds: Dataset, decision: Decision, settings: OcrSettings) -> PixelOutcome:
    """Carry out ``decision`` on ``ds`` (module docstring); raises :class:`BurnedInError`, whose
    reason names the rule and what was (or could not be) seen, when the image may not be released.

    1. ``pass``: nothing to do. ``clean``: blank the rule's regions.
    2. ``check``: blank the rule's regions if it has any; with OCR off or unavailable, quarantine.
    3. OCR the frames the settings select. No text, read with at least the settings'
       ``release_confidence`` (else read again closer, at twice the size, and still
       unsure: quarantine): release, unless the header said YES.
    4. Text and ``OCR_ON_TEXT = quarantine``: quarantine. Otherwise blank the lines found and OCR
       again, up to :data:`BLANKING_ROUNDS` times, until nothing is read; if text is still read,
       quarantine.
    """
    label = decision.label
    if decision.action == "pass":
        return PixelOutcome()
    if decision.action == "clean":
        _blank(ds, decision.regions, f"burned-in annotation: {label}")
        return PixelOutcome(True, f"burned-in text ({label}): layout regions blanked")
    flagged = f"may hold burned-in text: {label}"
    if decision.regions:
        _blank(ds, decision.regions, flagged)
    if not settings.enabled:
        raise BurnedInError(f"{flagged}; OCR is off")
    result = _read(ds, settings, flagged)
    if not result.found and result.confidence < settings.release_confidence:
        # in doubt (tesseract half-read something): small text is read at twice the size
        second = _read(ds, settings, flagged, closer=result.unsure)
        if second.found or second.confidence >= settings.release_confidence:
            result = second
        elif not decision.text_expected:
            raise BurnedInError(
                f"{flagged}; OCR found no text but is unsure (confidence "
                f"{max(result.confidence, second.confidence):.2f} < OCR_RELEASE_CONFIDENCE)"
            )
    first = result
    if not result.found:
        if decision.text_expected:
            said = "" if label == BURNED_IN_YES else f" ({BURNED_IN_YES})"
            raise BurnedInError(f"burned-in annotation: {label}{said}; OCR found no text to blank")
        note = f"burned-in text check ({label}): {result.summary()}"
        return PixelOutcome(bool(decision.regions), note, result)
    detected = f"text detected by OCR: {label}"
    if settings.on_text == "quarantine":
        raise BurnedInError(f"{detected}; {len(result.lines)} region(s), OCR_ON_TEXT is quarantine")
    for reading in range(1, BLANKING_ROUNDS + 1):
        _blank(ds, result.regions, detected)
        result = _read(ds, settings, detected, reading)
        if not result.found:
            return PixelOutcome(True, f"burned-in text check ({label}): {first.summary()}; blanked", first)
    raise BurnedInError(f"{detected}; still read after blanking {BLANKING_ROUNDS} times")


def _read(
    ds: Dataset,
    settings: OcrSettings,
    context: str,
    reading: int = 0,
    closer: Sequence[tuple[int, int, int]] | None = None,
) -> OcrResult:
    """OCR, with every failure turned into a quarantine reason that names ``context``."""
    try:
        return find_text(ds, settings, reading, closer)
    except (OcrUnavailable, UnreadableFrame) as exc:  # their text names no value
        raise BurnedInError(f"{context}; {exc}") from None
    except Exception as exc:
        raise BurnedInError(f"{context}; OCR failed ({type(exc).__name__})") from None


def _blank(ds: Dataset, regions: Sequence[tuple[int, int, int, int]], context: str) -> None:
    try:
        blank_regions(ds, regions)
    except PixelError as exc:
        raise BurnedInError(f"{context}; {exc}") from None


def blank_regions(ds: Dataset, regions: Sequence[tuple[int, int, int, int]]) -> None:
    """Fill ``regions`` (x0, y0, x1, y1; end-exclusive, clipped to the image) with black in every
    frame; afterwards the pixel data is native and the file meta says Explicit VR Little Endian."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)) if meta is not None else ExplicitVRLittleEndian
    if syntax in _COMPRESSED_BY_PLUGIN:
        _decompress(ds)  # JPEG family: decoded by pylibjpeg; afterwards native Explicit VR Little Endian
        syntax = ExplicitVRLittleEndian
    if syntax not in _DECODABLE:
        name = UID(syntax).name if UID(syntax).is_valid else "unknown"
        raise PixelError(f"pixel data in {name} cannot be decoded here to blank it")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32) or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise PixelError(f"pixel data with {bits} bits allocated cannot be blanked")
    from pydicom.pixels import pixel_array

    try:
        array = pixel_array(ds, raw=True)
    except Exception as exc:
        raise PixelError(f"pixel data could not be decoded ({type(exc).__name__})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    view = array.reshape((frames, int(ds.Rows), int(ds.Columns), samples))
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "MONOCHROME1":
        fill: list[int] = [int(view.max()) if view.size else 0]
    elif photometric.startswith("YBR"):
        middle = 1 << (int(ds.get("BitsStored", bits) or bits) - 1)
        fill = [0, middle, middle]
    else:
        fill = [0] * samples
    rows, columns = view.shape[1], view.shape[2]
    for x0, y0, x1, y1 in regions:
        x0, x1 = max(0, min(x0, columns)), max(0, min(x1, columns))
        y0, y1 = max(0, min(y0, rows)), max(0, min(y1, rows))
        if x1 > x0 and y1 > y0:
            view[:, y0:y1, x0:x1, :] = np.asarray(fill[:samples], dtype=view.dtype)
    data = np.ascontiguousarray(view).astype(view.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(data) % 2:
        data += b"\x00"
    ds[_PIXEL_DATA] = DataElement(_PIXEL_DATA, "OW" if bits > 8 else "OB", data)  # native, defined length
    if samples > 1:
        ds.PlanarConfiguration = 0
    if photometric == "YBR_FULL_422":
        ds.PhotometricInterpretation = "YBR_FULL"  # decoded data is no longer subsampled
    if meta is not None:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
