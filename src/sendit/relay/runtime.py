"""Builds the core's objects (engine, identifier provider, destinations) from the configuration."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, lru_cache
from typing import TYPE_CHECKING

from django.conf import settings

from sendit.config import Config
from sendit.destinations.base import Destination, SeriesDestination
from sendit.destinations.folder import FolderDestination
from sendit.identifiers.base import IdentifierProvider
from sendit.identifiers.local import LocalProvider
from sendit.storage import Store, open_store

if TYPE_CHECKING:  # the engine loads pydicom's tables and the recipes: only when a task needs it
    from sendit.deid import Deidentifier
    from sendit.deid.ocr import OcrSettings
    from sendit.destinations.commitment import CommitmentReport


def config() -> Config:
    """The validated configuration Django was set up with (``server/settings.py``)."""
    cfg: Config = settings.SENDIT
    return cfg


def deidentifier() -> Deidentifier:
    """The engine for the current configuration and the site's blanking rules (one query), built once
    per distinct set of DEID_* and OCR_* values and rules: a rule a reviewer adds applies from the next series."""
    from sendit.deid import ocr_settings
    from sendit.relay.blanking import site_filter_text

    cfg = config()
    return _deidentifier(
        cfg.SECRET_KEY, cfg.DEID_OPTIONS, cfg.DEID_RECIPE, cfg.DEID_FILTER, site_filter_text(), ocr_settings(cfg.values)
    )


@lru_cache(maxsize=8)
def _deidentifier(
    secret_key: str, options: str, recipe: str, pixel_filter: str, site: str, ocr: OcrSettings
) -> Deidentifier:
    from sendit.deid import build_deidentifier

    return build_deidentifier(secret_key, options, recipe, pixel_filter, site_filter=site, ocr=ocr)


def store() -> Store | None:
    """The object store originals are uploaded to (``STORAGE_URL``), or None: read in the input folder.
    One per process and settings; a forked worker inherits it and makes its own connections."""
    cfg = config()
    if not cfg.STORAGE_URL:
        return None
    return _store(
        cfg.STORAGE_URL,
        cfg.S3_ENDPOINT_URL,
        cfg.S3_REGION,
        cfg.S3_ACCESS_KEY_ID,
        cfg.S3_SECRET_ACCESS_KEY,
    )


@cache
def _store(url: str, endpoint: str, region: str, key_id: str, secret: str) -> Store | None:
    return open_store(url, endpoint_url=endpoint, region=region, access_key_id=key_id, secret_access_key=secret)


@cache
def identifier_provider() -> IdentifierProvider:
    cfg = config()
    if cfg.IDENTIFIER_PROVIDER:
        from sendit.identifiers.loader import load_provider

        return load_provider(cfg.IDENTIFIER_PROVIDER, cfg.values)
    if cfg.DEIDENTIFY_RESTFUL:
        from sendit.identifiers.loader import load_provider

        return load_provider("sendit.identifiers.dasher.DasherProvider", cfg.values)
    return LocalProvider(cfg.SECRET_KEY, cfg.DATE_SHIFT_MIN_DAYS, cfg.DATE_SHIFT_MAX_DAYS)


def _commitment_waiter() -> Callable[[str, float], CommitmentReport | None]:
    """Storage commitment reports reach the listener; the worker waits for its own in the database."""
    from sendit.relay.commitments import wait_for

    return wait_for


def destinations() -> list[Destination]:
    """Fresh adapters for one task; the caller closes them (they may hold associations)."""
    cfg = config()
    chosen: list[Destination] = []
    if cfg.OUTPUT_FOLDER is not None:
        chosen.append(FolderDestination(cfg.OUTPUT_FOLDER))
    if cfg.SEND_TO_ORTHANC:
        from sendit.destinations.dicom import DicomDestination

        chosen.append(
            DicomDestination(
                host=cfg.ORTHANC_IPADDRESS,
                port=cfg.ORTHANC_PORT,
                called_aet=cfg.ORTHANC_AET,
                calling_aet=cfg.SENDIT_AET,
                max_pdu=cfg.ORTHANC_MAX_PDU,
                connect_timeout=min(10.0, cfg.ORTHANC_TIMEOUT),
                acse_timeout=cfg.ORTHANC_TIMEOUT,
                dimse_timeout=cfg.ORTHANC_TIMEOUT,
                network_timeout=cfg.ORTHANC_TIMEOUT,
                name="orthanc-dicom",
                commitment=_commitment_waiter() if cfg.STORAGE_COMMITMENT else None,
                commitment_seconds=cfg.STORAGE_COMMITMENT_SECONDS,
            )
        )
    if cfg.SEND_TO_GOOGLE:
        from sendit.destinations.google import GoogleSettings
        from sendit.destinations.google.storage import GoogleStorageDestination

        chosen.append(GoogleStorageDestination(GoogleSettings.from_config(cfg.values)))
    if cfg.ORTHANC_URL:
        from sendit.destinations.orthanc_rest import OrthancRestDestination

        chosen.append(
            OrthancRestDestination(
                cfg.ORTHANC_URL,
                username=cfg.ORTHANC_USERNAME or None,
                password=cfg.ORTHANC_PASSWORD or None,
                timeout=cfg.ORTHANC_TIMEOUT,
                connect_timeout=min(5.0, cfg.ORTHANC_TIMEOUT),
                name="orthanc-rest",
            )
        )
    if cfg.DICOMWEB_URL:
        from sendit.destinations.dicomweb import DicomWebDestination

        chosen.append(
            DicomWebDestination(
                cfg.DICOMWEB_URL,
                username=cfg.DICOMWEB_USERNAME or None,
                password=cfg.DICOMWEB_PASSWORD or None,
                token=cfg.DICOMWEB_TOKEN or None,
                google_credentials=cfg.DICOMWEB_GOOGLE_CREDENTIALS or None,
                batch=cfg.DICOMWEB_BATCH,
                timeout=cfg.DICOMWEB_TIMEOUT,
                connect_timeout=min(5.0, cfg.DICOMWEB_TIMEOUT),
                name="dicomweb",
            )
        )
    return chosen


def series_destinations() -> list[SeriesDestination]:
    """Fresh series-level adapters for one task (NIfTI, metadata); the caller closes them."""
    cfg = config()
    chosen: list[SeriesDestination] = []
    if cfg.SEND_TO_GOOGLE:
        from sendit.destinations.google import GoogleSettings
        from sendit.destinations.google.datastore import GoogleDatastoreDestination
        from sendit.destinations.google.nifti import GoogleNiftiDestination

        google = GoogleSettings.from_config(cfg.values)
        if google.nifti:
            chosen.append(GoogleNiftiDestination(google))
        chosen.append(GoogleDatastoreDestination(google))  # last: it links what the others made
    return chosen


def all_destinations() -> list[Destination | SeriesDestination]:
    """Every adapter, for `sendit check`, `sendit status` and the dashboard (each has name, check, close)."""
    return [*destinations(), *series_destinations()]


def preload_destinations() -> None:
    """Import the configured destinations' client libraries now, before worker processes are forked:
    each worker would otherwise import them again (Google's clients: about a second of CPU each).
    Only modules: no client, connection or thread exists yet, so nothing is shared across the fork."""
    if config().SEND_TO_GOOGLE:
        from sendit.destinations.google.client import preload

        preload()
