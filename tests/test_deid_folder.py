"""``deid_folder``: a folder in, a PHI-free tree out, bad files listed and the rest carried on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest

from sendit.deid import Deidentifier, DeidOptions, deid_folder
from sendit.deid import folder as folder_module
from sendit.identifiers import IdentifierError, Identifiers, SeriesHeader
from sendit.identifiers.local import LocalProvider
from tests.test_deid_engine import make_ct, write

KEY = "folder-test-key"
STUDY_1 = "1.2.826.0.1.3680043.9.7777.10"
STUDY_2 = "1.2.826.0.1.3680043.9.7777.20"
PHI = ["MRN-ONE", "MRN-TWO", "Smith", "Jones", STUDY_1, STUDY_2]


class CountingProvider:
    """The local provider, remembering what it was asked; can be told to refuse one study."""

    def __init__(self, refuse_study: str = "") -> None:
        self.inner = LocalProvider(KEY)
        self.calls: list[list[SeriesHeader]] = []
        self.refuse_study = refuse_study

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]:
        self.calls.append(series)
        if any(header.study_uid == self.refuse_study for header in series):
            raise IdentifierError("service said no")
        return self.inner.identify(series)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Two patients, three series, nested folders that do not follow the series; plus bad files."""
    root = tmp_path / "in"
    layout = [
        ("scanner/a/1.dcm", STUDY_1, STUDY_1 + ".1", "MRN-ONE", "Smith^Ann"),
        ("scanner/b/2.dcm", STUDY_1, STUDY_1 + ".1", "MRN-ONE", "Smith^Ann"),
        ("scanner/a/3.dcm", STUDY_1, STUDY_1 + ".2", "MRN-ONE", "Smith^Ann"),
        ("4.dcm", STUDY_1, STUDY_1 + ".2", "MRN-ONE", "Smith^Ann"),
        ("deep/er/Jones/5.dcm", STUDY_2, STUDY_2 + ".1", "MRN-TWO", "Jones^Bob"),
        ("deep/er/Jones/6", STUDY_2, STUDY_2 + ".1", "MRN-TWO", "Jones^Bob"),
    ]
    for index, (rel, study, series, pid, name) in enumerate(layout):
        ds = make_ct(study_uid=study, series_uid=series, sop_uid=f"{series}.{index}", patient_id=pid, patient_name=name)
        write(ds, root / rel)
    (root / "notes.txt").write_text("Smith^Ann MRN-ONE")
    good = (root / "4.dcm").read_bytes()
    (root / "0-cut.dcm").write_bytes(good[: len(good) - 64])  # found before the good 4.dcm
    shutil.copy(root / "4.dcm", root / "copy-of-4.dcm")
    bad = make_ct(study_uid=STUDY_2, series_uid=STUDY_2 + ".1", sop_uid=STUDY_2 + ".1.99", patient_id="MRN-TWO")
    with pytest.warns(UserWarning):
        bad.ContentDate = "2021-13-45"
    write(bad, root / "bad.dcm")
    return root


def test_folder_is_deidentified_into_a_phi_free_tree(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    provider = CountingProvider()
    summary = deid_folder(tree, out, Deidentifier(KEY), provider)

    assert summary.files_seen == 10
    assert summary.written == 6
    assert (summary.studies, summary.series) == (2, 3)
    reasons = dict(summary.problems)
    assert set(reasons) == {"notes.txt", "0-cut.dcm", "bad.dcm", "copy-of-4.dcm"}
    assert reasons["notes.txt"].startswith("not a DICOM file")  # the reason ingest gives, too
    assert reasons["0-cut.dcm"] == "truncated DICOM file: pixel data shorter than declared"  # as ingest says
    # (the cut copy never became the image: its good copy 4.dcm was written)
    assert reasons["bad.dcm"] == "(0008,0023) ContentDate: malformed DA value"
    assert reasons["copy-of-4.dcm"] == "duplicate of an instance in the input (4.dcm)"  # ingest's words

    # one provider call per study, with that study's series
    assert sorted(len(call) for call in provider.calls) == [1, 2]
    for call in provider.calls:
        assert len({header.study_uid for header in call}) == 1
        assert all(header.patient_id in ("MRN-ONE", "MRN-TWO") for header in call)

    files = sorted(out.rglob("*"))
    dicoms = [path for path in files if path.is_file() and path.name != "series.json"]
    assert len(dicoms) == 6 and not [path for path in dicoms if path.suffix != ".dcm"]
    for path in files:
        relative = path.relative_to(out).as_posix()
        assert not [phi for phi in PHI if phi in relative], relative
    # one series.json per written series, beside its images, with no PHI in it
    documents = sorted(out.rglob("series.json"))
    assert len(documents) == 3
    for path in documents:
        text = path.read_text()
        assert not [phi for phi in PHI if phi in text], path
        document = json.loads(text)
        assert document["series_uid"] == path.parent.name and document["pseudonym"] == path.parts[-4]
        assert document["modality"] == "CT" and document["sex"] == "F" and document["manufacturer"] == "ACME"
        assert document["study_description"] == "CT CHEST" and document["age_bucket"] == "60-64"
    assert sorted(json.loads(p.read_text())["images"] for p in documents) == [2, 2, 2]
    for path in dicoms:
        ds = pydicom.dcmread(path)
        patient, study, series, name = path.relative_to(out).parts
        assert (patient, study, series, name) == (
            ds.PatientID,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            f"{ds.SOPInstanceUID}.dcm",
        )
        assert ds.PatientID.startswith("SID") and ds.PatientIdentityRemoved == "YES"
    assert len({path.parts[-4] for path in dicoms}) == 2  # two pseudonymous patients
    assert {result.path for result in summary.results} == set(dicoms)


def test_a_refused_study_is_reported_and_the_other_is_written(tree: Path, tmp_path: Path) -> None:
    summary = deid_folder(tree, tmp_path / "out", Deidentifier(KEY), CountingProvider(refuse_study=STUDY_2))
    refused = [rel for rel, reason in summary.problems if reason == "identifiers: service said no"]
    assert sorted(refused) == ["bad.dcm", "deep/er/Jones/5.dcm", "deep/er/Jones/6"]
    assert summary.written == 4


def test_two_processes_write_the_same_files(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Deidentifier(KEY)
    single = deid_folder(tree, tmp_path / "one", engine, CountingProvider())
    monkeypatch.setattr(folder_module, "_CHUNK", 2)  # small chunks so this little tree uses the pool
    progress: list[tuple[int, int]] = []
    double = deid_folder(
        tree, tmp_path / "two", engine, CountingProvider(), workers=2, progress=lambda d, t: progress.append((d, t))
    )
    assert single.problems == double.problems
    one = {p.relative_to(tmp_path / "one"): p.read_bytes() for p in (tmp_path / "one").rglob("*.dcm")}
    two = {p.relative_to(tmp_path / "two"): p.read_bytes() for p in (tmp_path / "two").rglob("*.dcm")}
    assert one == two and len(one) == 6
    assert progress[-1] == (7, 7)  # every output image reported (6 written + the bad date)


def test_an_output_folder_inside_the_input_is_not_read_back(tree: Path) -> None:
    engine = Deidentifier(KEY)
    first = deid_folder(tree, tree / "out", engine, CountingProvider())
    again = deid_folder(tree, tree / "out", engine, CountingProvider())
    assert first.files_seen == again.files_seen == 10
    assert again.written == 6


def test_an_empty_folder_is_fine(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    summary = deid_folder(tmp_path / "in", tmp_path / "out", Deidentifier(KEY), CountingProvider())
    assert (summary.files_seen, summary.written, summary.problems) == (0, 0, [])


def test_hidden_in_progress_and_linked_files_are_never_read(tree: Path, tmp_path: Path) -> None:
    """The relay's walk rules: hidden and in-progress entries are counted, links reported, none read."""
    (tree / ".DS_Store").write_bytes(b"Smith^Ann")
    shutil.copy(tree / "4.dcm", tree / "late.dcm.tmp1234")  # still being written by its producer
    elsewhere = write(
        make_ct(study_uid=STUDY_1 + ".9", series_uid=STUDY_1 + ".9.1", patient_id="MRN-THREE"), tmp_path / "x.dcm"
    )
    (tree / "link.dcm").symlink_to(elsewhere)

    summary = deid_folder(tree, tmp_path / "out", Deidentifier(KEY), CountingProvider())

    reasons = dict(summary.problems)
    assert ".DS_Store" not in reasons and "late.dcm.tmp1234" not in reasons
    assert reasons["link.dcm"] == "symbolic link; not followed"
    assert summary.files_seen == 11 and summary.written == 6  # the ten files and the link; nothing through it
    assert (summary.studies, summary.series) == (2, 3)
    assert dict(summary.ignored) == {"hidden": 1, "in_progress": 1}


def test_uids_that_look_like_paths_stay_inside_the_output_folder(tmp_path: Path) -> None:
    """With Retain UIDs the UIDs are written as they came: the output layout makes each a safe name."""
    with pytest.warns(UserWarning):  # pydicom says the UID is invalid; it is what a hostile sender writes
        ds = make_ct(study_uid="1.2/../../../escaped", series_uid="1.2.3", sop_uid="1.2.3.4")
    write(ds, tmp_path / "in" / "x.dcm")
    out = tmp_path / "out" / "deep"

    summary = deid_folder(tmp_path / "in", out, Deidentifier(KEY, DeidOptions(retain_uids=True)), CountingProvider())

    assert summary.written == 1
    written = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert len(written) == 2 and all(out in path.parents for path in written)  # the image and series.json
    assert [result.path.parent.parent.name for result in summary.results] == ["1.2_.._.._.._escaped"]


def test_two_files_with_one_sop_instance_uid_are_decided_as_ingest_decides(tmp_path: Path) -> None:
    """The first in the walk's (sorted) order is the image, wherever the other lies and whatever series
    it claims; a later copy is a duplicate (same bytes) or a conflict (other bytes), never written."""
    root = tmp_path / "in"
    sop = STUDY_1 + ".1.7"
    first = write(make_ct(series_uid=STUDY_1 + ".1", sop_uid=sop), root / "a" / "first.dcm")
    shutil.copy(first, root / "b-same.dcm")
    write(make_ct(series_uid=STUDY_1 + ".2", sop_uid=sop, patient_name="Smith^Other"), root / "c" / "other.dcm")

    summary = deid_folder(root, tmp_path / "out", Deidentifier(KEY), CountingProvider())

    assert summary.written == 1 and summary.results[0].series_uid == Deidentifier(KEY).remap_uid(STUDY_1 + ".1")
    assert dict(summary.problems) == {
        "b-same.dcm": "duplicate of an instance in the input (a/first.dcm)",
        "c/other.dcm": "conflict: same SOPInstanceUID with different content (a/first.dcm is the one processed)",
    }
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1
