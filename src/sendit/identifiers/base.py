"""What every identifier provider takes and returns.

A provider turns the headers of one study's series into replacement identifiers. The result is stored
as a ``SeriesIdentifiers`` row before de-identification starts, so the engine never calls a provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class IdentifierError(Exception):
    """The provider could not give usable identifiers; the series must not be de-identified.

    ``retryable`` separates a service that is down (try again later) from an answer that is wrong
    (a person must look). Messages never carry patient values.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class SeriesHeader:
    """The identifying values of one series, read from its first image's header."""

    series_uid: str
    study_uid: str
    patient_id: str
    patient_name: str = ""
    patient_birth_date: str = ""  # DICOM DA (YYYYMMDD) or ""
    accession_number: str = ""
    study_date: str = ""  # DICOM DA or ""
    study_time: str = ""  # DICOM TM or ""
    modality: str = ""


@dataclass(frozen=True)
class Identifiers:
    """Replacement values for one series; ``raw`` is what gets stored (the service's response)."""

    patient_id: str
    patient_name: str
    accession_number: str
    jitter_days: int
    custom_fields: dict[str, str] = field(default_factory=dict)
    provider: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    # Seconds (0 ≤ s < a day) every time of the patient moves besides the days, carried into dates
    # across midnight. A provider whose answer states dates (DASHER's jittered_timestamp) leaves it
    # 0: its dates are then exactly the answer's, and times of day stay.
    jitter_seconds: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "patient_id": self.patient_id,
            "patient_name": self.patient_name,
            "accession_number": self.accession_number,
            "jitter_days": self.jitter_days,
            "jitter_seconds": self.jitter_seconds,
            "custom_fields": dict(self.custom_fields),
            "provider": self.provider,
            "raw": self.raw,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Identifiers:
        return cls(
            patient_id=str(data["patient_id"]),
            patient_name=str(data["patient_name"]),
            accession_number=str(data["accession_number"]),
            jitter_days=int(data["jitter_days"]),
            jitter_seconds=int(data.get("jitter_seconds") or 0),
            custom_fields={str(k): str(v) for k, v in (data.get("custom_fields") or {}).items()},
            provider=str(data.get("provider", "")),
            raw=dict(data.get("raw") or {}),
        )


class IdentifierProvider(Protocol):
    """One method: the headers of a study's series in, identifiers per SeriesInstanceUID out.

    Every series passed in must be answered, or the call raises ``IdentifierError``.
    """

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]: ...
