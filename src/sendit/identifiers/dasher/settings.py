"""What the DASHER provider needs, checked as a whole so a bad combination stops start-up, not a series.

Each value's type, default and range are declared once, in ``sendit.config.KEYS`` (the ``DASHER_*``
keys, ``PATIENT_NAME_FORMAT`` and ``CUSTOM_FIELD_MAP``); :meth:`DasherSettings.from_config` takes them
from that mapping as plain values. What needs several values at once or knowledge of the service
(URLs, credentials, the name format, DICOM keywords) is checked here, because a library user may build
``DasherSettings`` directly. No Django: this is the functional core.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True, kw_only=True)
class DasherSettings:
    """The provider's knobs. Tunable ones have no default here: their defaults live in the key table.

    Configure ``token`` or ``token_file`` (not both), or neither when the token endpoint (``token_url``
    with client credentials or a refresh token) should supply the first token as well as renew it.
    An empty credential means "not configured". Secrets are left out of ``repr`` so a logged settings
    object gives nothing away. ``backoff_base`` and ``backoff_cap`` are not configuration keys.
    """

    base_url: str
    study: str
    token: str = field(default="", repr=False)
    token_file: str = ""
    token_url: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    refresh_token: str = field(default="", repr=False)
    id_source: str
    item_id_source: str
    connect_timeout: float
    read_timeout: float
    max_attempts: int
    max_items_per_request: int
    jitter_bound: int
    patient_name_format: str
    custom_field_map: Mapping[str, str] = field(default_factory=dict)
    backoff_base: float = 1.0
    backoff_cap: float = 30.0

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
        # The key table bounds each of these for the operator; the code below relies on the lower
        # bounds (a loop of at least one attempt, chunks of at least one item), so they hold here too.
        if not (self.connect_timeout > 0 and self.read_timeout > 0):
            raise ValueError("DASHER_TIMEOUT must be greater than 0 seconds")
        if self.max_attempts < 1:
            raise ValueError("DASHER_MAX_ATTEMPTS must be at least 1")
        if self.backoff_base < 0 or self.backoff_cap < 0:
            raise ValueError("back-off times must not be negative")
        if self.max_items_per_request < 1:
            raise ValueError("DASHER_MAX_ITEMS must be at least 1")
        if self.jitter_bound < 1:
            raise ValueError("DASHER_JITTER_BOUND must be at least 1 day")
        name_fields(self.patient_name_format)
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
        """From the configuration's values (``Config.values``): already parsed, so only their types are
        checked here. An absent credential is empty; an absent tunable key is an error naming it."""
        return cls(
            base_url=_text(config, "DASHER_URL").rstrip("/"),
            study=_text(config, "DASHER_STUDY"),
            token=_text(config, "DASHER_TOKEN"),
            token_file=_text(config, "DASHER_TOKEN_FILE"),
            token_url=_text(config, "DASHER_TOKEN_URL"),
            client_id=_text(config, "DASHER_CLIENT_ID"),
            client_secret=_text(config, "DASHER_CLIENT_SECRET"),
            refresh_token=_text(config, "DASHER_REFRESH_TOKEN"),
            id_source=_text(config, "DASHER_ID_SOURCE", required=True),
            item_id_source=_text(config, "DASHER_ITEM_ID_SOURCE", required=True),
            connect_timeout=_seconds(config, "DASHER_TIMEOUT")[0],
            read_timeout=_seconds(config, "DASHER_TIMEOUT")[1],
            max_attempts=_whole(config, "DASHER_MAX_ATTEMPTS"),
            max_items_per_request=_whole(config, "DASHER_MAX_ITEMS"),
            jitter_bound=_whole(config, "DASHER_JITTER_BOUND"),
            patient_name_format=_text(config, "PATIENT_NAME_FORMAT", required=True),
            custom_field_map=_text_map(config, "CUSTOM_FIELD_MAP"),
        )


def _present(config: Mapping[str, Any], key: str) -> Any:
    if key not in config:
        raise ValueError(f"{key} is missing from the configuration")
    return config[key]


def _text(config: Mapping[str, Any], key: str, required: bool = False) -> str:
    value = _present(config, key) if required else config.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} must be text")
    return value.strip()


def _whole(config: Mapping[str, Any], key: str) -> int:
    value = _present(config, key)
    if type(value) is not int:  # bool is an int subclass: refused
        raise ValueError(f"{key} must be a whole number")
    return value


def _seconds(config: Mapping[str, Any], key: str) -> tuple[float, float]:
    value = _present(config, key)
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in value)
    ):
        raise ValueError(f"{key} must be a pair of seconds (connect, read)")
    return float(value[0]), float(value[1])


def _text_map(config: Mapping[str, Any], key: str) -> dict[str, str]:
    value = config.get(key, {})
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f'{key} must be a mapping {{"custom field": "DICOM keyword"}}')
    return dict(value)


def name_fields(fmt: str) -> list[str]:
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


def _is_dicom_keyword(keyword: str) -> bool:
    try:
        from pydicom.datadict import tag_for_keyword
    except ImportError:  # pragma: no cover - pydicom is a dependency; keep the provider usable alone
        return keyword.isidentifier()
    return tag_for_keyword(keyword) is not None


class _AnyValue(dict[str, str]):
    """Answers every placeholder, to check a format string's syntax without real values."""

    def __missing__(self, key: str) -> str:
        return "x"
