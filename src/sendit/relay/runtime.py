"""Builds the core's objects (engine, identifier provider, destinations) from the configuration."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

from django.conf import settings

from sendit.config import Config
from sendit.destinations.base import Destination
from sendit.destinations.folder import FolderDestination
from sendit.identifiers.base import IdentifierProvider
from sendit.identifiers.local import LocalProvider

if TYPE_CHECKING:  # the engine loads pydicom's tables and the recipes: only when a task needs it
    from sendit.deid import Deidentifier
    from sendit.deid.ocr import OcrSettings
    from sendit.destinations.commitment import CommitmentReport


def config() -> Config:
    """The validated configuration Django was set up with (``server/settings.py``)."""
    cfg: Config = settings.SENDIT
    return cfg


def deidentifier() -> Deidentifier:
    """The engine for the current configuration (built once per distinct set of DEID_* values)."""
    from sendit.deid import ocr_settings

    cfg = config()
    return _deidentifier(cfg.SECRET_KEY, cfg.DEID_OPTIONS, cfg.DEID_RECIPE, cfg.DEID_FILTER, ocr_settings(cfg.values))


@cache
def _deidentifier(secret_key: str, options: str, recipe: str, pixel_filter: str, ocr: OcrSettings) -> Deidentifier:
    from sendit.deid import build_deidentifier

    return build_deidentifier(secret_key, options, recipe, pixel_filter, ocr)


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
