"""One pipeline step at a time: rows set up directly, one step called, what it did asserted.

Each test builds the state a step starts from (a study, a series with its stored identifiers, images
in a status, their originals and working copies on disk), holds the series' lease as a worker
would, calls ``deliver_pending``, ``verify_sent`` or ``clean_up_done`` once, and checks the rows and
files the step left. The series status aggregation is checked on its own table of counts. When one
of these fails, the step named in the test is the one to read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.utils import timezone
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from sendit.destinations.base import Destination, DestinationError, OutgoingImage, SendResult
from sendit.destinations.folder import FolderDestination
from sendit.identifiers.base import Identifiers
from sendit.relay import files, pipeline
from sendit.relay.models import Delivery, Event, Image, Series, SeriesIdentifiers, Stage, Status, Study
from sendit.relay.transitions import Lease, LeaseLost, aggregate_status, refresh_series_status

pytestmark = pytest.mark.django_db(transaction=True)

PSEUDONYM = "PSEUDO-0001"


def write_dicom(path: Path, sop_instance_uid: str, series_uid: str) -> Path:
    """A small, valid CT instance: what a working copy (or an original) holds."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = PSEUDONYM
    ds.Modality = "CT"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Scene:
    """One series as a step finds it: rows, originals in the input folder, working copies."""

    series: Series
    images: list[Image]
    study_uid: str  # de-identified
    originals: dict[int, Path] = field(default_factory=dict)

    def copy_of(self, image: Image) -> Path:
        return files.working_copy(self.series.pk, image.pk)

    def status_of(self, image: Image) -> str:
        return Image.objects.values_list("status", flat=True).get(pk=image.pk)

    def statuses(self) -> list[str]:
        return list(Image.objects.filter(series=self.series).order_by("id").values_list("status", flat=True))


def make_scene(input_folder: Path, status: Status, count: int = 3) -> Scene:
    """A series whose ``count`` images are all in ``status``, de-identified already (working copies,
    de-identified UIDs, stored identifiers), with their originals still in the input folder."""
    deid_study_uid, deid_series_uid = generate_uid(), generate_uid()
    study = Study.objects.create(study_uid=generate_uid(), deid_study_uid=deid_study_uid)
    series = Series.objects.create(
        study=study, series_uid=generate_uid(), deid_series_uid=deid_series_uid, modality="CT", status=status
    )
    ids = Identifiers(patient_id=PSEUDONYM, patient_name="PSEUDO^ONE", accession_number="ACC-1", jitter_days=-3)
    SeriesIdentifiers.objects.create(series=series, provider="test", response=ids.to_json())
    scene = Scene(series=series, images=[], study_uid=deid_study_uid)
    for number in range(count):
        relative = f"study/series/IM{number:04d}.dcm"
        original = write_dicom(input_folder / relative, generate_uid(), series.series_uid)
        image = Image.objects.create(
            series=series,
            sop_instance_uid=generate_uid(),
            deid_sop_instance_uid=generate_uid(),
            path=relative,
            size=original.stat().st_size,
            sha256=files.sha256_of(original),
            status=status,
        )
        write_dicom(files.working_copy(series.pk, image.pk), image.deid_sop_instance_uid, deid_series_uid)
        scene.images.append(image)
        scene.originals[image.pk] = original
    return scene


@contextmanager
def holding(series: Series) -> Iterator[tuple[Lease, pipeline.LeaseKeeper]]:
    """The series' lease and its renewing keeper, as ``process_series`` holds them around a step."""
    lease = pipeline.acquire_lease(series.pk, pipeline.lease_owner_name())
    assert lease is not None
    try:
        with pipeline.LeaseKeeper(lease) as keeper:
            yield lease, keeper
    finally:
        pipeline.release_lease(lease)


def take_over(series: Series) -> None:
    """Another worker takes the series once this one's lease ran out (the generation goes up)."""
    Series.objects.filter(pk=series.pk).update(lease_expires=timezone.now() - timedelta(seconds=1))
    assert pipeline.acquire_lease(series.pk, "other-host:1:ns:x") is not None


class ScriptedDestination:
    """A stand-in destination whose answers a test chooses, and which records what it was sent.

    Used only where the real FolderDestination cannot be made to answer so: one image refused for
    good or for now, the whole destination down, or an image it does not hold at verification.
    """

    def __init__(self, name: str = "scripted") -> None:
        self.name = name
        self.sent: list[int] = []
        self.refuse: dict[int, tuple[bool, str]] = {}  # image id → (permanent, message)
        self.down: DestinationError | None = None
        self.lacks: set[str] = set()  # de-identified SOPInstanceUIDs it does not hold

    def send(self, images: Sequence[OutgoingImage]) -> list[SendResult]:
        if self.down is not None:
            raise self.down
        results = []
        for image in images:
            self.sent.append(image.image_id)
            if image.image_id in self.refuse:
                permanent, message = self.refuse[image.image_id]
                results.append(SendResult(image.image_id, delivered=False, permanent=permanent, message=message))
            else:
                results.append(SendResult(image.image_id, delivered=True, status=0))
        return results

    def missing(self, series_uid: str, sop_instance_uids: set[str]) -> set[str]:
        if self.down is not None:
            raise self.down
        return sop_instance_uids & self.lacks

    def check(self) -> str | None:
        return None

    def close(self) -> None:
        return None


def deliver(scene: Scene, destinations: Sequence[Destination], written: pipeline.Written | None = None) -> list[str]:
    with holding(scene.series) as (lease, keeper):
        return pipeline.deliver_pending(scene.series, list(destinations), lease, keeper, written or {})


def verify(scene: Scene, destinations: Sequence[Destination]) -> set[str]:
    with holding(scene.series) as (lease, _):
        return pipeline.verify_sent(scene.series, list(destinations), lease)


def clean_up(scene: Scene) -> None:
    with holding(scene.series) as (lease, keeper):
        pipeline.clean_up_done(scene.series, lease, keeper)


def stage_of(series: Series) -> str:
    return Series.objects.values_list("stage", flat=True).get(pk=series.pk)


# --- deliver_pending ------------------------------------------------------------------------------


def test_deliver_pending_writes_each_copy_under_pseudonyms_and_marks_it_sent(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING)
    folder = FolderDestination(sendit_dirs["OUTPUT_FOLDER"])

    assert deliver(scene, [folder]) == []  # resuming: no `written`, so each working copy's header is read

    assert scene.statuses() == [Status.SENT] * 3
    series_folder = sendit_dirs["OUTPUT_FOLDER"] / PSEUDONYM / scene.study_uid / scene.series.deid_series_uid
    for image in scene.images:
        delivered = series_folder / f"{image.deid_sop_instance_uid}.dcm"
        assert delivered.read_bytes() == scene.copy_of(image).read_bytes()
    assert set(Delivery.objects.values_list("image_id", "destination")) == {(i.pk, "folder") for i in scene.images}
    assert stage_of(scene.series) == Stage.DELIVERED
    assert Event.objects.filter(image__isnull=False, to_status=Status.SENT).count() == 3


def test_deliver_pending_never_sends_again_what_a_destination_confirmed(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING)
    confirmed = scene.images[0]
    Delivery.objects.create(image=confirmed, destination="scripted", status_code=0)
    destination = ScriptedDestination()

    deliver(scene, [destination])

    assert destination.sent == [image.pk for image in scene.images[1:]]
    assert scene.statuses() == [Status.SENT] * 3  # the confirmed one moves on with its siblings
    assert Delivery.objects.filter(image=confirmed).count() == 1


def test_deliver_pending_waits_for_every_destination_before_sent(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING, count=2)
    folder = FolderDestination(sendit_dirs["OUTPUT_FOLDER"])
    busy = ScriptedDestination("pacs")
    busy.refuse[scene.images[1].pk] = (False, f"image {scene.images[1].pk}: peer busy")

    reasons = deliver(scene, [folder, busy])

    assert reasons == [f"pacs: image {scene.images[1].pk}: peer busy"]
    assert scene.statuses() == [Status.SENT, Status.DONEPROCESSING]  # the folder has it; pacs does not yet
    assert Delivery.objects.filter(image=scene.images[1], destination="folder").exists()
    assert stage_of(scene.series) != Stage.DELIVERED


def test_deliver_pending_fails_an_image_refused_for_good_and_sends_its_siblings(
    sendit_dirs: dict[str, Path],
) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING)
    refused = scene.images[1]
    destination = ScriptedDestination()
    why = f"image {refused.pk}: 0x0122 Refused: SOP Class Not Supported"
    destination.refuse[refused.pk] = (True, why)

    assert deliver(scene, [destination]) == []

    assert scene.statuses() == [Status.SENT, Status.ERROR, Status.SENT]
    assert Image.objects.get(pk=refused.pk).reason == f"scripted: {why}"  # the destination named, once
    assert not Delivery.objects.filter(image=refused).exists()


@pytest.mark.parametrize(
    ("retryable", "raised"), [(True, pipeline.RetryableFailure), (False, pipeline.PermanentFailure)]
)
def test_deliver_pending_turns_a_destination_down_into_a_failure_of_the_step(
    sendit_dirs: dict[str, Path], retryable: bool, raised: type[Exception]
) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING)
    destination = ScriptedDestination()
    destination.down = DestinationError("scripted: connection refused", retryable=retryable)

    with pytest.raises(raised, match=r"^scripted: connection refused$"):
        deliver(scene, [destination])

    assert scene.statuses() == [Status.DONEPROCESSING] * 3  # the caller decides: retry or ERROR
    assert not Delivery.objects.exists()


def test_deliver_pending_sends_a_lost_working_copy_back_to_be_made_again(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING)
    lost = scene.images[0]
    scene.copy_of(lost).unlink()
    destination = ScriptedDestination()

    with pytest.raises(pipeline.RetryableFailure, match="working copies missing"):
        deliver(scene, [destination])

    assert scene.statuses() == [Status.NEW, Status.DONEPROCESSING, Status.DONEPROCESSING]
    assert Image.objects.get(pk=lost.pk).reason == "working copy missing; de-identifying again"
    assert destination.sent == []  # nothing is sent until the series is whole again
    assert scene.originals[lost.pk].exists()


def test_deliver_pending_after_a_takeover_records_nothing(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING, count=2)
    destination = ScriptedDestination()

    class TakenOverWhileSending(ScriptedDestination):
        """The worker pauses in send(); meanwhile another takes the series over."""

        def send(self, images: Sequence[OutgoingImage]) -> list[SendResult]:
            take_over(scene.series)
            return destination.send(images)

    with pytest.raises(LeaseLost):
        deliver(scene, [TakenOverWhileSending()])

    assert scene.statuses() == [Status.DONEPROCESSING] * 2
    assert not Delivery.objects.exists()  # the new holder sends again; a duplicate, never a loss


# --- verify_sent ----------------------------------------------------------------------------------


def test_verify_sent_marks_done_what_the_destination_holds(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING)
    folder = FolderDestination(sendit_dirs["OUTPUT_FOLDER"])
    deliver(scene, [folder])

    assert verify(scene, [folder]) == set()

    assert scene.statuses() == [Status.DONE] * 3
    assert set(Image.objects.filter(series=scene.series).values_list("reason", flat=True)) == {"verified"}
    assert stage_of(scene.series) == Stage.VERIFIED
    assert Series.objects.get(pk=scene.series.pk).status == Status.DONE


def test_verify_sent_sends_back_an_image_the_destination_lost(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING)
    folder = FolderDestination(sendit_dirs["OUTPUT_FOLDER"])
    deliver(scene, [folder])
    gone = scene.images[2]
    next(sendit_dirs["OUTPUT_FOLDER"].rglob(f"{gone.deid_sop_instance_uid}.dcm")).unlink()  # wiped at the far end

    assert verify(scene, [folder]) == {"folder"}

    assert scene.statuses() == [Status.DONE, Status.DONE, Status.DONEPROCESSING]
    assert Image.objects.get(pk=gone.pk).reason == "not found at the destination; sending again"
    assert not Delivery.objects.filter(image=gone).exists()  # so the next delivery sends it again
    assert Delivery.objects.filter(image__in=scene.images[:2]).count() == 2


def test_verify_sent_asks_every_destination(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.SENT, count=2)
    holds_all, lacks_one = ScriptedDestination("a"), ScriptedDestination("b")
    lacks_one.lacks = {scene.images[0].deid_sop_instance_uid}

    assert verify(scene, [holds_all, lacks_one]) == {"b"}

    assert scene.statuses() == [Status.DONEPROCESSING, Status.DONE]


def test_verify_sent_that_cannot_ask_moves_nothing(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.SENT, count=2)
    destination = ScriptedDestination()
    destination.down = DestinationError("scripted: timed out")

    with pytest.raises(pipeline.RetryableFailure, match=r"^scripted: verification failed: timed out$"):
        verify(scene, [destination])

    assert scene.statuses() == [Status.SENT] * 2


def test_verify_sent_with_nothing_sent_asks_nobody(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING, count=1)
    destination = ScriptedDestination()
    destination.down = DestinationError("scripted: must not be asked")

    assert verify(scene, [destination]) == set()
    assert scene.statuses() == [Status.DONEPROCESSING]


# --- clean_up_done --------------------------------------------------------------------------------


def test_clean_up_done_removes_originals_copies_and_the_series_folder(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONE)
    folder = files.series_folder(scene.series.pk)
    (folder / "metadata.json").write_text("{}")
    (folder / f"{scene.images[0].pk}.g7.dcm").write_bytes(b"a stale worker's unfinished copy")

    clean_up(scene)

    assert not any(path.exists() for path in scene.originals.values())
    assert list(sendit_dirs["INPUT_FOLDER"].iterdir()) == []  # emptied folders go too
    assert not folder.exists()
    assert Image.objects.filter(series=scene.series, cleaned_at__isnull=True).count() == 0
    assert scene.statuses() == [Status.DONE] * 3  # clean-up changes files, never a status


def test_clean_up_done_keeps_what_it_is_configured_to_keep(sendit_dirs: dict[str, Path], reconfigure: Any) -> None:
    reconfigure(KEEP_ORIGINALS=True, KEEP_WORKING=True)
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONE, count=2)
    blobs = {path.read_bytes() for path in scene.originals.values()}

    clean_up(scene)

    assert not any(path.exists() for path in scene.originals.values())  # out of the input folder ...
    kept = sendit_dirs["DATA_DIR"] / "kept"
    assert {path.read_bytes() for path in kept.rglob("*.dcm")} == blobs  # ... into DATA_DIR/kept
    assert all(scene.copy_of(image).exists() for image in scene.images)


def test_clean_up_done_leaves_a_new_file_at_a_cleaned_path_alone(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONE, count=2)
    reused = scene.originals[scene.images[0].pk]
    write_dicom(reused, generate_uid(), generate_uid())  # the producer re-used the name for a new file

    clean_up(scene)

    assert reused.exists() and pydicom.dcmread(reused).SOPInstanceUID != scene.images[0].sop_instance_uid
    assert not scene.originals[scene.images[1].pk].exists()
    assert Image.objects.filter(series=scene.series, cleaned_at__isnull=True).count() == 0  # done with, once


def test_clean_up_done_touches_only_done_images(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONE)
    waiting = scene.images[2]
    Image.objects.filter(pk=waiting.pk).update(status=Status.DONEPROCESSING)

    clean_up(scene)

    assert scene.originals[waiting.pk].exists() and scene.copy_of(waiting).exists()
    assert not scene.originals[scene.images[0].pk].exists() and not scene.copy_of(scene.images[0]).exists()
    assert files.series_folder(scene.series.pk).exists()  # still holds the copy on its way
    assert Image.objects.get(pk=waiting.pk).cleaned_at is None


def test_clean_up_done_cleans_an_image_once(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONE, count=1)
    image = scene.images[0]
    clean_up(scene)
    first = Image.objects.get(pk=image.pk).cleaned_at
    arrived = write_dicom(scene.originals[image.pk], image.sop_instance_uid, scene.series.series_uid)
    Image.objects.filter(pk=image.pk).update(sha256=files.sha256_of(arrived))  # even with the very same bytes

    clean_up(scene)

    assert arrived.exists()  # a cleaned image's path is not looked at again: the file is a new arrival
    assert Image.objects.get(pk=image.pk).cleaned_at == first


def test_clean_up_done_after_a_takeover_removes_nothing(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONE, count=2)

    with holding(scene.series) as (lease, keeper):
        take_over(scene.series)
        with pytest.raises(LeaseLost):
            pipeline.clean_up_done(scene.series, lease, keeper)

    assert all(path.exists() for path in scene.originals.values())
    assert all(scene.copy_of(image).exists() for image in scene.images)
    assert Image.objects.filter(series=scene.series, cleaned_at__isnull=False).count() == 0


# --- the series status aggregation ----------------------------------------------------------------

N, P, DP, S = Status.NEW, Status.PROCESSING, Status.DONEPROCESSING, Status.SENT
D, E, Q, K = Status.DONE, Status.ERROR, Status.QUARANTINED, Status.SKIPPED


@pytest.mark.parametrize(
    ("counts", "shown"),
    [
        ({}, N),  # nothing recorded yet
        ({N: 3}, N),
        ({N: 1, D: 2}, P),  # started: some images moved on
        ({P: 1}, P),
        ({DP: 2, S: 1}, P),
        ({S: 1, E: 1, Q: 1}, P),  # in flight wins over a finished sibling's problem
        ({N: 1, Q: 1}, P),
        ({E: 1, Q: 1, D: 5}, E),  # finished: the reason it stopped, ERROR first (a retry may fix it)
        ({Q: 1, D: 5, K: 1}, Q),
        ({D: 2, K: 1}, D),
        ({K: 2}, K),  # only duplicates or filtered files
        ({D: 0, K: 1}, K),  # a zero count is no image
    ],
)
def test_series_shows_the_least_advanced_state_of_its_images(counts: dict[str, int], shown: Status) -> None:
    assert aggregate_status(counts) == shown


def test_refreshing_the_series_status_records_a_change_once(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.NEW, count=2)
    Image.objects.filter(pk=scene.images[0].pk).update(status=Status.QUARANTINED)
    Image.objects.filter(pk=scene.images[1].pk).update(status=Status.DONE)

    refresh_series_status(scene.series, "checked")
    refresh_series_status(scene.series, "checked again")

    assert Series.objects.get(pk=scene.series.pk).status == Status.QUARANTINED
    series_events = Event.objects.filter(series=scene.series, image__isnull=True)
    assert list(series_events.values_list("from_status", "to_status")) == [(Status.NEW, Status.QUARANTINED)]


def test_verify_sent_refused_by_the_destination_fails_the_step_for_good(sendit_dirs: dict[str, Path]) -> None:
    """A PACS that refuses our C-FIND will not change its mind by waiting: permanent, words kept."""
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.SENT, count=2)
    destination = ScriptedDestination()
    destination.down = DestinationError("C-FIND refused: add SENDIT to DicomModalities", retryable=False)

    with pytest.raises(pipeline.PermanentFailure, match="DicomModalities"):
        verify(scene, [destination])


def test_deliver_pending_records_what_the_adapter_saw_as_series_events(sendit_dirs: dict[str, Path]) -> None:
    scene = make_scene(sendit_dirs["INPUT_FOLDER"], Status.DONEPROCESSING, count=2)
    destination = ScriptedDestination()
    destination.events = ["association lost while sending image 7 (aborted by the peer); reconnecting"]  # type: ignore[attr-defined]

    deliver(scene, [destination])

    notes = list(
        Event.objects.filter(series=scene.series, reason__contains="reconnecting").values_list("reason", flat=True)
    )
    assert notes == ["scripted: association lost while sending image 7 (aborted by the peer); reconnecting"]
