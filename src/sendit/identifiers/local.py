"""Pseudonyms and date shifts derived from a secret key, for running without an identifier service.

HMAC-SHA256 keyed with the project secret makes the values stable across series, restarts and
machines that share the key, and impossible to reverse without it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from sendit.identifiers.base import IdentifierError, Identifiers, SeriesHeader

PATIENT_PREFIX = "SID"
ACCESSION_PREFIX = "ACC"
SECONDS_PER_DAY = 86400


class LocalProvider:
    """Keyed pseudonyms; the date shift is drawn per patient from [min_days, max_days] without 0."""

    def __init__(self, secret_key: str | bytes, min_days: int = -365, max_days: int = -1) -> None:
        if min_days > max_days:
            raise ValueError("date shift range is empty (min_days > max_days)")
        if min_days == max_days == 0:
            raise ValueError("date shift range holds only 0 days")
        self._key = secret_key.encode() if isinstance(secret_key, str) else secret_key
        self._shifts = [d for d in range(min_days, max_days + 1) if d != 0]

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def _token(self, purpose: str, value: str, length: int) -> str:
        return base64.b32encode(self._digest(purpose, value)).decode("ascii")[:length]

    @staticmethod
    def patient_key(header: SeriesHeader) -> str:
        """PatientID when present; otherwise name + birth date; otherwise the study, so nobody is merged."""
        if header.patient_id.strip():
            return "id:" + header.patient_id.strip()
        if header.patient_name.strip() or header.patient_birth_date.strip():
            return f"name:{header.patient_name.strip()}|{header.patient_birth_date.strip()}"
        return "study:" + header.study_uid

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]:
        result: dict[str, Identifiers] = {}
        for header in series:
            if not header.series_uid:
                raise IdentifierError("a series has no SeriesInstanceUID")
            patient = self.patient_key(header)
            pseudonym = f"{PATIENT_PREFIX}{self._token('patient', patient, 13)}"
            accession_source = header.accession_number.strip() or "study:" + header.study_uid
            accession = f"{ACCESSION_PREFIX}{self._token('accession', patient + '|' + accession_source, 13)}"
            shift_index = int.from_bytes(self._digest("jitter", patient)[:8], "big") % len(self._shifts)
            jitter = self._shifts[shift_index]
            # times of day move too (the same seconds in every study of the patient), so that no
            # original time of day is left while every interval stays exact
            seconds = int.from_bytes(self._digest("jitter-seconds", patient)[:8], "big") % SECONDS_PER_DAY
            result[header.series_uid] = Identifiers(
                patient_id=pseudonym,
                patient_name=pseudonym,
                accession_number=accession,
                jitter_days=jitter,
                jitter_seconds=seconds,
                provider="local",
                raw={"provider": "local", "suid": pseudonym, "item_suid": accession, "jitter": jitter},
            )
        return result
