"""The DASHER provider: group the series by study, ask in bounded requests, check, map to identifiers."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from sendit.identifiers.base import Identifiers, SeriesHeader
from sendit.identifiers.dasher.answers import (
    PROVIDER_NAME,
    ItemAnswer,
    PatientAnswer,
    check_answer,
    identifiers_for,
    merge,
)
from sendit.identifiers.dasher.client import Clock, DasherClient, Sleep
from sendit.identifiers.dasher.query import patients_by_study, request_body, split
from sendit.identifiers.dasher.settings import DasherSettings, name_fields

logger = logging.getLogger(__name__)


class DasherProvider:
    """Identifiers from a DASHER-compatible service; see docs/identifiers.md for the exchange.

    ``settings`` is a ``DasherSettings`` or the configuration's values (``Config.values``, which is what
    ``IDENTIFIER_PROVIDER`` loading passes). Thread-safe: one instance may serve several worker threads.
    """

    name = PROVIDER_NAME

    def __init__(
        self,
        settings: DasherSettings | Mapping[str, Any],
        *,
        sleep: Sleep = time.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings if isinstance(settings, DasherSettings) else DasherSettings.from_config(settings)
        self._client = DasherClient(self.settings, sleep=sleep, clock=clock)
        self._name_fields = name_fields(self.settings.patient_name_format)

    def __repr__(self) -> str:
        return f"DasherProvider(study={self.settings.study!r})"

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]:
        if not series:
            return {}
        studies = patients_by_study(series)
        requests = [
            (study_index, chunk)
            for study_index, patients in enumerate(studies.values(), 1)
            for chunk in split(patients, self.settings.max_items_per_request)
        ]
        patients: dict[str, PatientAnswer] = {}
        items: dict[str, ItemAnswer] = {}
        url = f"{self.settings.base_url.rstrip('/')}/uid/{quote(self.settings.study, safe='')}"
        with self._client.session() as session:
            for number, (study_index, chunk) in enumerate(requests, 1):
                where = f"request {number} of {len(requests)}"
                logger.info(
                    "identifier %s (study %d of %d): %d patient(s), %d item(s)",
                    where,
                    study_index,
                    len(studies),
                    len(chunk),
                    sum(len(p.items) for p in chunk),
                )
                body = request_body(chunk, self.settings.id_source, self.settings.item_id_source)
                data = self._client.post_json(session, url, body, where)
                got_patients, got_items = check_answer(data, chunk, self.settings, where)
                merge(patients, got_patients, items, got_items)
        result = {
            header.series_uid: identifiers_for(header, patients, items, self.settings, self._name_fields)
            for header in series
        }
        logger.info("identifiers received for %d series in %d request(s)", len(result), len(requests))
        return result
