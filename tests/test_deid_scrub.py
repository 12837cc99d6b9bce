"""The free-text scrubber: planted identifiers go, clinical words stay, the clean action uses it."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from importlib import resources
from pathlib import Path

import pydicom
import pytest

from sendit.deid import Deidentifier, DeidOptions
from sendit.deid.scrub import Kind, find, scrub, scrub_words, site_tokens, vocabulary
from tests.test_deid_engine import IDS, make_ct, write

ROOT = Path(__file__).resolve().parents[1]

# (description, the identifiers planted in it): every letter and digit of these must go.
PLANTED = [
    ("T1 AX post Dr Smith 2021-03-04", ["Smith", "2021-03-04"]),
    (
        "CT CHEST for Smith, Alice MRN0012345 on 2024-01-15 at 10:32",
        ["Smith", "Alice", "MRN0012345", "2024-01-15", "10:32"],
    ),
    ("t1_mprage_sag research Kowalczyk CHUV", ["Kowalczyk", "CHUV"]),  # unlisted surname, site acronym
    ("fMRI rest PI Jonsdottir, Sigridur ext. 4321", ["Jonsdottir", "Sigridur", "4321"]),
    ("MR BRAIN 4 Mar 2021 read by Dr. Wanjiru", ["4 Mar 2021", "Wanjiru"]),
    ("US THYROID March 4th, 2021 tel +41 21 314 11 11", ["March 4th, 2021", "+41 21 314 11 11"]),
    ("CT HEAD 04/03/2021 ID A1234567 (555) 123-4567", ["04/03/2021", "A1234567", "(555) 123-4567"]),
    ("DWI b1000 jane.doe@hospital.org www.example.org/study", ["jane.doe@hospital.org", "www.example.org/study"]),
    ("SMITH^JOHN^^DR 20210304 ax t2", ["SMITH^JOHN", "20210304"]),
    ("Ax T2 FLAIR Barry White 123-45-6789", ["Barry", "White", "123-45-6789"]),
    ("Protocol O. Einarsdóttir Müller 03/2021", ["O.", "Einarsdóttir", "Müller", "03/2021"]),
    ("scout subject 0042 2019", ["0042", "2019"]),
]

# Descriptions made only of words the scrubber must keep (some are also US surnames or given names).
CLINICAL = [
    "CT HEAD WO CONTRAST",
    "MR BRAIN W/WO CONTRAST",
    "T1 AXIAL POST CONTRAST",
    "CHEST ABDOMEN PELVIS",
    "LUMBAR SPINE FLAIR T1 T2",
    "LUNG 1.25mm Bone Window",
    "WHITE MATTER LONG TR",
    "DR CHEST PA AND LAT",
    "MR BRAIN for Head protocol",
    "t1_mprage_sag_p2_iso",
    "ep2d_diff_mddw_20_p2_b1000",
    "Ax DWI 1000b TR 2000 512x512",
    "Topogram 0.6 T20s Head 5.0 H40s",
    "AAHead_Scout_64ch-head-coil",
    "Cardiac cine short axis",
    "X-RAY Hand 3 views",
]


def alnum(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text)


@pytest.mark.parametrize(("text", "planted"), PLANTED, ids=[t for t, _ in PLANTED])
def test_planted_identifiers_are_removed(text: str, planted: list[str]) -> None:
    out = scrub(text)
    left = set(alnum(out))
    for identifier in planted:
        assert not set(alnum(identifier)) & left, (identifier, out)


@pytest.mark.parametrize("text", CLINICAL)
def test_clinical_words_are_kept(text: str) -> None:
    assert scrub(text) == text
    assert find(text) == []


def test_placeholders_say_what_was_there() -> None:
    text = "CT CHEST for Smith, Alice MRN0012345 on 2024-01-15 at 10:32 x@y.org"
    assert scrub(text) == "CT CHEST for [NAME], [NAME] [ID] on [DATE] at [TIME] [EMAIL]"
    assert not vocabulary().is_name("wrzosowska")
    assert scrub("tel 555-1234, Wrzosowska") == "tel [PHONE], [WORD]"  # an unlisted word is a [WORD]
    assert scrub("by Wrzosowska") == "by [NAME]"  # ... and a name after "by"


def test_a_name_that_is_a_clinical_word_goes_when_it_stands_in_a_name() -> None:
    assert scrub("Dr White") == "Dr [NAME]"
    assert scrub("Barry White") == "[NAME] [NAME]"
    assert scrub("WHITE, BARRY") == "[NAME], [NAME]"
    assert scrub("WHITE MATTER") == "WHITE MATTER"
    assert scrub("MR BRAIN") == "MR BRAIN" and scrub("Mr. Brain") == "Mr. [NAME]"


def test_the_images_own_identifiers_and_site_acronyms_go() -> None:
    known = {"general", "hospital"} | site_tokens(["Centre Hospitalier Universitaire Vaudois"])
    assert "chuv" in known
    assert scrub("General Hospital CHUV brain", known) == "[NAME] [NAME] [NAME] brain"
    assert scrub("patient A12 study", {"a12"}) == "patient [ID] study"


def test_words_format_is_the_clean_actions() -> None:
    assert scrub_words("CT CHEST for Smith, Alice MRN0012345 on 2024-01-15 at 10:32") == "CT CHEST for on at"
    assert scrub_words("Smith^Alice 19600101 lesion 2") == "lesion 2"
    assert scrub_words("Dr Smith") == "Dr" and scrub_words("Smith") == ""


def test_clean_descriptors_uses_the_scrubber(tmp_path: Path) -> None:
    ds = make_ct()
    ds.SeriesDescription = "T1 AX post Dr Smith 2021-03-04"  # Smith is nobody the image names
    ds.StudyDescription = "MR BRAIN research Wrzosowska"
    engine = Deidentifier("k", DeidOptions.from_names(["clean_descriptors"]), pixel_filter=None)
    out = pydicom.dcmread(engine.deidentify_file(write(ds, tmp_path / "in.dcm"), tmp_path / "out.dcm", IDS).path)
    assert out.SeriesDescription == "T1 AX post Dr"
    assert out.StudyDescription == "MR BRAIN research"
    data = (tmp_path / "out.dcm").read_bytes()
    assert b"Smith" not in data and b"Wrzosowska" not in data and b"2021-03-04" not in data


def test_kinds_are_typed() -> None:
    kinds = [f.kind for f in find("Smith 2021-03-04, 10:32 MRN 1234567 +41 21 314 11 11 a@b.org http://x.org")]
    assert kinds == [Kind.NAME, Kind.DATE, Kind.TIME, Kind.ID, Kind.PHONE, Kind.EMAIL, Kind.URL]


def test_word_lists_ship_with_the_package() -> None:
    folder = resources.files("sendit.deid").joinpath("data", "names")
    names = [entry.name for entry in folder.iterdir() if entry.name.endswith(".txt")]
    assert set(names) >= {
        "surnames.txt",
        "given-names.txt",
        "clinical-words.txt",
        "english-words.txt",
        "dicom-words.txt",
    }
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sendit"]
    for name in [*names, "README.md"]:
        assert any(fnmatch.fnmatch(f"deid/data/names/{name}", g) for g in globs), name
    vocab = vocabulary()
    assert {"smith", "garcia", "nguyen", "muller"} <= vocab.surnames and {"alice", "jose"} <= vocab.given
    assert {"head", "chest", "brain", "lung", "white", "post"} <= vocab.clinical


def test_long_letter_and_digit_codes_leave_a_description_but_technique_words_stay() -> None:
    """Found by the canary corpus on its way to Datastore: a 9+ character code of letters and digits
    is someone's number, while technique words with digits are short."""
    assert scrub("CANARY59XYZ head ep2d b1000 T2W") == "[ID] head ep2d b1000 T2W"
