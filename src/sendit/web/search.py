"""Finding series: by pseudonym or de-identified accession, modality, arrival dates, status and the
reason of their images; reviewers also by an original accession number or patient ID (MRN).

The plain search is a GET (its values are no PHI: pseudonyms, codes, dates). A search by an
original identifier is a POST — the value must not land in a URL, a log or a browser's history —
and is an event with the user and the number of series found, never the value.

Bulk actions apply the dashboard's verbs (sendit.web.actions.perform) to every image the filter
selects: each matching series, only its ERROR/QUARANTINED images whose reason matches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import date, datetime, time
from typing import Any

from django.db.models import Q, QuerySet
from django.utils import timezone

from sendit.relay.models import Event, Image, Series, Status
from sendit.relay.transitions import clip
from sendit.web import overview

BULK_LIMIT = 500  # series per bulk action; a larger selection is narrowed first


@dataclass
class Filter:
    q: str = ""  # pseudonym (patient ID given by the identifier provider) or de-identified accession
    modality: str = ""
    status: str = ""
    reason: str = ""  # part of an image's reason
    since: str = ""  # arrival date, YYYY-MM-DD, inclusive
    until: str = ""

    @classmethod
    def from_query(cls, data: Any) -> Filter:
        values = {f.name: str(data.get(f.name, "") or "").strip()[:200] for f in fields(cls)}
        found = cls(**values)
        if found.status not in Status.values:
            found.status = ""
        return found

    def query_string(self) -> str:
        from urllib.parse import urlencode

        return urlencode({k: v for k, v in self.__dict__.items() if v})

    def __bool__(self) -> bool:
        return any(self.__dict__.values())


def _day(text: str) -> date | None:
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def series_matching(flt: Filter) -> QuerySet[Series]:
    queryset = overview.series_queryset(flt.status, flt.modality.upper())
    if flt.q:
        queryset = queryset.filter(
            Q(identifiers__response__patient_id=flt.q) | Q(identifiers__response__accession_number=flt.q)
        )
    if flt.reason:
        queryset = queryset.filter(images__reason__icontains=flt.reason).distinct()
    since, until = _day(flt.since), _day(flt.until)
    zone = timezone.get_current_timezone()
    if since:
        queryset = queryset.filter(created__gte=datetime.combine(since, time.min, zone))
    if until:
        queryset = queryset.filter(created__lte=datetime.combine(until, time.max, zone))
    return queryset


def by_original(value: str, user: Any) -> QuerySet[Series]:
    """Series whose original accession number or patient ID is ``value`` (exact); an event with the
    user and the count, not the value."""
    value = value.strip()[:64]
    found = overview.series_queryset().filter(Q(header__accession_number=value) | Q(header__patient_id=value))
    count = found.count()
    Event.objects.create(
        series=None,
        image=None,
        from_status="",
        to_status="",
        reason=clip(f"search by original accession or patient ID by {user.get_username()}: {count} series"),
        user=user if getattr(user, "pk", None) else None,
    )
    return found


def bulk_targets(flt: Filter, statuses: tuple[str, ...]) -> list[tuple[Series, list[int]]]:
    """(series, image ids) for each matching series, at most BULK_LIMIT: its images in ``statuses``
    whose reason matches the filter."""
    result = []
    for series in series_matching(flt)[:BULK_LIMIT]:
        images = Image.objects.filter(series=series, status__in=statuses)
        if flt.reason:
            images = images.filter(reason__icontains=flt.reason)
        ids = list(images.values_list("id", flat=True))
        if ids:
            result.append((series, ids))
    return result
