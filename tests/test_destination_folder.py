"""The folder destination: pseudonym / study / series layout, never outside its root."""

from __future__ import annotations

from pathlib import Path

from sendit.destinations.base import OutgoingImage
from sendit.destinations.folder import FolderDestination


def outgoing(tmp_path: Path, patient: str, image_id: int = 1) -> OutgoingImage:
    source = tmp_path / f"src{image_id}.dcm"
    source.write_bytes(b"x" * 200)
    return OutgoingImage(
        image_id, source, patient, "2.25.1", "2.25.2", f"2.25.{100 + image_id}", "1.2", "1.2.840.10008.1.2.1"
    )


def test_layout_and_verification(tmp_path: Path) -> None:
    destination = FolderDestination(tmp_path / "out")
    images = [outgoing(tmp_path, "SIDABC", 1), outgoing(tmp_path, "SIDABC", 2)]
    assert all(result.delivered for result in destination.send(images))
    assert (tmp_path / "out" / "SIDABC" / "2.25.1" / "2.25.2" / "2.25.101.dcm").read_bytes() == b"x" * 200
    assert destination.missing("2.25.2", {"2.25.101", "2.25.102", "2.25.999"}) == {"2.25.999"}
    assert not list((tmp_path / "out").rglob("*.part"))


def test_a_hostile_pseudonym_cannot_leave_the_root(tmp_path: Path) -> None:
    destination = FolderDestination(tmp_path / "out")
    result = destination.send([outgoing(tmp_path, "../../escaped")])[0]
    assert result.delivered
    assert not (tmp_path / "escaped").exists()
    written = list((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 1 and (tmp_path / "out") in written[0].parents
    assert destination.missing("2.25.2", {"2.25.101"}) == set()
