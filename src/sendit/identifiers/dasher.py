"""Replacement identifiers from a DASHER-compatible REST service.

One ``POST {base}/uid/{study}`` per study (split when it names more items than the service should get
at once) returns a study-specific pseudonym (``suid``) and a day shift (``jitter``) per patient and a
pseudonym per accession. Anything short of a complete, well-formed answer raises ``IdentifierError``:
the caller must never fall back to the original identifiers. Messages and logs name positions and
counts only, never patient values, pseudonyms or the token, because they end up on the dashboard.
"""

from __future__ import annotations

import copy
import json
import logging
import string
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from sendit.identifiers.base import IdentifierError, Identifiers, SeriesHeader

logger = logging.getLogger(__name__)

PROVIDER_NAME = "dasher"
DEFAULT_ID_SOURCE = "Stanford MRN"
DEFAULT_ITEM_ID_SOURCE = "Stanford Accession"
# DASHER itself draws jitter from [-33, -3] ∪ [3, 33]. The bound is a sanity check, not a policy:
# ten years lets any real configuration through and still rejects garbage such as seconds for days.
DEFAULT_JITTER_BOUND = 3650
MAX_ATTEMPTS_LIMIT = 20
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# DICOM value representations the pseudonyms are written into.
PATIENT_ID_MAX = 64  # LO
ACCESSION_MAX = 16  # SH
PATIENT_NAME_MAX = 64  # one PN component group
TOKEN_EXPIRY_MARGIN = 30.0  # seconds; refresh a little before the service would refuse

_RETRY_STATUSES = frozenset({408, 429})

Sleep = Callable[[float], None]
Clock = Callable[[], float]


# --------------------------------------------------------------------------------------------------
# Settings


def _parse_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{key} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    raise ValueError(f"{key} must be an integer")


def _parse_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number of seconds")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{key} must be a number of seconds")


def _parse_timeout(value: Any) -> tuple[float, float]:
    """One number for both, or ``connect,read`` (string or pair), because the two differ in practice."""
    if isinstance(value, str) and "," in value:
        value = value.split(",")
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError("DASHER_TIMEOUT must be one number or a pair 'connect,read' of seconds")
        return _parse_float("DASHER_TIMEOUT", value[0]), _parse_float("DASHER_TIMEOUT", value[1])
    seconds = _parse_float("DASHER_TIMEOUT", value)
    return seconds, seconds


def _parse_field_map(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                'CUSTOM_FIELD_MAP must be a mapping (or JSON object) {"custom field": "DICOM keyword"}'
            ) from None
    if not isinstance(value, Mapping):
        raise ValueError('CUSTOM_FIELD_MAP must be a mapping {"custom field": "DICOM keyword"}')
    return {str(k): str(v) for k, v in value.items()}


def _is_dicom_keyword(keyword: str) -> bool:
    try:
        from pydicom.datadict import tag_for_keyword
    except ImportError:  # pragma: no cover - pydicom is a dependency; keep the provider usable alone
        return keyword.isidentifier()
    return tag_for_keyword(keyword) is not None


def _format_fields(fmt: str) -> list[str]:
    """The placeholder names in PATIENT_NAME_FORMAT; only plain names, so config cannot reach attributes."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        raise ValueError(f"PATIENT_NAME_FORMAT is not a valid format string ({exc})") from None
    for _literal, name, _spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError("PATIENT_NAME_FORMAT placeholders must be plain names such as {suid} or {custom_field}")
        if conversion:
            raise ValueError("PATIENT_NAME_FORMAT placeholders take no !r/!s/!a conversion")
        names.append(name)
    return names


@dataclass(frozen=True)
class DasherSettings:
    """Everything the DASHER provider needs; validated here so a bad value stops start-up, not a series.

    Configure ``token`` or ``token_file`` (not both), or neither when the token endpoint (``token_url``
    with client credentials or a refresh token) should supply the first token as well as renew it.
    Secrets are left out of ``repr`` so a logged settings object gives nothing away.
    """

    base_url: str
    study: str
    token: str = field(default="", repr=False)
    token_file: str = ""
    token_url: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    refresh_token: str = field(default="", repr=False)
    id_source: str = DEFAULT_ID_SOURCE
    item_id_source: str = DEFAULT_ITEM_ID_SOURCE
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 4
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    max_items_per_request: int = 100
    jitter_bound: int = DEFAULT_JITTER_BOUND
    patient_name_format: str = "{suid}"
    custom_field_map: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, url in (("DASHER_URL", self.base_url), ("DASHER_TOKEN_URL", self.token_url)):
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"{key} must be an http:// or https:// URL")
            if "@" in urlsplit(url).netloc:  # httpx logs URLs; credentials belong in the token settings
                raise ValueError(f"{key} must not carry a user name or password")
        if not self.base_url:
            raise ValueError("DASHER_URL must be an http:// or https:// URL")
        if not self.study.strip():
            raise ValueError("DASHER_STUDY must name the study")
        if self.token and self.token_file:
            raise ValueError("set DASHER_TOKEN or DASHER_TOKEN_FILE, not both")
        has_credentials = bool(self.client_id and self.client_secret) or bool(self.refresh_token)
        if self.token_url and not has_credentials:
            raise ValueError(
                "DASHER_TOKEN_URL needs DASHER_CLIENT_ID and DASHER_CLIENT_SECRET, or DASHER_REFRESH_TOKEN"
            )
        if (self.client_secret or self.refresh_token) and not self.token_url:
            raise ValueError("DASHER_CLIENT_SECRET / DASHER_REFRESH_TOKEN need DASHER_TOKEN_URL")
        if not (self.token or self.token_file or self.token_url):
            raise ValueError("the identifier service needs DASHER_TOKEN, DASHER_TOKEN_FILE or DASHER_TOKEN_URL")
        if not self.id_source.strip() or not self.item_id_source.strip():
            raise ValueError("DASHER_ID_SOURCE and DASHER_ITEM_ID_SOURCE must not be empty")
        if not (self.connect_timeout > 0 and self.read_timeout > 0):
            raise ValueError("DASHER_TIMEOUT must be greater than 0 seconds")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"DASHER_MAX_ATTEMPTS must be between 1 and {MAX_ATTEMPTS_LIMIT}")
        if self.backoff_base < 0 or self.backoff_cap < 0:
            raise ValueError("back-off times must not be negative")
        if self.max_items_per_request < 1:
            raise ValueError("DASHER_MAX_ITEMS must be at least 1")
        if self.jitter_bound < 1:
            raise ValueError("DASHER_JITTER_BOUND must be at least 1 day")
        _format_fields(self.patient_name_format)
        try:
            self.patient_name_format.format_map(_AnyValue())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"PATIENT_NAME_FORMAT is not a valid format string ({exc})") from None
        for name, keyword in self.custom_field_map.items():
            if not name:
                raise ValueError("CUSTOM_FIELD_MAP has an empty custom field name")
            if not _is_dicom_keyword(keyword):
                raise ValueError(f"CUSTOM_FIELD_MAP: {keyword!r} is not a DICOM keyword")

    @property
    def refresh_configured(self) -> bool:
        return bool(self.token_url)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DasherSettings:
        """Read the ``DASHER_*`` knobs (plus PATIENT_NAME_FORMAT and CUSTOM_FIELD_MAP) from one mapping.

        Values may be strings, as environment overrides are; unset or empty values keep the default.
        """

        def get(key: str) -> Any:
            value = config.get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                return None
            return value.strip() if isinstance(value, str) else value

        kwargs: dict[str, Any] = {
            "base_url": str(get("DASHER_URL") or "").rstrip("/"),
            "study": str(get("DASHER_STUDY") or ""),
        }
        for key, attr in (
            ("DASHER_TOKEN", "token"),
            ("DASHER_TOKEN_FILE", "token_file"),
            ("DASHER_TOKEN_URL", "token_url"),
            ("DASHER_CLIENT_ID", "client_id"),
            ("DASHER_CLIENT_SECRET", "client_secret"),
            ("DASHER_REFRESH_TOKEN", "refresh_token"),
            ("DASHER_ID_SOURCE", "id_source"),
            ("DASHER_ITEM_ID_SOURCE", "item_id_source"),
            ("PATIENT_NAME_FORMAT", "patient_name_format"),
        ):
            if get(key) is not None:
                kwargs[attr] = str(get(key))
        for key, attr in (
            ("DASHER_MAX_ATTEMPTS", "max_attempts"),
            ("DASHER_MAX_ITEMS", "max_items_per_request"),
            ("DASHER_JITTER_BOUND", "jitter_bound"),
        ):
            if get(key) is not None:
                kwargs[attr] = _parse_int(key, get(key))
        if get("DASHER_TIMEOUT") is not None:
            kwargs["connect_timeout"], kwargs["read_timeout"] = _parse_timeout(get("DASHER_TIMEOUT"))
        if get("CUSTOM_FIELD_MAP") is not None:
            kwargs["custom_field_map"] = _parse_field_map(get("CUSTOM_FIELD_MAP"))
        return cls(**kwargs)


class _AnyValue(dict[str, str]):
    """Answers every placeholder, to check a format string's syntax without real values."""

    def __missing__(self, key: str) -> str:
        return "x"


# --------------------------------------------------------------------------------------------------
# Request building


def _iso_date(value: str) -> str | None:
    """DICOM DA (also the old ``YYYY.MM.DD``) to ISO; None when absent or not a real date."""
    digits = value.strip().replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        return None


def _iso_datetime(da: str, tm: str) -> str | None:
    """StudyDate + StudyTime to a naive ISO datetime (DICOM carries no zone); midnight when TM is absent."""
    day = _iso_date(da)
    if day is None:
        return None
    clock = tm.strip().replace(":", "").split(".")[0]
    if not clock:
        clock = "000000"
    if not clock.isdigit() or len(clock) not in (2, 4, 6):
        clock = "000000"  # a broken time must not lose the date
    clock = clock.ljust(6, "0")
    hour, minute, second = int(clock[:2]), int(clock[2:4]), min(int(clock[4:6]), 59)  # TM allows 60
    if hour > 23 or minute > 59:
        hour = minute = second = 0
    return datetime.fromisoformat(day).replace(hour=hour, minute=minute, second=second).isoformat()


@dataclass
class _Item:
    accession: str
    timestamp: str | None


@dataclass
class _Patient:
    patient_id: str
    timestamp: str | None
    items: dict[str, _Item] = field(default_factory=dict)


def _chunk(patients: list[_Patient], cap: int) -> list[list[_Patient]]:
    """Split a study's patients so no request names more than ``cap`` items.

    A patient with many items is repeated across requests with a share of them each; a patient without
    items still takes one slot, so every request stays bounded.
    """
    chunks: list[list[_Patient]] = []
    current: list[_Patient] = []
    used = 0
    for patient in patients:
        items = list(patient.items.values())
        pieces = [items[i : i + cap] for i in range(0, len(items), cap)] or [[]]
        for piece in pieces:
            weight = max(1, len(piece))
            if current and used + weight > cap:
                chunks.append(current)
                current, used = [], 0
            current.append(_Patient(patient.patient_id, patient.timestamp, {i.accession: i for i in piece}))
            used += weight
    if current:
        chunks.append(current)
    return chunks


# --------------------------------------------------------------------------------------------------
# Response checking


@dataclass
class _PatientAnswer:
    suid: str
    jitter: int
    custom_fields: dict[str, str]
    raw: dict[str, Any]  # the result without its items


@dataclass
class _ItemAnswer:
    suid: str
    custom_fields: dict[str, str]
    raw: dict[str, Any]
    patient_raw: dict[str, Any]


def _bad(message: str) -> IdentifierError:
    return IdentifierError(f"identifier service answer rejected: {message}", retryable=False)


def _check_suid(value: Any, original: str, max_length: int, vr: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"{where} has an empty or missing suid")
    suid = value.strip()
    if suid == original.strip():
        raise _bad(f"{where} returned the original identifier as its suid")
    if len(suid) > max_length:
        raise _bad(f"{where} has a suid longer than {max_length} characters (DICOM {vr})")
    if "\\" in suid or any(ord(c) < 32 for c in suid):
        raise _bad(f"{where} has a suid with characters DICOM does not allow")
    return suid


def _check_jitter(value: Any, bound: int, where: str) -> int:
    # bool is an int subclass and a float such as 3.0 would silently truncate elsewhere: both refused.
    if type(value) is not int:
        raise _bad(f"{where} has a jitter that is not an integer number of days")
    if value == 0:
        raise _bad(f"{where} has a jitter of 0 days (dates would not be shifted)")
    if abs(value) > bound:
        raise _bad(f"{where} has a jitter outside ±{bound} days (DASHER_JITTER_BOUND)")
    return value


def _check_custom_fields(value: Any, where: str) -> dict[str, str]:
    """DASHER sends ``[{"key", "value"}]``; a plain object is accepted too, since services differ."""
    if value is None:
        return {}
    pairs: list[tuple[Any, Any]]
    if isinstance(value, list):
        pairs = []
        for entry in value:
            if not isinstance(entry, dict) or "key" not in entry or "value" not in entry:
                raise _bad(f"{where} has custom_fields entries without key and value")
            pairs.append((entry["key"], entry["value"]))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise _bad(f"{where} has custom_fields that are neither a list nor an object")
    fields: dict[str, str] = {}
    for key, val in pairs:
        if not isinstance(key, str) or isinstance(val, bool) or not isinstance(val, str | int):
            raise _bad(f"{where} has a custom field that is not a name with a text or integer value")
        fields[key] = str(val)
    return fields


def _key_of(entry: dict[str, Any], where: str) -> tuple[str, str]:
    entry_id, source = entry.get("id"), entry.get("id_source")
    if not isinstance(entry_id, str) or not isinstance(source, str):
        raise _bad(f"{where} lacks a text id or id_source")
    return entry_id, source


# --------------------------------------------------------------------------------------------------
# The provider


class _TransientFailure(Exception):
    """One attempt failed in a way that may pass (time-out, connection, 5xx); retried with back-off."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class _Reply:
    status: int
    body: bytes


def _status_text(status: int) -> str:
    """The standard phrase, not the server's: a server could put anything in its reason phrase."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _loads(body: bytes, what: str) -> Any:
    def refuse_constant(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(body, parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError):
        raise IdentifierError(f"{what} returned malformed JSON", retryable=False) from None


class DasherProvider:
    """Identifiers from a DASHER-compatible service; see docs/identifiers.md for the exchange.

    Thread-safe: one instance may serve several worker threads (the token is shared under a lock).
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
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._access_token = ""  # from the token endpoint; wins over the configured one until it expires
        self._access_expires: float | None = None
        self._refresh_token = self.settings.refresh_token
        self._name_fields = _format_fields(self.settings.patient_name_format)

    def __repr__(self) -> str:
        return f"DasherProvider(study={self.settings.study!r})"

    # -- public --------------------------------------------------------------------------------

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]:
        if not series:
            return {}
        studies = self._group(series)
        requests = [
            (study_index, chunk)
            for study_index, patients in enumerate(studies.values(), 1)
            for chunk in _chunk(patients, self.settings.max_items_per_request)
        ]
        patients: dict[str, _PatientAnswer] = {}
        items: dict[str, _ItemAnswer] = {}
        url = f"{self.settings.base_url.rstrip('/')}/uid/{quote(self.settings.study, safe='')}"
        with self._client() as client:
            for number, (study_index, chunk) in enumerate(requests, 1):
                where = f"request {number} of {len(requests)}"
                n_items = sum(len(p.items) for p in chunk)
                logger.info(
                    "identifier %s (study %d of %d): %d patient(s), %d item(s)",
                    where,
                    study_index,
                    len(studies),
                    len(chunk),
                    n_items,
                )
                data = self._call(client, url, self._body(chunk), where)
                got_patients, got_items = self._check(data, chunk, where)
                self._merge(patients, got_patients, items, got_items)
        result = {header.series_uid: self._identifiers(header, patients, items) for header in series}
        logger.info("identifiers received for %d series in %d request(s)", len(result), len(requests))
        return result

    # -- request side --------------------------------------------------------------------------

    def _group(self, series: list[SeriesHeader]) -> dict[str, list[_Patient]]:
        """Patients (with their accessions as items) per study, in the order the series came."""
        studies: dict[str, dict[str, _Patient]] = {}
        seen: dict[str, SeriesHeader] = {}
        for index, header in enumerate(series, 1):
            where = f"series {index} of {len(series)}"
            if not header.series_uid:
                raise IdentifierError(f"{where} has no SeriesInstanceUID")
            if header.series_uid in seen and seen[header.series_uid] != header:
                raise IdentifierError(f"{where} repeats an earlier series with different headers")
            seen[header.series_uid] = header
            patient_id = header.patient_id.strip()
            if not patient_id:
                raise IdentifierError(f"{where} has no PatientID; the identifier service needs one")
            study = studies.setdefault(header.study_uid, {})
            patient = study.get(patient_id)
            if patient is None:
                patient = study[patient_id] = _Patient(patient_id, _iso_date(header.patient_birth_date))
            elif patient.timestamp is None:
                patient.timestamp = _iso_date(header.patient_birth_date)
            accession = header.accession_number.strip()
            if accession:
                stamp = _iso_datetime(header.study_date, header.study_time)
                item = patient.items.get(accession)
                if item is None:
                    patient.items[accession] = _Item(accession, stamp)
                elif item.timestamp is None:
                    item.timestamp = stamp
        return {uid: list(patients.values()) for uid, patients in studies.items()}

    def _body(self, chunk: list[_Patient]) -> dict[str, Any]:
        identifiers = []
        for patient in chunk:
            entry: dict[str, Any] = {"id": patient.patient_id, "id_source": self.settings.id_source}
            if patient.timestamp:
                entry["id_timestamp"] = patient.timestamp
            entry["items"] = []
            for item in patient.items.values():
                item_entry: dict[str, Any] = {"id": item.accession, "id_source": self.settings.item_id_source}
                if item.timestamp:
                    item_entry["id_timestamp"] = item.timestamp
                entry["items"].append(item_entry)
            identifiers.append(entry)
        return {"identifiers": identifiers}

    # -- HTTP ------------------------------------------------------------------------------------

    def _client(self) -> httpx.Client:
        s = self.settings
        timeout = httpx.Timeout(
            connect=s.connect_timeout, read=s.read_timeout, write=s.read_timeout, pool=s.connect_timeout
        )
        return httpx.Client(timeout=timeout, follow_redirects=False)

    def _call(self, client: httpx.Client, url: str, body: dict[str, Any], where: str) -> Any:
        """POST with the bearer token; one token refresh on 401, then judge the status."""
        what = f"identifier service ({where})"
        token = self._token(client)
        reply = self._send(client, "POST", url, what, json=body, headers=self._auth(token))
        if reply.status == 401:
            logger.warning("%s answered 401; refreshing the token once", what)
            token = self._renew_token(client, rejected=token)
            reply = self._send(client, "POST", url, what, json=body, headers=self._auth(token))
            if reply.status == 401:
                raise IdentifierError(
                    f"{what}: authentication failed (401 again after a token refresh)", retryable=False
                )
        if not 200 <= reply.status < 300:
            raise IdentifierError(f"{what} refused the request: {_status_text(reply.status)}", retryable=False)
        return _loads(reply.body, what)

    @staticmethod
    def _auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def _send(self, client: httpx.Client, method: str, url: str, what: str, **kwargs: Any) -> _Reply:
        """At most ``max_attempts`` tries, each bounded in time; transient failures back off and retry."""
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return self._attempt(client, method, url, **kwargs)
            except _TransientFailure as failure:
                if attempt == attempts:
                    raise IdentifierError(
                        f"{what} unavailable: {failure.reason}; gave up after {attempts} attempt(s)",
                        retryable=True,
                    ) from None
                delay = min(self.settings.backoff_cap, self.settings.backoff_base * 2 ** (attempt - 1))
                if failure.retry_after is not None:
                    delay = min(self.settings.backoff_cap, max(delay, failure.retry_after))
                logger.warning(
                    "%s: %s; attempt %d of %d, retrying in %.2f s", what, failure.reason, attempt, attempts, delay
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(self, client: httpx.Client, method: str, url: str, **kwargs: Any) -> _Reply:
        # httpx bounds each read, not the whole exchange: a server trickling bytes could hold us for
        # ever, so the attempt also has an overall deadline checked between chunks.
        s = self.settings
        deadline = self._clock() + s.connect_timeout + 2 * s.read_timeout
        try:
            with client.stream(method, url, **kwargs) as response:
                status = response.status_code
                if status >= 500 or status in _RETRY_STATUSES:
                    raise _TransientFailure(_status_text(status), _retry_after(response.headers.get("retry-after")))
                if not 200 <= status < 300:
                    return _Reply(status, b"")
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise IdentifierError(
                            f"identifier service answer larger than {MAX_RESPONSE_BYTES // 2**20} MiB",
                            retryable=False,
                        )
                    if self._clock() > deadline:
                        raise _TransientFailure("answer took too long to arrive")
                    chunks.append(chunk)
                return _Reply(status, b"".join(chunks))
        except httpx.TimeoutException as exc:
            raise _TransientFailure(f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _TransientFailure(f"connection failed ({type(exc).__name__})") from None

    # -- token -----------------------------------------------------------------------------------

    def _token(self, client: httpx.Client) -> str:
        with self._lock:
            if self._fresh_access_token():
                return self._access_token
            configured = self._configured_token()
            if configured:
                return configured
            return self._fetch_token(client)

    def _fresh_access_token(self) -> bool:
        expires = self._access_expires
        return bool(self._access_token) and (expires is None or self._clock() < expires)

    def _configured_token(self) -> str:
        """DASHER_TOKEN, or DASHER_TOKEN_FILE read now, so a rotated file is picked up without restart."""
        if self.settings.token_file:
            try:
                token = Path(self.settings.token_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise IdentifierError(
                    f"cannot read DASHER_TOKEN_FILE {self.settings.token_file} ({type(exc).__name__})",
                    retryable=False,
                ) from None
            if not token:
                raise IdentifierError(f"DASHER_TOKEN_FILE {self.settings.token_file} is empty", retryable=False)
            return token
        return self.settings.token

    def _renew_token(self, client: httpx.Client, rejected: str) -> str:
        """A token other than the rejected one: from the token endpoint, or a rotated token file."""
        with self._lock:
            if self._fresh_access_token() and self._access_token != rejected:
                return self._access_token  # another thread renewed it meanwhile
            if self.settings.refresh_configured:
                return self._fetch_token(client)
            if self.settings.token_file:
                token = self._configured_token()
                if token != rejected:
                    return token
        raise IdentifierError(
            "identifier service: authentication failed (401; the token was refused and no token refresh is configured)",
            retryable=False,
        )

    def _fetch_token(self, client: httpx.Client) -> str:
        """OAuth2 client_credentials grant (HTTP Basic client auth), or refresh_token when configured."""
        s = self.settings
        what = "token endpoint"
        data: dict[str, str]
        auth: tuple[str, str] | None = None
        if s.refresh_token:
            data = {"grant_type": "refresh_token", "refresh_token": self._refresh_token}
            if s.client_id and s.client_secret:
                auth = (s.client_id, s.client_secret)
            elif s.client_id:
                data["client_id"] = s.client_id
        else:
            data = {"grant_type": "client_credentials"}
            auth = (s.client_id, s.client_secret)
        logger.info("requesting a new access token (%s grant)", data["grant_type"])
        reply = self._send(
            client, "POST", s.token_url, what, data=data, auth=auth, headers={"Accept": "application/json"}
        )
        if not 200 <= reply.status < 300:
            raise IdentifierError(f"{what}: authentication failed ({_status_text(reply.status)})", retryable=False)
        payload = _loads(reply.body, what)
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise IdentifierError(f"{what}: authentication failed (no access_token in the answer)")
        token_type = payload.get("token_type", "bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise IdentifierError(f"{what}: authentication failed (token type is not bearer)")
        expires_in = payload.get("expires_in")
        self._access_token = token.strip()
        self._access_expires = (
            self._clock() + max(0.0, float(expires_in) - TOKEN_EXPIRY_MARGIN)
            if type(expires_in) in (int, float) and expires_in > 0
            else None
        )
        rotated = payload.get("refresh_token")
        if isinstance(rotated, str) and rotated.strip():
            self._refresh_token = rotated.strip()
        return self._access_token

    # -- response side ---------------------------------------------------------------------------

    def _check(
        self, data: Any, chunk: list[_Patient], where: str
    ) -> tuple[dict[str, _PatientAnswer], dict[str, _ItemAnswer]]:
        """Every requested patient and item answered exactly once, nothing else, all values usable."""
        s = self.settings
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise _bad(f"{where}: the answer is not an object with a 'results' list")
        requested = {(p.patient_id, s.id_source): p for p in chunk}
        results: list[Any] = data["results"]
        patients: dict[str, _PatientAnswer] = {}
        items: dict[str, _ItemAnswer] = {}
        for r_index, result in enumerate(results, 1):
            rw = f"{where}, result {r_index} of {len(results)}"
            if not isinstance(result, dict):
                raise _bad(f"{rw} is not an object")
            key = _key_of(result, rw)
            patient = requested.get(key)
            if patient is None:
                raise _bad(f"{rw} answers for a patient that was not asked about")
            if patient.patient_id in patients:
                raise _bad(f"{rw} answers for the same patient twice")
            suid = _check_suid(result.get("suid"), patient.patient_id, PATIENT_ID_MAX, "LO", rw)
            jitter = _check_jitter(result.get("jitter"), s.jitter_bound, rw)
            custom = _check_custom_fields(result.get("custom_fields"), rw)
            raw_items = result.get("items", [])
            if raw_items is None:
                raw_items = []
            if not isinstance(raw_items, list):
                raise _bad(f"{rw} has 'items' that is not a list")
            patient_raw = {k: copy.deepcopy(v) for k, v in result.items() if k != "items"}
            patients[patient.patient_id] = _PatientAnswer(suid, jitter, custom, patient_raw)
            answered: set[str] = set()
            for i_index, item in enumerate(raw_items, 1):
                iw = f"{rw}, item {i_index} of {len(raw_items)}"
                if not isinstance(item, dict):
                    raise _bad(f"{iw} is not an object")
                item_id, item_source = _key_of(item, iw)
                if item_source != s.item_id_source or item_id not in patient.items:
                    raise _bad(f"{iw} answers for an item that was not asked about")
                if item_id in answered:
                    raise _bad(f"{iw} answers for the same item twice")
                answered.add(item_id)
                item_suid = _check_suid(item.get("suid"), item_id, ACCESSION_MAX, "SH", iw)
                # The patient's jitter is the study's shift; an item may repeat it or leave it out,
                # but two different shifts for one patient would scramble the timeline.
                if item.get("jitter") is not None:
                    item_jitter = _check_jitter(item.get("jitter"), s.jitter_bound, iw)
                    if item_jitter != jitter:
                        raise _bad(f"{iw} has a jitter different from its patient's")
                item_custom = _check_custom_fields(item.get("custom_fields"), iw)
                items[self._item_key(patient.patient_id, item_id)] = _ItemAnswer(
                    item_suid, item_custom, copy.deepcopy(item), patient_raw
                )
            missing_items = len(patient.items) - len(answered)
            if missing_items:
                raise _bad(f"{rw} lacks {missing_items} of {len(patient.items)} requested item(s)")
        missing = len(requested) - len(patients)
        if missing:
            raise _bad(f"{where}: the answer lacks {missing} of {len(requested)} requested patient(s)")
        return patients, items

    @staticmethod
    def _item_key(patient_id: str, accession: str) -> str:
        return f"{patient_id}\x00{accession}"

    @staticmethod
    def _merge(
        patients: dict[str, _PatientAnswer],
        new_patients: dict[str, _PatientAnswer],
        items: dict[str, _ItemAnswer],
        new_items: dict[str, _ItemAnswer],
    ) -> None:
        """Answers from several requests must agree about a patient (same suid, same jitter)."""
        for key, answer in new_patients.items():
            known = patients.get(key)
            if known is None:
                patients[key] = answer
            elif (known.suid, known.jitter) != (answer.suid, answer.jitter):
                raise _bad("two requests got different suid or jitter for the same patient")
        for key, item in new_items.items():
            known_item = items.get(key)
            if known_item is None:
                items[key] = item
            elif known_item.suid != item.suid:
                raise _bad("two requests got different suids for the same item")

    def _identifiers(
        self, header: SeriesHeader, patients: dict[str, _PatientAnswer], items: dict[str, _ItemAnswer]
    ) -> Identifiers:
        patient_id = header.patient_id.strip()
        accession = header.accession_number.strip()
        patient = patients[patient_id]
        item = items.get(self._item_key(patient_id, accession)) if accession else None
        fields = {**patient.custom_fields, **(item.custom_fields if item else {})}
        custom: dict[str, str] = {}
        for name, keyword in self.settings.custom_field_map.items():
            if name not in fields:
                raise _bad(f"custom field {name!r} (CUSTOM_FIELD_MAP) is missing from the answer")
            custom[keyword] = fields[name]
        values = {k: v for k, v in fields.items() if k.isidentifier()}
        values.update(suid=patient.suid, item_suid=item.suid if item else "", study=self.settings.study)
        for name in self._name_fields:
            if name not in values:
                raise _bad(f"PATIENT_NAME_FORMAT uses {{{name}}}, which the answer does not provide")
        try:
            patient_name = self.settings.patient_name_format.format_map(values)
        except (ValueError, TypeError):
            raise _bad("PATIENT_NAME_FORMAT cannot format the values in the answer") from None
        if len(patient_name) > PATIENT_NAME_MAX or "\\" in patient_name or not patient_name.strip():
            raise _bad(
                f"PATIENT_NAME_FORMAT gives a name that is empty, longer than {PATIENT_NAME_MAX} "
                "characters or has a backslash"
            )
        raw_result = copy.deepcopy(item.patient_raw if item else patient.raw)
        raw_result["items"] = [copy.deepcopy(item.raw)] if item else []
        return Identifiers(
            patient_id=patient.suid,
            patient_name=patient_name,
            accession_number=item.suid if item else "",
            jitter_days=patient.jitter,
            custom_fields=custom,
            provider=PROVIDER_NAME,
            raw={"provider": PROVIDER_NAME, "study": self.settings.study, "result": raw_result},
        )
