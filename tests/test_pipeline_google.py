"""The whole pipeline into Google Cloud stand-ins: fake-gcs-server for Storage and Google's Datastore
emulator (tests/google.py) — neither is Google's service. What the bucket and Datastore hold is read
independently of the code under test: fake-gcs-server's plain JSON API, and the Datastore client.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

from sendit.relay import files, pipeline
from sendit.relay.ingest import ingest_folder
from sendit.relay.inline import run_inline
from sendit.relay.models import Delivery, Event, Image, Series, Status
from tests.google import PROJECT, DatastoreEmulator, GcsServer
from tests.helpers import demo_into, ingest_and_run, statuses

pytestmark = pytest.mark.django_db(transaction=True)

Reconfigure = Callable[..., None]


def to_google(reconfigure: Reconfigure, gcs: GcsServer, *, bucket: str | None = None, **more: Any) -> tuple[str, str]:
    """SEND_TO_GOOGLE into a fresh bucket and Datastore kind; returns (bucket, kind)."""
    name = bucket or f"sendit-{uuid.uuid4().hex[:12]}"
    if bucket is None:
        gcs.create_bucket(name)
    kind = f"Series{uuid.uuid4().hex[:8]}"
    values: dict[str, Any] = {
        "SEND_TO_GOOGLE": True,
        "GOOGLE_CLOUD_STORAGE": name,
        "GOOGLE_STORAGE_PREFIX": "research",
        "GOOGLE_PROJECT": PROJECT,
        "GOOGLE_DATASTORE_KIND": kind,
        "GOOGLE_TIMEOUT": 3,
        "RETRY_BASE_SECONDS": 0,
        "KEEP_WORKING": True,
        "OUTPUT_FOLDER": None,
    }
    reconfigure(**(values | more))
    return name, kind


def crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def entities(kind: str) -> dict[str, dict[str, Any]]:
    from google.cloud import datastore

    client = datastore.Client(project=PROJECT)
    return {entity.key.name: dict(entity) for entity in client.query(kind=kind).fetch(limit=1000)}


def working_copies() -> dict[str, Path]:
    return {
        image.deid_sop_instance_uid: files.working_copy(image.series_id, image.pk)
        for image in Image.objects.exclude(deid_sop_instance_uid="")
    }


def dicom_objects(gcs: GcsServer, bucket: str) -> dict[str, dict[str, str]]:
    return {name: item for name, item in gcs.objects(bucket).items() if name.endswith(".dcm")}


def test_demo_set_ends_done_with_every_instance_a_nifti_per_series_and_an_entity_per_series(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, google_env: tuple[GcsServer, DatastoreEmulator]
) -> None:
    gcs, _ = google_env
    bucket, kind = to_google(reconfigure, gcs, GOOGLE_NIFTI=True)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], images=3)

    ingest_and_run(sendit_dirs["INPUT_FOLDER"])

    counts = statuses()
    done = counts.get(Status.DONE, 0)
    assert done and set(counts) <= {Status.DONE, Status.QUARANTINED}, counts  # US without a layout: quarantined
    assert done + counts.get(Status.QUARANTINED, 0) == len(written)
    held = dicom_objects(gcs, bucket)
    ours = working_copies()
    finished = Series.objects.filter(images__status=Status.DONE).distinct()
    assert len(held) == done
    for series in finished:
        study_uid = series.study.deid_study_uid
        pseudonym = series.identifiers.response["patient_id"]
        for image in series.images.filter(status=Status.DONE):
            name = next(n for n in held if n.endswith(f"/{series.deid_series_uid}/{image.deid_sop_instance_uid}.dcm"))
            assert name.startswith("research/") and f"/{study_uid}/" in name
            assert name.split("/")[1] == pseudonym
            assert held[name]["crc32c"] == crc32c(ours[image.deid_sop_instance_uid].read_bytes())
    # one NIfTI (and its sidecar) per image series, beside its instances, a valid gzip of a NIfTI-1
    everything = gcs.objects(bucket)
    for series in finished:
        folder = next(n for n in held if f"/{series.deid_series_uid}/" in n).rsplit("/", 1)[0]
        volumes = [n for n in everything if n.startswith(folder + "/") and n.endswith(".nii.gz")]
        assert volumes == [f"{folder}/{series.deid_series_uid}.nii.gz"], volumes
        payload = gzip.decompress(gcs.download(bucket, volumes[0]))
        assert int.from_bytes(payload[:4], "little") == 348  # sizeof_hdr of NIfTI-1
        sidecar = json.loads(gcs.download(bucket, f"{folder}/{series.deid_series_uid}.json"))
        assert sidecar["Modality"] == series.header["modality"]
        assert "SeriesDescription" not in sidecar and "AcquisitionTime" not in sidecar  # not allow-listed
    # one entity per finished series, keyed by its de-identified UID, with its fields and links
    stored = entities(kind)
    assert set(stored) == {series.deid_series_uid for series in finished}
    for series in finished:
        entity = stored[series.deid_series_uid]
        assert entity["images"] == series.images.filter(status=Status.DONE).count()
        assert entity["modality"] == series.header["modality"]
        assert entity["pseudonym"] == series.identifiers.response["patient_id"]
        assert entity["dicom"].startswith(f"gs://{bucket}/research/") and entity["dicom"].endswith(
            f"/{series.deid_series_uid}/"
        )
        folder = folder_of(held, series.deid_series_uid)
        assert entity["nifti"] == [f"gs://{bucket}/{folder}/{series.deid_series_uid}.nii.gz"]
        assert "study_date" in entity and len(entity["study_date"]) == 10
    for name in ("google-storage", "google-nifti", "google-datastore"):  # the dashboard's last success
        assert Delivery.objects.filter(destination=name).count() == done, name


def folder_of(held: dict[str, Any], series_uid: str) -> str:
    return next(n for n in held if f"/{series_uid}/" in n).rsplit("/", 1)[0]


@pytest.mark.parametrize("stand_in", ["storage", "datastore"])
def test_a_stopped_stand_in_is_retried_and_ends_done_without_duplicates(
    stand_in: str,
    sendit_dirs: dict[str, Path],
    reconfigure: Reconfigure,
    google_env: tuple[GcsServer, DatastoreEmulator],
) -> None:
    gcs, datastore_emulator = google_env
    server = gcs if stand_in == "storage" else datastore_emulator
    route = "google-storage" if stand_in == "storage" else "google-datastore"
    bucket, kind = to_google(reconfigure, gcs)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    first, *rest = sorted(report.series_ids)
    run_inline([first], workers=1)  # one series arrives before the outage
    assert Series.objects.get(pk=first).status == Status.DONE
    before = {name: item["generation"] for name, item in dicom_objects(gcs, bucket).items()}
    assert before

    server.stop()
    try:
        for series_id in rest:
            outcome = pipeline.process_series(series_id)
            assert not outcome.finished and outcome.retry_in is not None
        for series in Series.objects.filter(pk__in=rest):
            assert series.stage == "retrying", series.last_error
            assert series.last_error.startswith(f"retrying: {route}: "), series.last_error
            assert not series.images.filter(status__in=(Status.DONE, Status.ERROR)).exists()
    finally:
        server.start()
    run_inline(report.series_ids, workers=1)  # what the queue does after the back-off

    counts = statuses()
    assert set(counts) <= {Status.DONE, Status.QUARANTINED} and counts.get(Status.DONE), counts
    assert sum(counts.values()) == len(written)
    held = dicom_objects(gcs, bucket)
    assert len(held) == counts[Status.DONE]  # each instance once
    assert {name: held[name]["generation"] for name in before} == before  # none written twice
    finished = Series.objects.filter(images__status=Status.DONE).distinct()
    if stand_in == "datastore":  # the emulator keeps its data in memory: its restart lost the first entity
        finished = finished.exclude(pk=first)
    assert set(entities(kind)) == {series.deid_series_uid for series in finished}


def test_a_missing_bucket_is_an_error_naming_the_setting(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, google_env: tuple[GcsServer, DatastoreEmulator]
) -> None:
    gcs, _ = google_env
    to_google(reconfigure, gcs, bucket=f"absent-{uuid.uuid4().hex[:8]}")
    demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=1)

    ingest_and_run(sendit_dirs["INPUT_FOLDER"])

    assert not Image.objects.filter(status=Status.DONE).exists()
    errors = Image.objects.filter(status=Status.ERROR)
    assert errors.exists()
    for series in Series.objects.filter(images__status=Status.ERROR).distinct():
        assert series.last_error.startswith("google-storage: ")
        assert "GOOGLE_CLOUD_STORAGE" in series.last_error
        assert series.attempts == 0  # not retried: waiting would not make the bucket appear


def found(secret: str, text: str) -> bool:
    """A canary in a text; a number only as a whole number (a date canary such as ``66040622`` may
    be a run of digits inside a shifted date-time, ``64660406223157``, which is not that value)."""
    if secret.isdigit():
        return re.search(rf"(?<!\d){secret}(?!\d)", text) is not None
    return secret in text


def test_canary_corpus_leaves_no_canary_in_any_name_object_sidecar_or_entity(
    tmp_path: Path,
    sendit_dirs: dict[str, Path],
    reconfigure: Reconfigure,
    google_env: tuple[GcsServer, DatastoreEmulator],
) -> None:
    from tests.test_logs_phi import build_corpus

    gcs, _ = google_env
    bucket, kind = to_google(reconfigure, gcs, GOOGLE_NIFTI=True)
    _, secrets = build_corpus(sendit_dirs["INPUT_FOLDER"])
    assert any(secret.startswith("CANARY") for secret in secrets)

    ingest_and_run(sendit_dirs["INPUT_FOLDER"])

    assert Image.objects.filter(status=Status.DONE).exists()
    stored = gcs.objects(bucket)
    assert any(name.endswith(".nii.gz") for name in stored) and any(name.endswith(".json") for name in stored)
    texts: dict[str, str] = {"object names": "\n".join(stored)}
    for name in stored:
        data = gcs.download(bucket, name)
        texts[name] = (gzip.decompress(data) if name.endswith(".gz") else data).decode("latin-1")
    texts["entities"] = json.dumps(entities(kind), default=str)
    texts["series events"] = "\n".join(event.reason for event in Event.objects.all())
    leaked = sorted({(secret, where) for secret in secrets for where, text in texts.items() if found(secret, text)})
    assert leaked == [], "\n".join(f"{secret} in {where}" for secret, where in leaked)


def test_the_dashboard_shows_both_google_destinations(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, google_env: tuple[GcsServer, DatastoreEmulator]
) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    from sendit.web import overview

    gcs, _ = google_env
    browser = Client()
    browser.force_login(User.objects.create_user("alice", password="correct horse battery staple"))
    to_google(reconfigure, gcs)
    overview._destinations_cache = None
    rows = {row["name"]: row for row in browser.get("/api/dashboard").json()["destinations"]}
    assert rows["google-storage"]["reachable"] and rows["google-datastore"]["reachable"]

    to_google(reconfigure, gcs, bucket="no-such-bucket")
    overview._destinations_cache = None
    rows = {row["name"]: row for row in browser.get("/api/dashboard").json()["destinations"]}
    overview._destinations_cache = None
    assert not rows["google-storage"]["reachable"] and "GOOGLE_CLOUD_STORAGE" in rows["google-storage"]["problem"]
    assert rows["google-datastore"]["reachable"]


def test_a_series_arriving_in_two_drops_gets_one_nifti_and_entity_of_all_its_images(
    tmp_path: Path,
    sendit_dirs: dict[str, Path],
    reconfigure: Reconfigure,
    google_env: tuple[GcsServer, DatastoreEmulator],
) -> None:
    """The second drop's working copies are all there is locally: the earlier instances come back
    from the bucket, so the volume and the count hold the whole series."""
    import pydicom

    gcs, _ = google_env
    bucket, kind = to_google(reconfigure, gcs, GOOGLE_NIFTI=True, KEEP_WORKING=False)
    staging = tmp_path / "staging"
    written = demo_into(staging, patients=1, images=4)
    ct = sorted(path for path in written if pydicom.dcmread(path, stop_before_pixels=True).Modality == "CT")
    first_series = pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID
    ours = [p for p in ct if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == first_series]
    assert len(ours) == 4
    for drop, part in enumerate((ours[:2], ours[2:])):
        folder = sendit_dirs["INPUT_FOLDER"] / f"drop{drop}"
        folder.mkdir()
        for path in part:
            path.rename(folder / path.name)
        ingest_and_run(folder)

    series = Series.objects.get()
    assert series.images.filter(status=Status.DONE).count() == 4
    held = gcs.objects(bucket)
    folder_name = folder_of(held, series.deid_series_uid)
    volume = gzip.decompress(gcs.download(bucket, f"{folder_name}/{series.deid_series_uid}.nii.gz"))
    dims = [int.from_bytes(volume[40 + 2 * i : 42 + 2 * i], "little") for i in range(4)]  # NIfTI-1 dim[0..3]
    assert dims[3] == 4, dims  # four slices: both drops
    assert entities(kind)[series.deid_series_uid]["images"] == 4
    assert Event.objects.filter(reason__contains="replaced: the series changed").exists()
