"""The Google adapters on their own: Cloud Storage against fake-gcs-server and Datastore against
Google's Datastore emulator — stand-ins, not Google's services (tests/google.py). What the bucket
holds is read over fake-gcs-server's plain JSON API, independently of the code under test. The
configuration and sidecar tests at the top need neither.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import google_crc32c
import pydicom
import pytest
from pydicom.uid import generate_uid

from sendit.config import ConfigError, load_config
from sendit.destinations.base import DestinationError, OutgoingSeries
from sendit.destinations.google import GoogleSettings
from sendit.destinations.google.datastore import GoogleDatastoreDestination
from sendit.destinations.google.nifti import GoogleNiftiDestination, filter_sidecar
from sendit.destinations.google.storage import GoogleStorageDestination
from tests.google import PROJECT, DatastoreEmulator, GcsServer
from tests.orthanc import outgoing, write_ct

SECRET = "google-destination-secret-key-0123456789-abcdef"


# -- configuration ----------------------------------------------------------------------------


def write_toml(folder: Path, **values: object) -> Path:
    lines = [f'SECRET_KEY = "{SECRET}"']
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path = folder / "sendit.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_send_to_google_with_a_bucket_is_accepted_at_start(tmp_path: Path) -> None:
    cfg = load_config(write_toml(tmp_path, SEND_TO_GOOGLE=True, GOOGLE_CLOUD_STORAGE="research-bucket"), env={})
    assert cfg.SEND_TO_GOOGLE and cfg.GOOGLE_CLOUD_STORAGE == "research-bucket"


def test_send_to_google_without_a_bucket_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_toml(tmp_path, SEND_TO_GOOGLE=True), env={})
    assert [p for p in info.value.problems if p.startswith("GOOGLE_CLOUD_STORAGE: ")]


def test_an_unreadable_key_file_is_named_and_its_content_never_shown(tmp_path: Path) -> None:
    key = tmp_path / "key.json"
    key.write_text("private_key: -----BEGIN hunter2", encoding="utf-8")  # not JSON
    path = write_toml(
        tmp_path, SEND_TO_GOOGLE=True, GOOGLE_CLOUD_STORAGE="b-1", GOOGLE_APPLICATION_CREDENTIALS="key.json"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    lines = [p for p in info.value.problems if p.startswith("GOOGLE_APPLICATION_CREDENTIALS: ")]
    assert lines and "hunter2" not in " ".join(info.value.problems)
    shown = load_config(write_toml(tmp_path, GOOGLE_APPLICATION_CREDENTIALS="key.json"), env={}).masked()
    assert shown["GOOGLE_APPLICATION_CREDENTIALS"] == "****** (set)"


def test_the_sidecar_keeps_only_allow_listed_physics() -> None:
    sidecar = {
        "Modality": "MR",
        "EchoTime": 0.03,
        "ImageType": ["ORIGINAL", "PRIMARY"],
        "SeriesDescription": "t1 Smith",
        "InstitutionName": "CANARY1XYZ",
        "AcquisitionTime": "10:11:12.000000",
        "Manufacturer": "CANARY2XYZ^<script>",  # allow-listed key, value not a short code
        "StationName": "MR01",
        "PatientName": "Doe^John",
    }
    assert filter_sidecar(sidecar) == {"EchoTime": 0.03, "ImageType": ["ORIGINAL", "PRIMARY"], "Modality": "MR"}


# -- Cloud Storage ------------------------------------------------------------------------------


def crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


@pytest.fixture
def bucket(gcs_server: GcsServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    name = f"t-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(name)
    return name


def settings(bucket: str, **more: object) -> GoogleSettings:
    values: dict[str, object] = {"bucket": bucket, "prefix": "coll", "project": PROJECT, "timeout": 3.0}
    return GoogleSettings(**(values | more))  # type: ignore[arg-type]


def series_files(folder: Path, count: int) -> list[Path]:
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    return [write_ct(folder / f"{i}.dcm", series_uid=series_uid) for i in range(count)]


def test_instances_are_created_once_under_their_uids_with_equal_checksums(
    tmp_path: Path, bucket: str, gcs_server: GcsServer
) -> None:
    images = [outgoing(path, i + 1) for i, path in enumerate(series_files(tmp_path / "s", 3))]
    destination = GoogleStorageDestination(settings(bucket))

    results = destination.send(images)

    assert [r.delivered for r in results] == [True, True, True]
    held = gcs_server.objects(bucket)
    for image in images:
        name = f"coll/{image.patient_id}/{image.study_uid}/{image.series_uid}/{image.sop_instance_uid}.dcm"
        assert held[name]["crc32c"] == crc32c(image.path.read_bytes())
    assert destination.missing(images[0].series_uid, {i.sop_instance_uid for i in images}) == set()
    generations = {name: item["generation"] for name, item in held.items()}

    again = GoogleStorageDestination(settings(bucket)).send(images)  # a re-send: a 412 with equal content

    assert [r.delivered for r in again] == [True, True, True]
    assert {name: item["generation"] for name, item in gcs_server.objects(bucket).items()} == generations


def test_an_object_with_other_content_is_a_permanent_error_and_stays(
    tmp_path: Path, bucket: str, gcs_server: GcsServer
) -> None:
    (path,) = series_files(tmp_path / "s", 1)
    image = outgoing(path, 7)
    GoogleStorageDestination(settings(bucket)).send([image])
    before = gcs_server.objects(bucket)
    ds = pydicom.dcmread(path)
    ds.InstanceNumber = 2  # same UIDs, other content
    ds.save_as(path)

    (result,) = GoogleStorageDestination(settings(bucket)).send([image])

    assert not result.delivered and result.permanent
    assert "image 7" in result.message and "different content" in result.message
    assert gcs_server.objects(bucket) == before


def test_verification_finds_a_removed_object_even_in_a_new_process(
    tmp_path: Path, bucket: str, gcs_server: GcsServer
) -> None:
    images = [outgoing(path, i + 1) for i, path in enumerate(series_files(tmp_path / "s", 2))]
    GoogleStorageDestination(settings(bucket)).send(images)
    gone = images[1]
    name = f"coll/{gone.patient_id}/{gone.study_uid}/{gone.series_uid}/{gone.sop_instance_uid}.dcm"
    import httpx

    httpx.delete(f"{gcs_server.url}/storage/v1/b/{bucket}/o/{name.replace('/', '%2F')}", timeout=10).raise_for_status()

    fresh = GoogleStorageDestination(settings(bucket))  # knows nothing of what was sent
    assert fresh.missing(gone.series_uid, {i.sop_instance_uid for i in images}) == {gone.sop_instance_uid}


def test_a_missing_bucket_is_a_configuration_error_naming_the_setting(tmp_path: Path, bucket: str) -> None:
    images = [outgoing(path, 1) for path in series_files(tmp_path / "s", 1)]
    destination = GoogleStorageDestination(settings(f"absent-{uuid.uuid4().hex[:8]}"))

    with pytest.raises(DestinationError) as info:
        destination.send(images)

    assert not info.value.retryable and "GOOGLE_CLOUD_STORAGE" in str(info.value)
    problem = destination.check()
    assert problem is not None and "GOOGLE_CLOUD_STORAGE" in problem
    assert GoogleStorageDestination(settings(bucket)).check() is None


def test_a_stopped_server_is_a_retryable_failure_of_the_batch(
    tmp_path: Path, bucket: str, gcs_server: GcsServer
) -> None:
    images = [outgoing(path, 1) for path in series_files(tmp_path / "s", 1)]
    gcs_server.stop()
    try:
        with pytest.raises(DestinationError) as info:
            GoogleStorageDestination(settings(bucket, timeout=1.0)).send(images)
        assert info.value.retryable
    finally:
        gcs_server.start()


# -- NIfTI and Datastore ----------------------------------------------------------------------------


def test_an_image_series_becomes_one_nifti_and_a_lone_sr_gives_a_note(
    tmp_path: Path, bucket: str, gcs_server: GcsServer
) -> None:
    paths = series_files(tmp_path / "ct", 4)
    for index, path in enumerate(paths):  # a volume: one slice after another
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, index], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.InstanceNumber = [1, 1], 1, index + 1
        ds.save_as(path)
    images = tuple(outgoing(path, i + 1) for i, path in enumerate(paths))
    series = OutgoingSeries(images[0].patient_id, images[0].study_uid, images[0].series_uid, images)

    outcome = GoogleNiftiDestination(settings(bucket)).deliver_series(series)

    folder = f"coll/{series.patient_id}/{series.study_uid}/{series.series_uid}/"
    assert outcome.links == (
        f"gs://{bucket}/{folder}{series.series_uid}.nii.gz",
        f"gs://{bucket}/{folder}{series.series_uid}.json",
    )
    assert set(gcs_server.objects(bucket, folder)) == {
        f"{folder}{series.series_uid}.nii.gz",
        f"{folder}{series.series_uid}.json",
    }
    assert not list((tmp_path / "ct").glob(".nifti-*"))  # its temp folder is gone

    sr = tmp_path / "sr" / "sr.dcm"
    sr.parent.mkdir()
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.22", generate_uid()  # Enhanced SR
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = generate_uid(), generate_uid(), "SR", "P"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(sr, enforce_file_format=True)
    report = outgoing(sr, 9)
    lone = OutgoingSeries(report.patient_id, report.study_uid, report.series_uid, (report,))

    outcome = GoogleNiftiDestination(settings(bucket)).deliver_series(lone)

    assert outcome.links == () and outcome.notes and "DICOM only" in outcome.notes[0]


def test_the_series_entity_is_upserted_and_read_back(
    tmp_path: Path, bucket: str, datastore_emulator: DatastoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.cloud import datastore

    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", datastore_emulator.host)
    images = tuple(outgoing(path, i + 1) for i, path in enumerate(series_files(tmp_path / "s", 2)))
    metadata = {
        "schema": "sendit.series-metadata/1",
        "modality": "CT",
        "age_bucket": "40-44",
        "sex": "F",
        "study_description": "CT HEAD CANARY77XYZ",
        "procedure_codes": [{"scheme": "LN", "code": "24727-0", "meaning": "CT HEAD"}],
    }
    series = OutgoingSeries(
        images[0].patient_id, images[0].study_uid, images[0].series_uid, images, metadata, links=("gs://b/x.nii.gz",)
    )
    kind = f"K{uuid.uuid4().hex[:8]}"
    GoogleStorageDestination(settings(bucket)).send(list(images))  # the instances it counts
    destination = GoogleDatastoreDestination(settings(bucket, kind=kind))

    destination.deliver_series(series)
    destination.deliver_series(series)  # again: the same entity, not a second one

    stored = list(datastore.Client(project=PROJECT).query(kind=kind).fetch(limit=10))
    assert len(stored) == 1 and stored[0].key.name == series.series_uid
    entity = dict(stored[0])
    assert entity["modality"] == "CT" and entity["images"] == 2 and entity["age_bucket"] == "40-44"
    assert entity["study_description"] == "CT HEAD [ID]"
    assert entity["study_date"] == "2000-01-01"  # the delivered (already shifted) copy's date
    assert entity["nifti"] == ["gs://b/x.nii.gz"] and entity["dicom"].endswith(f"/{series.series_uid}/")
    assert "schema" not in entity
    assert destination.check() is None


def test_a_stopped_datastore_is_retryable(
    tmp_path: Path, bucket: str, datastore_emulator: DatastoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", datastore_emulator.host)
    images = tuple(outgoing(path, 1) for path in series_files(tmp_path / "s", 1))
    series = OutgoingSeries(images[0].patient_id, images[0].study_uid, images[0].series_uid, images, {})
    datastore_emulator.stop()
    try:
        destination = GoogleDatastoreDestination(settings(bucket, timeout=1.0))
        with pytest.raises(DestinationError) as info:
            destination.deliver_series(series)
        assert info.value.retryable
        assert destination.check() is not None
    finally:
        datastore_emulator.start()


def test_sendit_check_shows_both_google_destinations(
    tmp_path: Path, google_env: tuple[GcsServer, DatastoreEmulator]
) -> None:
    """The operator's view: one line per Google destination, and the missing bucket named."""
    import os
    import subprocess
    import sys

    gcs, _ = google_env
    gcs.create_bucket("check-bucket")

    def check(bucket: str) -> subprocess.CompletedProcess[str]:
        folder = tmp_path / bucket
        folder.mkdir()
        config = write_toml(
            folder,
            DATA_DIR="data",
            OUTPUT_FOLDER="off",
            SEND_TO_GOOGLE=True,
            GOOGLE_CLOUD_STORAGE=bucket,
            GOOGLE_PROJECT=PROJECT,
            GOOGLE_NIFTI=True,
            GOOGLE_TIMEOUT=3,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDIT_", "DJANGO_")) and k != "DATABASE_URL"}
        env["SENDIT_CONFIG"] = str(config)
        command = [sys.executable, "-m", "sendit", "check"]
        return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120)

    ok = check("check-bucket")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "[ok] destination google-storage: gs://check-bucket/" in ok.stdout
    assert "[ok] destination google-datastore: kind SenditSeries in project sendit-test" in ok.stdout
    assert "[ok] destination google-nifti" in ok.stdout

    missing = check("no-such-bucket")
    assert missing.returncode == 1
    line = next(line for line in missing.stdout.splitlines() if "destination google-storage" in line)
    assert line.strip().startswith("[FAIL]") and "GOOGLE_CLOUD_STORAGE" in line
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize(
    ("error", "retryable", "named"),
    [
        ("Unauthorized", False, "GOOGLE_APPLICATION_CREDENTIALS"),
        ("Forbidden", False, "GOOGLE_APPLICATION_CREDENTIALS"),
        ("PermissionDenied", False, "GOOGLE_APPLICATION_CREDENTIALS"),
        ("NotFound", False, "GOOGLE_CLOUD_STORAGE"),
        ("TooManyRequests", True, "HTTP 429"),
        ("ServiceUnavailable", True, "HTTP 503"),
        ("InternalServerError", True, "HTTP 500"),
        ("BadRequest", False, "HTTP 400"),
    ],
)
def test_google_answers_in_words_and_classes(error: str, retryable: bool, named: str) -> None:
    """What each answer of Google's becomes (the stand-ins cannot refuse credentials or throttle)."""
    from google.api_core import exceptions as gexc

    from sendit.destinations.google.client import explain

    secret = "ya29.hunter2-token"  # an error's own text may quote the request: never repeated
    found = explain(
        getattr(gexc, error)(f"denied for {secret}"),
        service="Cloud Storage",
        setting="GOOGLE_CLOUD_STORAGE",
        doing="uploading image 3",
    )
    assert found.retryable is retryable
    assert named in str(found) and str(found).startswith("uploading image 3: ")
    assert secret not in str(found)


def test_a_timeout_after_the_retries_is_retryable() -> None:
    import requests
    from google.api_core import exceptions as gexc

    from sendit.destinations.google.client import explain

    exhausted = gexc.RetryError("Timeout of 3.0s exceeded", cause=requests.ConnectionError("refused"))
    found = explain(exhausted, service="Datastore", setting="GOOGLE_PROJECT", doing="writing the series entity")
    assert found.retryable and "did not answer in time" in str(found)


def test_a_large_file_goes_up_resumably_and_arrives_whole(tmp_path: Path, bucket: str, gcs_server: GcsServer) -> None:
    from sendit.destinations.google import storage

    (path,) = series_files(tmp_path / "s", 1)
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 2100  # 8.8 MB of pixels: above the multipart limit
    ds.PixelData = bytes(range(256)) * (2100 * 2100 * 2 // 256) + bytes(2100 * 2100 * 2 % 256)
    ds.save_as(path)
    assert path.stat().st_size > storage.RESUMABLE_ABOVE
    image = outgoing(path, 1)

    (result,) = GoogleStorageDestination(settings(bucket)).send([image])

    assert result.delivered
    name = f"coll/{image.patient_id}/{image.study_uid}/{image.series_uid}/{image.sop_instance_uid}.dcm"
    assert gcs_server.download(bucket, name) == path.read_bytes()


def test_an_upload_storage_holds_differently_is_that_images_retryable_failure(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Damaged on the way: Google refuses it (HTTP 400, the CRC32C sent with it differs); the stand-in
    stores it and reports its own CRC32C. Either way that image is tried again, its siblings go."""
    from sendit.destinations.google import storage

    images = [outgoing(path, i + 1) for i, path in enumerate(series_files(tmp_path / "s", 3))]
    real = storage.crc32c_of
    monkeypatch.setattr(storage, "crc32c_of", lambda path: "AAAAAA==" if path == images[1].path else real(path))

    results = GoogleStorageDestination(settings(bucket)).send(images)

    assert [r.delivered for r in results] == [True, False, True]
    assert not results[1].permanent and "image 2: Storage holds other bytes" in results[1].message
    monkeypatch.setattr(storage, "crc32c_of", real)
    assert GoogleStorageDestination(settings(bucket)).send([images[1]])[0].delivered  # the next attempt


def test_a_refused_key_file_is_a_configuration_error_and_its_key_never_shown(
    tmp_path: Path, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A service-account key Google refuses (revoked, wrong project): its token endpoint, a loopback
    stand-in here, answers every grant with 400 invalid_grant as Google's does."""
    import logging
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}'
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    keyfile = tmp_path / "key.json"
    keyfile.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "sendit@sendit-test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"http://127.0.0.1:{server.server_address[1]}/token",
            }
        )
    )
    images = [outgoing(path, 1) for path in series_files(tmp_path / "s", 2)]
    caplog.set_level(logging.DEBUG)
    try:
        destination = GoogleStorageDestination(settings(bucket, credentials_file=str(keyfile)))
        with pytest.raises(DestinationError) as info:
            destination.send(images)
        problem = destination.check()
    finally:
        server.shutdown()
    assert not info.value.retryable and "GOOGLE_APPLICATION_CREDENTIALS" in str(info.value)
    assert problem is not None and "GOOGLE_APPLICATION_CREDENTIALS" in problem
    body = pem.splitlines()[5]
    for text in (str(info.value), problem, caplog.text):
        assert "PRIVATE KEY" not in text and body not in text
