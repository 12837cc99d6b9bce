"""The whole pipeline into a real Orthanc: delivery, fidelity, outages, a dying worker, verification.

Every test starts its own Orthanc (``orthanc_factory``) so that instance counts are exact. What
Orthanc holds is checked independently of the code under test: plain REST calls (``OrthancServer``
helpers, httpx) and DCMTK's ``findscu``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.utils import timezone
from pydicom.uid import UID

from sendit.destinations.base import OutgoingImage, SendResult
from sendit.destinations.dicom import DicomDestination
from sendit.destinations.folder import FolderDestination
from sendit.relay import files, pipeline
from sendit.relay.ingest import ingest_folder
from sendit.relay.inline import run_inline
from sendit.relay.models import Delivery, Event, Image, Series, SeriesIdentifiers, Status
from tests.helpers import demo_into, ingest_and_run, statuses
from tests.orthanc import OrthancServer, dataset_part, findscu_sop_uids

pytestmark = pytest.mark.django_db(transaction=True)
orthanc = pytest.mark.orthanc  # every test but the last needs Debian's orthanc package

UNKNOWN_SOP_CLASS = UID("1.2.826.0.1.3680043.8.498.999.1")

Reconfigure = Callable[..., None]


# -- helpers ---------------------------------------------------------------------------------


def via_dicom(reconfigure: Reconfigure, server: OrthancServer, **more: Any) -> None:
    reconfigure(
        SEND_TO_ORTHANC=True,
        ORTHANC_IPADDRESS=server.host,
        ORTHANC_PORT=server.dicom_port,
        ORTHANC_AET=server.aet,
        SENDIT_AET="SENDIT",
        ORTHANC_URL="",
        ORTHANC_TIMEOUT=15,
        RETRY_BASE_SECONDS=0,
        **more,
    )


def via_rest(reconfigure: Reconfigure, server: OrthancServer, **more: Any) -> None:
    reconfigure(SEND_TO_ORTHANC=False, ORTHANC_URL=server.url, ORTHANC_TIMEOUT=15, RETRY_BASE_SECONDS=0, **more)


def working_copies() -> dict[str, Path]:
    """De-identified SOPInstanceUID → our working copy (kept with KEEP_WORKING=true)."""
    return {
        image.deid_sop_instance_uid: files.working_copy(image.series_id, image.pk)
        for image in Image.objects.exclude(deid_sop_instance_uid="")
    }


def held_by_series(server: OrthancServer) -> dict[str, dict[str, str]]:
    """deid SeriesInstanceUID → {SOPInstanceUID: Orthanc ID}, for every series we recorded."""
    return {s.deid_series_uid: server.instances_in_series(s.deid_series_uid) for s in Series.objects.all()}


def expected_uids() -> dict[str, set[str]]:
    wanted: dict[str, set[str]] = {}
    for image in Image.objects.select_related("series"):
        wanted.setdefault(image.series.deid_series_uid, set()).add(image.deid_sop_instance_uid)
    return wanted


class SendSpy:
    """Wraps a destination class's ``send``: records the image ids of every call, can act after it."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        cls: type[Any],
        after: Callable[[int, Sequence[OutgoingImage], list[SendResult]], None] | None = None,
    ) -> None:
        self.calls: list[list[int]] = []
        original = cls.send
        spy = self

        def send(self: Any, images: Sequence[OutgoingImage]) -> list[SendResult]:
            spy.calls.append([image.image_id for image in images])
            results: list[SendResult] = original(self, images)
            if after is not None:
                after(len(spy.calls), images, results)
            return results

        monkeypatch.setattr(cls, "send", send)

    def per_image(self) -> Counter[int]:
        return Counter(image_id for call in self.calls for image_id in call)


# -- a, b: delivery and fidelity -------------------------------------------------------------


@orthanc
def test_dicom_delivery_ends_done_and_orthanc_holds_exactly_our_files(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, orthanc_factory: Callable[..., OrthancServer]
) -> None:
    server = orthanc_factory()
    via_dicom(reconfigure, server, KEEP_WORKING=True)
    written = demo_into(sendit_dirs["INPUT_FOLDER"])  # CT, MR and US: 2 patients, 3 studies, 5 series

    ingest_and_run(sendit_dirs["INPUT_FOLDER"])

    assert statuses() == {Status.DONE: len(written)}
    assert server.count_instances() == len(written)
    for series_uid, uids in expected_uids().items():
        assert findscu_sop_uids(server, series_uid) == uids
    ours = working_copies()
    for held in held_by_series(server).values():
        for sop_uid, orthanc_id in held.items():
            stored = server.stored_file(orthanc_id)
            # the data set travels untouched: every element and the pixel data, byte for byte
            assert dataset_part(stored) == dataset_part(ours[sop_uid].read_bytes())
    # the folder destination was delivered too, and both are recorded per image
    assert len(list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))) == len(written)
    assert Delivery.objects.filter(destination="orthanc-dicom").count() == len(written)


@orthanc
def test_rest_delivery_stores_our_file_byte_for_byte(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, orthanc_factory: Callable[..., OrthancServer]
) -> None:
    server = orthanc_factory()
    via_rest(reconfigure, server, KEEP_WORKING=True, OUTPUT_FOLDER=None)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1)

    ingest_and_run(sendit_dirs["INPUT_FOLDER"])

    assert statuses() == {Status.DONE: len(written)}
    assert server.count_instances() == len(written)
    held = held_by_series(server)
    assert {uid: set(ids) for uid, ids in held.items()} == expected_uids()
    ours = working_copies()
    for instances in held.values():
        for sop_uid, orthanc_id in instances.items():
            assert server.stored_file(orthanc_id) == ours[sop_uid].read_bytes()
    assert Delivery.objects.filter(destination="orthanc-rest").count() == len(written)


# -- c: outage -------------------------------------------------------------------------------


@orthanc
@pytest.mark.parametrize("route", ["orthanc-dicom", "orthanc-rest"])
def test_outage_is_retried_and_ends_done_without_duplicates(
    route: str, sendit_dirs: dict[str, Path], reconfigure: Reconfigure, orthanc_factory: Callable[..., OrthancServer]
) -> None:
    server = orthanc_factory()
    (via_dicom if route == "orthanc-dicom" else via_rest)(reconfigure, server)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], images=2)
    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    first, *rest = sorted(report.series_ids)
    run_inline([first], workers=1)  # one series arrives before the outage
    assert Series.objects.get(pk=first).status == Status.DONE

    server.stop(kill=True)
    for series_id in rest:
        outcome = pipeline.process_series(series_id)
        assert not outcome.finished and outcome.retry_in is not None
    for series in Series.objects.filter(pk__in=rest):
        assert series.stage == "retrying"
        assert series.last_error.startswith(f"retrying: {route}: ")
        assert series.last_error.count(route) == 1  # named once, not once per layer
        assert not series.images.filter(status=Status.DONE).exists()
        assert not series.images.filter(status=Status.ERROR).exists()

    server.start()
    run_inline(report.series_ids, workers=1)  # what the queue does after the back-off; no manual step

    assert statuses() == {Status.DONE: len(written)}
    assert server.count_instances() == len(written)
    assert {uid: set(ids) for uid, ids in held_by_series(server).items()} == expected_uids()
    assert all(s.last_error == "" and s.attempts == 0 for s in Series.objects.all())


# -- d: a worker dies in the middle of sending -----------------------------------------------


class WorkerDied(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of the pipeline catches it."""


@orthanc
def test_worker_killed_mid_send_resumes_without_resending_confirmed_images(
    sendit_dirs: dict[str, Path],
    reconfigure: Reconfigure,
    orthanc_factory: Callable[..., OrthancServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = orthanc_factory()
    via_dicom(reconfigure, server, BATCH_SIZE=2)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=6)  # 2 series of 6

    def die_after_second_batch(call: int, images: Sequence[OutgoingImage], results: list[SendResult]) -> None:
        if call == 2:  # Orthanc stored the batch; the worker dies before recording the answers
            raise WorkerDied

    stores = SendSpy(monkeypatch, DicomDestination, die_after_second_batch)
    copies = SendSpy(monkeypatch, FolderDestination)
    monkeypatch.setattr(pipeline, "release_lease", lambda lease: None)  # the dead keep their lease
    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    with pytest.raises(WorkerDied):
        run_inline(report.series_ids, workers=1)
    monkeypatch.undo()

    confirmed = set(Delivery.objects.filter(destination="orthanc-dicom").values_list("image_id", flat=True))
    unconfirmed = set(stores.calls[1])
    assert confirmed == set(stores.calls[0]) and confirmed.isdisjoint(unconfirmed)
    # the dying batch was copied to the folder and recorded there, but not recorded for Orthanc
    assert set(Image.objects.filter(pk__in=unconfirmed).values_list("status", flat=True)) == {Status.DONEPROCESSING}
    assert Delivery.objects.filter(image_id__in=unconfirmed, destination="folder").count() == len(unconfirmed)
    assert Series.objects.exclude(lease_owner="").exists()
    Series.objects.update(lease_expires=timezone.now() - timedelta(seconds=1))  # lease runs out

    stores = SendSpy(monkeypatch, DicomDestination)
    copies_after = SendSpy(monkeypatch, FolderDestination)
    run_inline(report.series_ids, workers=1)  # a fresh worker, nothing done by hand

    assert statuses() == {Status.DONE: len(written)}
    assert server.count_instances() == len(written)
    sent_again = stores.per_image()
    assert confirmed.isdisjoint(sent_again)  # confirmed deliveries are never repeated
    assert unconfirmed <= set(sent_again)  # unconfirmed ones are sent again (idempotent: same UIDs)
    assert all(n == 1 for n in sent_again.values())
    folder_total = copies.per_image() + copies_after.per_image()
    assert set(folder_total.values()) == {1} and len(folder_total) == len(written)


# -- e: verification sends again what the destination lost -----------------------------------


@orthanc
def test_verification_resends_an_instance_missing_at_orthanc(
    sendit_dirs: dict[str, Path],
    reconfigure: Reconfigure,
    orthanc_factory: Callable[..., OrthancServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = orthanc_factory()
    via_dicom(reconfigure, server)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=3)
    lost: list[int] = []

    def lose_one(call: int, images: Sequence[OutgoingImage], results: list[SendResult]) -> None:
        if call == 1:  # Orthanc confirmed, then lost it (deleted by someone, disk trouble…)
            victim = images[-1]
            orthanc_id = server.instances_in_series(victim.series_uid)[victim.sop_instance_uid]
            with server.client() as client:
                assert client.delete(f"/instances/{orthanc_id}").status_code == 200
            lost.append(victim.image_id)

    stores = SendSpy(monkeypatch, DicomDestination, lose_one)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])

    assert statuses() == {Status.DONE: len(written)}
    assert server.count_instances() == len(written)
    assert stores.per_image()[lost[0]] == 2
    assert sum(stores.per_image().values()) == len(written) + 1
    reasons = list(Event.objects.filter(image_id=lost[0]).values_list("reason", flat=True))
    assert any("not found at the destination" in reason for reason in reasons)


# -- f: a permanent refusal ------------------------------------------------------------------


@orthanc
def test_refused_sop_class_is_an_error_with_the_status_and_the_rest_done(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, orthanc_factory: Callable[..., OrthancServer]
) -> None:
    server = orthanc_factory(unknown_sop_class_accepted=False)
    via_dicom(reconfigure, server, OUTPUT_FOLDER=None)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=3)
    odd = written[0]
    ds = pydicom.dcmread(odd)
    ds.SOPClassUID = UNKNOWN_SOP_CLASS
    ds.file_meta.MediaStorageSOPClassUID = UNKNOWN_SOP_CLASS
    ds.save_as(odd, enforce_file_format=True)

    ingest_and_run(sendit_dirs["INPUT_FOLDER"])

    assert statuses() == {Status.DONE: len(written) - 1, Status.ERROR: 1}
    refused = Image.objects.get(status=Status.ERROR)
    assert refused.reason.startswith("orthanc-dicom: 0x0122 Refused: SOP Class Not Supported")
    assert server.count_instances() == len(written) - 1
    assert refused.deid_sop_instance_uid not in server.instances_in_series(refused.series.deid_series_uid)
    assert not Delivery.objects.filter(image=refused).exists()


# -- a race between workers of one study (found by the benchmark) ----------------------------


def test_series_whose_identifiers_another_worker_just_stored_is_not_an_error(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers take two series of one study. A asks for the whole study and stores identifiers
    for both while B is between "none stored yet" and "which series of the study still wait"."""
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)  # one study, two series
    first, second = sorted(ingest_folder(sendit_dirs["INPUT_FOLDER"]).series_ids)
    assert pipeline.process_series(first).finished  # worker A: identifiers stored for both series
    assert SeriesIdentifiers.objects.count() == 2

    manager = SeriesIdentifiers.objects
    real_filter = manager.filter
    stale = [True]

    def filter_with_one_stale_read(*args: Any, **kwargs: Any) -> Any:
        if stale:  # worker B's first look happened before A's commit
            stale.clear()
            return real_filter(*args, **kwargs).none()
        return real_filter(*args, **kwargs)

    monkeypatch.setattr(manager, "filter", filter_with_one_stale_read)
    assert pipeline.process_series(second).finished

    assert statuses() == {Status.DONE: len(written)}
    assert not Series.objects.exclude(last_error="").exists()
