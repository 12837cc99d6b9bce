"""Tag numbers and encoding constants the core names: written down once, here.

The values are the standard's (PS3.6 data dictionary, PS3.5 encoding); pydicom's dictionary gives
the names, these give the integers the hot paths compare against without a look-up.
"""

from __future__ import annotations

from functools import cache

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

# -- identifying the object and its place in the hierarchy ----------------------------------------
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E

# -- the identifiers a de-identification writes ---------------------------------------------------
ACCESSION_NUMBER = 0x00080050
PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020

# -- what a de-identification says it did (PS3.15 E.1.1) ------------------------------------------
PATIENT_IDENTITY_REMOVED = 0x00120062
DEIDENTIFICATION_METHOD = 0x00120063
DEIDENTIFICATION_METHOD_CODES = 0x00120064
BURNED_IN_ANNOTATION = 0x00280301
LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED = 0x00280303

# -- code sequence items ---------------------------------------------------------------------------
CODE_VALUE = 0x00080100
CODING_SCHEME_DESIGNATOR = 0x00080102
CODE_MEANING = 0x00080104

# -- pixels ----------------------------------------------------------------------------------------
ROWS = 0x00280010
PIXEL_DATA = 0x7FE00010
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: whichever an image carries.
PIXEL_DATA_TAGS = frozenset({PIXEL_DATA, 0x7FE00008, 0x7FE00009})

# -- file meta (group 0002) ------------------------------------------------------------------------
FILE_META_VERSION = 0x00020001
MEDIA_STORAGE_SOP_CLASS_UID = 0x00020002
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
TRANSFER_SYNTAX_UID = 0x00020010
IMPLEMENTATION_CLASS_UID = 0x00020012
IMPLEMENTATION_VERSION_NAME = 0x00020013

# -- encoding ----------------------------------------------------------------------------------------
#: The length field of an element whose end is marked by a delimiter instead.
UNDEFINED_LENGTH = 0xFFFFFFFF
#: (FFFE,E0DD) Sequence Delimitation Item with its zero length, as it ends an undefined-length value.
SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
SEQUENCE_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"

# -- SOP classes -------------------------------------------------------------------------------------
MEDIA_STORAGE_DIRECTORY_CLASS = "1.2.840.10008.1.3.10"  # DICOMDIR


def tag_text(tag: int) -> str:
    """``0x00100010`` → ``"(0010,0010) PatientName"`` for messages (private tags get no name)."""
    name = "" if (tag >> 16) & 1 else (keyword_for_tag(tag) or "")
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {name}".rstrip()


@cache
def dictionary_vr(tag: int) -> str | None:
    """The data dictionary's VR for a public tag, first choice of an ambiguous one; None if unknown."""
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return None
    return vr.split(" or ")[0]


def tags_of(*keywords: str) -> frozenset[int]:
    """The tags of data dictionary keywords (a misspelt keyword fails at import, not silently)."""
    found = {keyword: tag_for_keyword(keyword) for keyword in keywords}
    unknown = [keyword for keyword, tag in found.items() if tag is None]
    if unknown:
        raise KeyError(f"not in the data dictionary: {', '.join(unknown)}")
    return frozenset(tag for tag in found.values() if tag is not None)
