"""Datastore: one entity per series for researchers to query, keyed by its de-identified series UID.

1. The entity holds the allow-listed document the pipeline writes as ``metadata.json``
   (:mod:`sendit.deid.metadata`: modality, body part, cleaned descriptions, codes, age bucket, sex,
   manufacturer, numbers; descriptions and code meanings once more
   through the scrubber, :func:`sendit.deid.scrub.scrub`: a store outside the site), the instances the
   bucket holds of the series (a listing: a series may arrive in two drops), the
   series' dates as delivered (shifted; taken from a de-identified copy, so exactly what the DICOM
   objects say) and links to the objects in the bucket.
2. Written as an upsert (``put``: the same key again replaces it, so a re-run changes nothing) and
   read back; DONE only when what was read equals what was written.
3. Unavailable, 429, 5xx and time-outs are retried with back-off for GOOGLE_TIMEOUT seconds, then the
   series waits its turn; a refusal or an unknown project is an error with words, not retried.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any

from sendit.deid.scrub import scrub
from sendit.destinations.base import DestinationError, OutgoingSeries, SeriesOutcome
from sendit.destinations.google import client as gclient
from sendit.destinations.google.layout import link, series_prefix
from sendit.destinations.google.settings import GoogleSettings
from sendit.destinations.google.storage import GoogleStorageDestination

_FREE_TEXT = ("study_description", "series_description", "protocol_name")

#: Properties kept out of Datastore's indexes (links are long and nobody filters on them).
UNINDEXED = ("dicom", "nifti", "sidecars", "procedure_codes", "anatomic_region_codes")
_DATES = (("study_date", "StudyDate"), ("series_date", "SeriesDate"))


def delivered_dates(series: OutgoingSeries) -> dict[str, str]:
    """StudyDate and SeriesDate of the series' first de-identified image as ISO dates (absent when
    removed or not a date)."""
    from sendit.dicomio import read_dicom

    if not series.images:
        return {}
    try:
        header = read_dicom(min(series.images, key=lambda image: image.image_id).path, headers_only=True)
    except Exception:
        return {}
    dates: dict[str, str] = {}
    for key, keyword in _DATES:
        value = str(header.get(keyword, "") or "").strip()
        with contextlib.suppress(ValueError):
            dates[key] = dt.datetime.strptime(value[:8], "%Y%m%d").date().isoformat()
    return dates


def entity_fields(series: OutgoingSeries, bucket: str, prefix: str, instances: int | None = None) -> dict[str, Any]:
    """Every property of the series' entity (values free of PHI by construction); ``instances`` is
    how many the bucket holds of the series (more than ``series.images`` after a second drop)."""
    document = {key: value for key, value in (series.metadata or {}).items() if key != "schema"}
    for key in _FREE_TEXT:
        if isinstance(document.get(key), str):
            document[key] = scrub(document[key])
    for key in ("procedure_codes", "anatomic_region_codes"):
        for code in document.get(key) or ():
            if isinstance(code, dict) and isinstance(code.get("meaning"), str):
                code["meaning"] = scrub(code["meaning"])
    folder = series_prefix(prefix, series.patient_id, series.study_uid, series.series_uid)
    fields: dict[str, Any] = {
        **document,
        "pseudonym": series.patient_id,
        "study_uid": series.study_uid,
        "series_uid": series.series_uid,
        "images": max(instances or 0, len(series.images)),
        **delivered_dates(series),
        "dicom": link(bucket, folder),
        "nifti": [item for item in series.links if item.endswith(".nii.gz")],
        "sidecars": [item for item in series.links if item.endswith(".json")],
    }
    return fields


def plain(value: Any) -> Any:
    """A value read back from Datastore (embedded entities) as plain Python, to compare."""
    if isinstance(value, dict):  # an Entity is a dict
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


class GoogleDatastoreDestination:
    name = "google-datastore"

    def __init__(self, settings: GoogleSettings) -> None:
        self.settings = settings
        self.where = f"kind {settings.kind}" + (f" in project {settings.project}" if settings.project else "")

    def client(self) -> Any:
        return gclient.shared_client("datastore", self.settings)

    def explain(self, exc: BaseException, doing: str) -> DestinationError:
        return gclient.explain(exc, service="Datastore", setting="GOOGLE_PROJECT", doing=doing)

    def deliver_series(self, series: OutgoingSeries) -> SeriesOutcome:
        from google.cloud import datastore

        fields = entity_fields(series, self.settings.bucket, self.settings.prefix, self._instances_held(series))
        client = self.client()
        key = client.key(self.settings.kind, series.series_uid)
        entity = datastore.Entity(key, exclude_from_indexes=tuple(name for name in UNINDEXED if name in fields))
        entity.update(fields)
        retry = gclient.retry_policy(self.settings)
        try:
            client.put(entity, retry=retry, timeout=self.settings.timeout)
            stored = client.get(key, retry=retry, timeout=self.settings.timeout)
        except Exception as exc:
            raise self.explain(exc, "writing the series entity") from None
        if stored is None or plain(dict(stored)) != plain(fields):
            raise DestinationError("the series entity read back differs from what was written")
        return SeriesOutcome()

    def _instances_held(self, series: OutgoingSeries) -> int:
        """How many instances of the series the bucket holds (a listing of its prefix)."""
        storage = GoogleStorageDestination(self.settings)
        folder = series_prefix(self.settings.prefix, series.patient_id, series.study_uid, series.series_uid)
        try:
            return sum(1 for name in storage.list_objects(folder) if name.endswith(".dcm"))
        except Exception as exc:
            raise storage.explain(exc, "counting the series' instances") from None

    def check(self) -> str | None:
        """Reachable: read one key (roles/datastore.user may; nothing is written)."""
        try:
            client = self.client()
            client.get(
                client.key(self.settings.kind, "sendit-check"),
                retry=gclient.retry_policy(self.settings),
                timeout=self.settings.timeout,
            )
        except DestinationError as exc:
            return str(exc)
        except Exception as exc:
            return str(self.explain(exc, "Datastore not reachable"))
        return None

    def close(self) -> None:
        return None  # the client stays with the process (client.shared_client)
