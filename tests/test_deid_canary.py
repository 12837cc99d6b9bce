"""PHI canary: a unique marker in every attribute Table E.1-1 names, and in every current PN/LT/ST/UT
attribute of the data dictionary that the table does not name, at several nesting levels and in
private tags, file meta and preamble; after de-identification no output byte may hold any of them.

Markers are looked for in the raw bytes of the written file, so nothing the engine leaves behind —
in any element, any sequence, the file meta or the preamble — can hide from the check.
"""

from __future__ import annotations

import datetime
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from sendit.deid import Deidentifier, DeidOptions
from sendit.deid.profile import OPTIONS, Action, build_action_table, load_rows
from sendit.deid.recipe import parse_recipe
from sendit.identifiers import Identifiers

IDS = Identifiers("SIDPSEUDO1", "SIDPSEUDO1", "ACCPSEUDO1", jitter_days=-45, jitter_seconds=40_000)
TEXT_VRS = {"AE", "CS", "SH", "LO", "LT", "ST", "UT", "UC", "PN"}
BYTES_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}
WALKED = {0x00081140, 0x00082112}  # X/Z/U*: kept and walked, so they carry the next level
UNLISTED_VRS = {"PN", "LT", "ST", "UT"}  # free text and names: none may survive, listed or not
DEPTH = 3
BASE_DATE = datetime.date(1000, 1, 1)


@dataclass
class Canaries:
    """Hands out unique marker values per VR and remembers every one of them."""

    keep_dated_times: bool  # unused since times are shifted with their dates (kept for callers)
    markers: list[bytes] = field(default_factory=list)
    chain: list[int] = field(default_factory=list)  # the tags enclosing the value being made
    origin: dict[bytes, tuple[int, ...]] = field(default_factory=dict)  # marker → its tag chain
    covered: set[int] = field(default_factory=set)
    unlisted: set[int] = field(default_factory=set)  # unlisted PN/LT/ST/UT attributes given a marker
    skipped: dict[str, set[int]] = field(default_factory=dict)
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def skip(self, tag: int, reason: str) -> None:
        self.skipped.setdefault(reason, set()).add(tag)

    def value(self, vr: str) -> object | None:
        k = next(self.counter)
        if vr in TEXT_VRS:
            text = f"CANARY{k}XYZ"
        elif vr == "UR":
            text = f"http://example.org/CANARY{k}XYZ"
        elif vr == "UI":
            text = f"1.2.3.999.{k}.999"  # no marker is a prefix of another
        elif vr == "DA":  # 97-day steps: no date shifted by 45 days lands on another canary
            text = (BASE_DATE + datetime.timedelta(days=k * 97)).strftime("%Y%m%d")
        elif vr == "DT":
            text = (BASE_DATE + datetime.timedelta(days=k * 97)).strftime("%Y%m%d") + "121314"
        elif vr == "TM":
            text = f"235958.{k:06d}"
        elif vr == "DS":
            text = f"9{k:05d}.5"
        elif vr == "IS":
            text = f"8{k:06d}"
        elif vr in BYTES_VRS:
            data = f"CANARY{k}XYZ".encode()
            self.markers.append(data)
            self.origin[data] = tuple(self.chain)
            return data + b"\x00" * (-len(data) % 8)
        else:
            return None
        self.markers.append(text.encode())
        self.origin[text.encode()] = tuple(self.chain)
        return text

    def within(self, tag: int) -> _Within:
        return _Within(self, tag)


class _Within:
    """``with canaries.within(tag):`` — values made inside belong to ``tag``."""

    def __init__(self, canaries: Canaries, tag: int) -> None:
        self.canaries, self.tag = canaries, tag

    def __enter__(self) -> None:
        self.canaries.chain.append(self.tag)

    def __exit__(self, *exc: object) -> None:
        self.canaries.chain.pop()


def _rows() -> list[tuple[int, str, dict[str, str], str]]:
    rows = []
    for row in load_rows():
        if not row.is_exact:
            continue
        rows.append((row.value, row.basic, dict(row.options), row.name))
    return rows


def unlisted_text() -> list[tuple[int, str]]:
    """(tag, VR) of every current PN/LT/ST/UT attribute of pydicom's data dictionary that Table E.1-1
    does not list (exactly or by a wildcard row): found from the dictionary, not from the engine."""
    rows = load_rows()
    exact = {row.value for row in rows if row.is_exact}
    wildcards = [(row.mask, row.value) for row in rows if not row.is_exact]
    return sorted(
        (tag, vr)
        for tag, (vr, _vm, _name, retired, _keyword) in DicomDictionary.items()
        if vr in UNLISTED_VRS
        and not retired
        and tag >> 16 > 0x0002
        and tag not in exact
        and not any(tag & mask == value for mask, value in wildcards)
    )


def fill(ds: Dataset, canaries: Canaries, level: int) -> None:
    """Put a canary in every PHI-bearing attribute of the table, in every unlisted PN/LT/ST/UT
    attribute, and in private ones, into ``ds``."""
    for tag, _basic, _options, _name in _rows():
        group = tag >> 16
        if group in (0x0000, 0x0002):
            canaries.skip(tag, "command or file meta group: cannot be in a stored data set")
            continue
        vr = str(dictionary_VR(tag))
        if " or " in vr:
            canaries.skip(tag, "ambiguous VR")
            continue
        if vr == "SQ":
            with canaries.within(tag):
                _fill_sequence(ds, tag, canaries, level)
            continue
        with canaries.within(tag):
            value = canaries.value(vr)
        if value is None:
            canaries.skip(tag, f"VR {vr} cannot hold a marker")
            continue
        ds.add_new(tag, vr, value)
        canaries.covered.add(tag)
    for tag, vr in unlisted_text():
        with canaries.within(tag):
            ds.add_new(tag, vr, canaries.value(vr))
        canaries.unlisted.add(tag)
    with canaries.within(0x00090000):  # private, top level
        _private(ds, canaries)
    # Wildcard rows: overlay data and comments (60xx,3000/4000), curves (50xx,xxxx); and the
    # overlay's free-text attributes, which go with the rest of the group.
    for tag, vr in (
        (0x60003000, "OW"),
        (0x60024000, "LT"),
        (0x60040022, "LO"),
        (0x60001500, "LO"),
        (0x50003000, "OW"),
        (0x50102500, "LO"),
    ):
        with canaries.within(tag):
            ds.add_new(tag, vr, canaries.value(vr))


def _fill_sequence(ds: Dataset, tag: int, canaries: Canaries, level: int) -> None:
    item = Dataset()
    if tag in WALKED:
        if level < DEPTH:
            fill(item, canaries, level + 1)
        else:
            item.ReferencedSOPInstanceUID = canaries.value("UI")
            item.PatientName = canaries.value("PN")
    else:
        item.CodeValue = canaries.value("SH")
        item.CodeMeaning = canaries.value("LO")
        deeper = Dataset()
        deeper.CodeMeaning = canaries.value("LO")
        item.ConceptNameCodeSequence = Sequence([deeper])
        _private(item, canaries)
    ds.add_new(tag, "SQ", Sequence([item]))
    canaries.covered.add(tag)


def _private(ds: Dataset, canaries: Canaries) -> None:
    block = ds.private_block(0x0029, "CANARY CREATOR", create=True)
    with canaries.within(0x00291001):
        block.add_new(0x01, "LO", canaries.value("LO"))
    block.add_new(0x02, "UN", canaries.value("UN"))
    inner = Dataset()
    inner.PatientName = canaries.value("PN")
    inner_block = inner.private_block(0x0031, "CANARY INNER", create=True)
    inner_block.add_new(0x01, "LO", canaries.value("LO"))
    block.add_new(0x03, "SQ", Sequence([inner]))
    canaries.markers.append(b"CANARY CREATOR")


def canary_file(path: Path, canaries: Canaries, transfer_syntax: str) -> Path:
    ds = Dataset()
    fill(ds, canaries, 1)
    ds.SOPClassUID = CTImageStorage
    ds.SamplesPerPixel, ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 4, 4, 16, 16, 15
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.PixelData = bytes(32)
    ds.preamble = b"CANARYPREAMBLE".ljust(128, b"\x00")
    canaries.markers.append(b"CANARYPREAMBLE")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.SourceApplicationEntityTitle = "CANARYMETAAE"
    canaries.markers.append(b"CANARYMETAAE")
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("options", [DeidOptions(), DeidOptions(retain_long_modified_dates=False)])
def test_no_canary_survives(tmp_path: Path, transfer_syntax: str, options: DeidOptions) -> None:
    canaries = Canaries(keep_dated_times=options.retain_long_modified_dates)
    src = canary_file(tmp_path / "canary.dcm", canaries, transfer_syntax)
    source = src.read_bytes()
    assert all(marker in source for marker in canaries.markers)  # they really were written

    result = Deidentifier("canary-key", options).deidentify_file(src, tmp_path / "out.dcm", IDS)
    output = result.path.read_bytes()
    survivors = sorted({m.decode() for m in canaries.markers if m in output})
    assert survivors == []

    # Most of the table carries a canary; every other row is accounted for with its reason.
    skipped = set().union(*canaries.skipped.values())
    assert canaries.covered | skipped == {row[0] for row in _rows()}
    assert not canaries.covered & skipped
    counts = {reason: len(tags) for reason, tags in canaries.skipped.items()}
    assert len(canaries.covered) >= (550 if options.retain_long_modified_dates else 600), counts

    out = pydicom.dcmread(result.path)  # still a readable DICOM object, every sequence parses
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert sum(1 for _ in out.iterall()) > 100
    assert out.PatientIdentityRemoved == "YES"


UNLISTED_OPTIONS = [
    DeidOptions(),
    DeidOptions(retain_long_modified_dates=False),
    DeidOptions.from_names(["clean_descriptors", "clean_structured_content", "clean_graphics"]),
]


@pytest.mark.parametrize("options", UNLISTED_OPTIONS, ids=["default", "basic-only", "clean-options"])
def test_no_unlisted_free_text_or_name_survives(tmp_path: Path, options: DeidOptions) -> None:
    """Every current PN/LT/ST/UT attribute the table does not list, at the top level and inside the
    sequences the profile keeps and walks (three levels deep): no marker in any output byte."""
    canaries = Canaries(keep_dated_times=False)
    src = canary_file(tmp_path / "canary.dcm", canaries, ExplicitVRLittleEndian)
    unlisted = {m: chain for m, chain in canaries.origin.items() if chain and chain[-1] in canaries.unlisted}
    assert len(canaries.unlisted) >= 100  # EvaluatorName, DetectorDescription, ... (about 110 in 2024)
    assert len(unlisted) == 7 * len(canaries.unlisted)  # the top level and six walked items

    result = Deidentifier("canary-key", options).deidentify_file(src, tmp_path / "out.dcm", IDS)
    output = result.path.read_bytes()
    survivors = sorted({keyword_for_tag(chain[-1]) for m, chain in unlisted.items() if m in output})
    assert survivors == []
    out = pydicom.dcmread(result.path)
    nested = out.ReferencedImageSequence[0].SourceImageSequence[0]
    assert nested.ReferencedSOPInstanceUID.startswith("2.25.")  # the walked items are still there, remapped


def test_option_names_match_the_table_columns() -> None:
    columns = {column for row in load_rows() for column in row.options}
    assert {info.column for info in OPTIONS.values()} == columns


# -- options: a marker survives only where an option keeps its attribute on purpose --------------

REMOVING = [(), ("retain_safe_private", "retain_long_modified_dates")]
KEEPING = [
    ("clean_descriptors", "clean_structured_content", "clean_graphics", "retain_long_modified_dates"),
    ("retain_patient_characteristics",),
    ("retain_device_identity", "retain_institution_identity"),
    ("retain_uids",),
    ("retain_long_full_dates",),
]
_KEPT_ACTIONS = {Action.KEEP, Action.RETAIN, Action.CLEAN, Action.WALK}


def _on_purpose(options: DeidOptions) -> set[int]:
    """Tags whose values the options keep (or clean and keep) where the Basic Profile would not."""
    base = build_action_table(frozenset()).exact
    chosen = build_action_table(options.columns()).exact
    return {tag for tag, action in chosen.items() if action in _KEPT_ACTIONS and base.get(tag) not in _KEPT_ACTIONS}


def _run_canary(tmp_path: Path, deidentifier: Deidentifier, keep_times: bool) -> tuple[Canaries, bytes, Path]:
    canaries = Canaries(keep_dated_times=keep_times)
    src = canary_file(tmp_path / "canary.dcm", canaries, ExplicitVRLittleEndian)
    result = deidentifier.deidentify_file(src, tmp_path / "out.dcm", IDS)
    return canaries, result.path.read_bytes(), result.path


@pytest.mark.parametrize("names", REMOVING + KEEPING, ids=lambda names: "+".join(names) or "basic-only")
def test_canaries_under_option_combinations(tmp_path: Path, names: tuple[str, ...]) -> None:
    options = DeidOptions.from_names(names)
    keep_times = options.retain_long_modified_dates or options.retain_long_full_dates
    canaries, output, path = _run_canary(tmp_path, Deidentifier("canary-key", options), keep_times)
    survivors = {m for m in canaries.markers if m in output}
    purposeful = _on_purpose(options)

    def kept_on_purpose(marker: bytes) -> bool:
        if options.retain_uids and marker.startswith(b"1.2.3.999."):
            return True  # Retain UIDs keeps every UID
        return bool(set(canaries.origin.get(marker, ())) & purposeful)

    accidental = sorted(m.decode() for m in survivors if not kept_on_purpose(m))
    assert accidental == []
    if names in REMOVING:
        assert survivors == set()
    else:
        assert survivors, "an option that keeps attributes should visibly keep some markers"
    out = pydicom.dcmread(path)
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert codes == {"113100"} | {OPTIONS[name].code for name in options.enabled()}
    method = out["DeidentificationMethod"].value
    method = [method] if isinstance(method, str) else list(method)
    assert method[0].startswith("Sendit") and method[1:] == [OPTIONS[name].meaning for name in options.enabled()]
    expected = "REMOVED" if not keep_times else "UNMODIFIED" if options.retain_long_full_dates else "MODIFIED"
    assert out.LongitudinalTemporalInformationModified == expected


def test_a_recipe_keep_is_visible_in_the_output_and_recorded(tmp_path: Path) -> None:
    recipe = parse_recipe("FORMAT dicom\n%header\nKEEP PatientBirthDate\nKEEP (0029,1001)\n", "keep.recipe")
    canaries, output, path = _run_canary(tmp_path, Deidentifier("canary-key", recipe=recipe), True)
    survivors = {m.decode() for m in canaries.markers if m in output}
    birth_dates = {m.decode() for m, chain in canaries.origin.items() if chain[-1:] == (0x00100030,)}
    private = {m.decode() for m, chain in canaries.origin.items() if chain[-1:] == (0x00291001,)}
    # Kept on purpose: the birth date and the named private element with its creator, wherever the
    # profile keeps their enclosing data set (top level and walked sequences; not inside a dummied one).
    assert birth_dates and birth_dates <= survivors
    assert survivors - birth_dates - {"CANARY CREATOR"} <= private
    assert "CANARY CREATOR" in survivors and survivors & private
    out = pydicom.dcmread(path)
    assert "recipe keep.recipe" in out.DeidentificationMethod
    assert any(line.startswith("recipe kept ") for line in out.DeidentificationMethod)
