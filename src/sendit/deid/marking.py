"""What a de-identified image says about itself: the replacement identifiers, the record of what
was done (PS3.15 E.1.1: (0012,0062) Patient Identity Removed, (0012,0063) De-identification Method,
(0012,0064) its codes from CID 7050, (0028,0303) Longitudinal Temporal Information Modified, and
(0028,0301) Burned In Annotation NO once regions were blanked), and a fresh file meta.

Every value written here is built by Sendit (or is a replacement identifier checked by
:func:`check_identifiers` first), so each fits its VR: text is cut to pydicom's own table of
maximum lengths.
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import MAX_VALUE_LEN

from sendit import __version__
from sendit.deid.elements import element, first_text, one_or_many
from sendit.deid.errors import DeidError
from sendit.deid.profile import BASIC_PROFILE_CODE, OPTIONS, DeidOptions, OptionInfo
from sendit.dicomio.tags import (
    ACCESSION_NUMBER,
    BURNED_IN_ANNOTATION,
    CODE_MEANING,
    CODE_VALUE,
    CODING_SCHEME_DESIGNATOR,
    DEIDENTIFICATION_METHOD,
    DEIDENTIFICATION_METHOD_CODES,
    FILE_META_VERSION,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
    MEDIA_STORAGE_SOP_CLASS_UID,
    MEDIA_STORAGE_SOP_INSTANCE_UID,
    PATIENT_ID,
    PATIENT_IDENTITY_REMOVED,
    PATIENT_NAME,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    TRANSFER_SYNTAX_UID,
)
from sendit.identifiers.base import Identifiers

CLEAN_PIXEL_CODE = OptionInfo("", "113101", "Clean Pixel Data Option")
_LO = MAX_VALUE_LEN["LO"]
_SH = MAX_VALUE_LEN["SH"]
_PN = 64  # per component group (PS3.5 Table 6.2-1); pydicom's table has no PN row
_IDENTIFIER_LIMITS = (("patient_id", _LO), ("accession_number", _SH), ("patient_name", _PN))


def check_identifiers(ids: Identifiers) -> None:
    """The replacements will be written as LO, SH and PN: refuse what would not fit."""
    for name, limit in _IDENTIFIER_LIMITS:
        value = getattr(ids, name)
        if len(value) > limit or "\\" in value:
            raise DeidError(f"replacement {name} is not a valid DICOM value (too long or has '\\')")
    if not ids.patient_id:
        raise DeidError("replacement patient_id is empty")


def option_codes(options: DeidOptions, jitter_days: int) -> list[tuple[str, str]]:
    """(code, meaning) of each option that is on, in the standard's order."""
    codes: list[tuple[str, str]] = []
    for name in options.enabled():
        info = OPTIONS[name]
        if name == "retain_long_modified_dates" and jitter_days == 0:
            # A zero shift keeps the real dates: say so rather than claim they were modified.
            info = OPTIONS["retain_long_full_dates"]
        codes.append((info.code, info.meaning))
    return codes


def method_description(
    options: DeidOptions, recipe_source: str | None, jitter_days: int, *, retained: int = 0, pixels: bool = False
) -> list[str]:
    """(0012,0063) values, each cut to what LO allows."""
    lines = [f"Sendit {__version__}: PS3.15 Basic Profile"]
    lines += [meaning for _, meaning in option_codes(options, jitter_days)]
    if pixels:
        lines.append(CLEAN_PIXEL_CODE.meaning + " (regions blanked)")
    if recipe_source is not None:
        lines.append(f"recipe {recipe_source}"[:_LO])
        if retained:
            lines.append(f"recipe kept {retained} attribute(s) the profile changes"[:_LO])
    return lines


def mark(
    ds: Dataset,
    ids: Identifiers,
    options: DeidOptions,
    recipe_source: str | None,
    *,
    retained: int,
    pixels: bool,
) -> None:
    """Write the identifiers and say what was done; ``pixels``: burned-in regions were blanked."""
    if pixels:
        ds[BURNED_IN_ANNOTATION] = element(BURNED_IN_ANNOTATION, "CS", "NO")
    ds[PATIENT_ID] = element(PATIENT_ID, "LO", ids.patient_id)
    ds[PATIENT_NAME] = element(PATIENT_NAME, "PN", ids.patient_name)
    ds[ACCESSION_NUMBER] = element(ACCESSION_NUMBER, "SH", ids.accession_number)
    ds[PATIENT_IDENTITY_REMOVED] = element(PATIENT_IDENTITY_REMOVED, "CS", "YES")
    description = method_description(options, recipe_source, ids.jitter_days, retained=retained, pixels=pixels)
    ds[DEIDENTIFICATION_METHOD] = element(DEIDENTIFICATION_METHOD, "LO", one_or_many(description))
    codes = [(BASIC_PROFILE_CODE.code, BASIC_PROFILE_CODE.meaning)]
    if pixels:
        codes.append((CLEAN_PIXEL_CODE.code, CLEAN_PIXEL_CODE.meaning))
    codes += option_codes(options, ids.jitter_days)
    items = []
    for code, meaning in codes:
        item = Dataset()
        item[CODE_VALUE] = element(CODE_VALUE, "SH", code)
        item[CODING_SCHEME_DESIGNATOR] = element(CODING_SCHEME_DESIGNATOR, "SH", "DCM")
        item[CODE_MEANING] = element(CODE_MEANING, "LO", meaning)
        items.append(item)
    ds[DEIDENTIFICATION_METHOD_CODES] = element(DEIDENTIFICATION_METHOD_CODES, "SQ", Sequence(items))
    if options.retain_long_modified_dates:
        modified = "MODIFIED" if ids.jitter_days else "UNMODIFIED"
    elif options.retain_long_full_dates:
        modified = "UNMODIFIED"
    else:
        modified = "REMOVED"
    tag = LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED
    ds[tag] = element(tag, "CS", modified)


def rebuild_file_meta(ds: Dataset, remap_uid: Callable[[str], str]) -> None:
    """A fresh file meta: only what Part 10 needs, SOP UIDs taken from the de-identified data set.

    Anything else the source put there (source/sending AE titles, private information) is dropped.
    """
    old = getattr(ds, "file_meta", None)
    if old is None:
        return
    transfer_syntax = old.get("TransferSyntaxUID") or _transfer_syntax_of(ds)
    meta = FileMetaDataset()
    meta[FILE_META_VERSION] = element(FILE_META_VERSION, "OB", b"\x00\x01")
    sop_class = first_text(ds, SOP_CLASS_UID) or remap_uid(str(old.get("MediaStorageSOPClassUID", "")))
    sop_instance = first_text(ds, SOP_INSTANCE_UID) or remap_uid(str(old.get("MediaStorageSOPInstanceUID", "")))
    for tag, vr, value in (
        (MEDIA_STORAGE_SOP_CLASS_UID, "UI", sop_class),
        (MEDIA_STORAGE_SOP_INSTANCE_UID, "UI", sop_instance),
        (TRANSFER_SYNTAX_UID, "UI", transfer_syntax),
        (IMPLEMENTATION_CLASS_UID, "UI", PYDICOM_IMPLEMENTATION_UID),
        (IMPLEMENTATION_VERSION_NAME, "SH", f"SENDIT_{__version__}"[:_SH]),
    ):
        if value:
            meta[tag] = element(tag, vr, value)
    ds.file_meta = meta


def _transfer_syntax_of(ds: Dataset) -> UID | None:
    """The transfer syntax a data set was read in, for a file meta that did not name it."""
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return None
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian
