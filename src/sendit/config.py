"""Sendit's configuration: one TOML file plus ``SENDIT_<KEY>`` environment overrides.

Every key is declared once, in ``KEYS``, with its type, default, help text and check, so that start-up
can report each wrong value on one line, ``sendit check`` can print the effective values with secrets
masked, and nothing else in the code reads the environment. The result is ``Config``, a frozen
dataclass with one typed attribute per key: mypy rejects a misspelt setting, and a test keeps its
fields and ``KEYS`` in step.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

CONFIG_FILE = "sendit.toml"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
#: short names of Django's mail backends for EMAIL_BACKEND
EMAIL_BACKENDS = {
    "smtp": "django.core.mail.backends.smtp.EmailBackend",
    "console": "django.core.mail.backends.console.EmailBackend",
    "locmem": "django.core.mail.backends.locmem.EmailBackend",
}
ENV_PREFIX = "SENDIT_"


class ConfigError(Exception):
    """One or more wrong values; ``problems`` holds one line per value."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Timeout(NamedTuple):
    """Seconds to connect and to wait for each read; written ``"connect,read"`` or one number for both."""

    connect: float
    read: float


@dataclass(frozen=True)
class Key:
    """One configuration key; ``kind`` is str, int, bool, Path, Timeout or dict (text to text)."""

    name: str
    kind: type
    default: Any
    help: str
    secret: bool = False
    minimum: int | None = None
    maximum: int | None = None
    aliases: tuple[str, ...] = ()
    optional: bool = False  # the value may be None ("off")

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` has this key's type (after parsing), so code cannot put a string in an int."""
        if value is None:
            return self.optional
        if self.kind is int:
            return type(value) is int
        if self.kind is dict:
            return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        if self.kind is Timeout:
            return isinstance(value, Timeout)
        return isinstance(value, self.kind)


KEYS: tuple[Key, ...] = (
    Key(
        "SECRET_KEY",
        str,
        "",
        "Keys pseudonyms, UID remapping and Django sessions; keep it secret and stable.",
        secret=True,
    ),
    Key("DEBUG", bool, False, "Django debug mode; never in production."),
    Key("LOG_LEVEL", str, "INFO", "Sendit's log lines from this level on: DEBUG, INFO, WARNING or ERROR."),
    Key(
        "LOG_FORMAT",
        str,
        "text",
        'Log lines as "text" or "json" (one object per line: time, level, logger, message).',
    ),
    Key("DATA_DIR", Path, "sendit-data", "Root for input, work, quarantine, database and queue."),
    Key("INPUT_FOLDER", Path, "", "Watched folder (default DATA_DIR/input)."),
    Key(
        "OUTPUT_FOLDER",
        Path,
        "",
        'Folder destination (default DATA_DIR/output); set to "off" to disable.',
        optional=True,
    ),
    Key(
        "WORK_FOLDER",
        Path,
        "",
        "Per-series working copies (default DATA_DIR/work); with STORAGE_URL, each host's own local scratch.",
    ),
    Key("QUARANTINE_FOLDER", Path, "", "Rejected and quarantined files (default DATA_DIR/quarantine)."),
    # -- where originals wait for a worker (docs/operations.md, Scaling out) --
    Key(
        "STORAGE_URL",
        str,
        "",
        "Originals: empty = read in the input folder (one host, or a shared folder); s3://bucket/prefix = "
        "uploaded at ingest, so workers on any host need no shared folder; file:///folder = a folder store.",
    ),
    Key("S3_ENDPOINT_URL", str, "", "S3 endpoint for a store other than AWS (MinIO, Ceph): https://host:port."),
    Key("S3_REGION", str, "", "S3 region (empty: boto3's default)."),
    Key("S3_ACCESS_KEY_ID", str, "", "S3 access key id (empty: boto3's chain, e.g. AWS_ACCESS_KEY_ID, a role)."),
    Key("S3_SECRET_ACCESS_KEY", str, "", "S3 secret access key (empty: boto3's chain).", secret=True),
    # The URLs are shown with their password masked (``mask_url``): host and name matter to an operator.
    Key("DATABASE_URL", str, "", "sqlite:///path or postgres://user@host:port/name (default SQLite in DATA_DIR)."),
    Key("QUEUE_URL", str, "", "sqlite:///path, redis://host:port/db or rediss:// (TLS) (default SQLite in DATA_DIR)."),
    Key("WORKERS", int, 5, "Worker processes started by `sendit worker` and `sendit run`.", minimum=1, maximum=64),
    Key("BATCH_SIZE", int, 200, "Images handled per step of a series task.", minimum=1, maximum=100000),
    Key(
        "PART_SIZE",
        int,
        500,
        "A series with more images than this to de-identify is split into parts of this many, each"
        " de-identified and delivered by any free worker; 0 never splits.",
        minimum=0,
        maximum=1000000,
    ),
    Key("DEIDENTIFY_RESTFUL", bool, False, "Ask the REST identifier service instead of the local keyed provider."),
    Key("IDENTIFIER_PROVIDER", str, "", "Dotted path of a provider class; overrides DEIDENTIFY_RESTFUL."),
    Key(
        "DATE_SHIFT_MIN_DAYS",
        int,
        -365,
        "Local provider: smallest date shift in days (0 is never used).",
        minimum=-36500,
        maximum=36500,
    ),
    Key(
        "DATE_SHIFT_MAX_DAYS",
        int,
        -1,
        "Local provider: largest date shift in days (0 is never used).",
        minimum=-36500,
        maximum=36500,
    ),
    # -- de-identification (docs/deidentification.md) --
    Key(
        "DEID_OPTIONS",
        str,
        "retain_long_modified_dates",
        "Comma list of PS3.15 options on top of the Basic Profile (e.g. retain_patient_characteristics, "
        "clean_descriptors); the list is complete: leave out retain_long_modified_dates to remove dates.",
    ),
    Key("DEID_RECIPE", str, "", "A deid recipe (pydicom/deid format) layered on the profile: %header and %filter."),
    Key(
        "DEID_FILTER",
        str,
        "default",
        'Burned-in text filter: "default" (shipped), "none", or a deid recipe file with %filter sections.',
    ),
    Key(
        "OCR",
        bool,
        True,
        "Read the images the burned-in text filter flags with OCR (tesseract); off: they are quarantined.",
    ),
    Key(
        "OCR_ON_TEXT",
        str,
        "quarantine",
        'When OCR finds text in a flagged image: "quarantine" it for review, or "blank" its lines and release it.',
    ),
    Key(
        "OCR_EVERY_NTH_FRAME",
        int,
        0,
        "Multi-frame images: OCR the first frame only (0), or frames 0, N, 2N, ...",
        minimum=0,
        maximum=100000,
    ),
    Key(
        "OCR_MAX_SIDE",
        int,
        1024,
        "Frames are scaled down to this many pixels on their longer side before OCR (bounds its time).",
        minimum=64,
        maximum=16384,
    ),
    Key(
        "OCR_RELEASE_CONFIDENCE",
        int,
        35,
        "Per cent: a flagged image in which OCR finds no text is released only when OCR is at least this sure.",
        minimum=0,
        maximum=100,
    ),
    # -- the identifier service (docs/identifiers.md); checked as a whole when DEIDENTIFY_RESTFUL is on --
    Key("DASHER_URL", str, "", "Identifier service base URL (requests go to {DASHER_URL}/uid/{DASHER_STUDY})."),
    Key("DASHER_STUDY", str, "", "Study name in the identifier service."),
    Key("DASHER_TOKEN", str, "", "Bearer token (prefer DASHER_TOKEN_FILE).", secret=True),
    Key("DASHER_TOKEN_FILE", str, "", "File holding the bearer token, read before every call."),
    Key("DASHER_TOKEN_URL", str, "", "OAuth2 token endpoint used to refresh the token after a 401."),
    Key("DASHER_CLIENT_ID", str, "", "OAuth2 client id (client-credentials grant)."),
    Key("DASHER_CLIENT_SECRET", str, "", "OAuth2 client secret.", secret=True),
    Key("DASHER_REFRESH_TOKEN", str, "", "OAuth2 refresh token (refresh-token grant).", secret=True),
    Key("DASHER_ID_SOURCE", str, "Stanford MRN", "id_source sent with each PatientID."),
    Key("DASHER_ITEM_ID_SOURCE", str, "Stanford Accession", "id_source sent with each AccessionNumber."),
    Key("DASHER_TIMEOUT", Timeout, Timeout(5.0, 30.0), 'Seconds: one number, or "connect,read".'),
    Key("DASHER_MAX_ATTEMPTS", int, 4, "Tries per request on 5xx and time-outs.", minimum=1, maximum=20),
    Key("DASHER_MAX_ITEMS", int, 100, "Items per request; a larger study is split.", minimum=1, maximum=100000),
    # DASHER itself draws jitter from [-33, -3] and [3, 33]. The bound is a sanity check, not a policy:
    # ten years lets any real configuration through and still rejects garbage such as seconds for days.
    Key(
        "DASHER_JITTER_BOUND",
        int,
        3650,
        "Largest accepted jitter in days, either way.",
        minimum=1,
        maximum=36500,
    ),
    Key("PATIENT_NAME_FORMAT", str, "{suid}", "PatientName from the response (placeholders: docs/identifiers.md)."),
    Key(
        "CUSTOM_FIELD_MAP",
        dict,
        {},
        "Custom field name -> DICOM keyword: a TOML table, or a JSON object in the environment.",
    ),
    Key("SEND_TO_ORTHANC", bool, False, "Deliver to Orthanc over DICOM (C-STORE)."),
    Key("ORTHANC_IPADDRESS", str, "127.0.0.1", "Orthanc's DICOM host."),
    Key("ORTHANC_PORT", int, 4242, "Orthanc's DICOM port.", minimum=1, maximum=65535, aliases=("ORTHAC_PORT",)),
    Key("ORTHANC_AET", str, "ORTHANC", "Called AE title."),
    Key("SENDIT_AET", str, "SENDIT", "Calling AE title."),
    Key(
        "ORTHANC_MAX_PDU",
        int,
        131072,
        "Largest PDU we accept over DICOM (bytes; 0 = unlimited).",
        minimum=0,
        maximum=2**32 - 1,
    ),
    Key(
        "ORTHANC_TIMEOUT",
        int,
        30,
        "Seconds to wait for Orthanc (association, each DIMSE reply, each HTTP reply).",
        minimum=1,
        maximum=3600,
    ),
    Key("ORTHANC_URL", str, "", "Orthanc's REST base URL; when set, images go through POST /instances."),
    Key("ORTHANC_USERNAME", str, "", "Basic-auth user for ORTHANC_URL."),
    Key("ORTHANC_PASSWORD", str, "", "Basic-auth password for ORTHANC_URL.", secret=True),
    Key("SEND_TO_GOOGLE", bool, False, "Deliver to Google Cloud Storage, with series metadata in Datastore."),
    Key("GOOGLE_CLOUD_STORAGE", str, "", "Bucket name (needed with SEND_TO_GOOGLE)."),
    Key(
        "GOOGLE_APPLICATION_CREDENTIALS",
        str,
        "",
        "Service-account JSON key file (empty: the environment's default credentials).",
        secret=True,
    ),
    Key("GOOGLE_PROJECT", str, "", "Google Cloud project of Datastore (empty: the credentials' project)."),
    Key("GOOGLE_STORAGE_PREFIX", str, "", "Object name prefix in the bucket (e.g. a collection name); may be empty."),
    Key("GOOGLE_DATASTORE_KIND", str, "SenditSeries", "Datastore kind of the per-series metadata entities."),
    Key("GOOGLE_NIFTI", bool, False, "Also upload each image series as compressed NIfTI (dcm2niix) with its sidecar."),
    Key(
        "GOOGLE_TIMEOUT",
        int,
        60,
        "Seconds for each Google request, retries with back-off included (429, 5xx, time-outs).",
        minimum=1,
        maximum=3600,
    ),
    Key("KEEP_ORIGINALS", bool, False, "Keep the original files after DONE (moved to DATA_DIR/kept)."),
    Key("KEEP_WORKING", bool, False, "Keep de-identified working copies after DONE."),
    Key(
        "RETENTION_DAYS",
        int,
        30,
        "Prune finished rows older than this, keeping a PHI-free summary.",
        minimum=0,
        maximum=36500,
    ),
    Key("RESCAN_SECONDS", int, 30, "Safety-net rescan of the input folder.", minimum=1, maximum=86400),
    Key(
        "STABLE_SECONDS",
        int,
        5,
        "A file is taken once nothing in its folder changed this long (a `.tmp` rename: at once); 0 = at once.",
        minimum=0,
        maximum=3600,
    ),
    Key("LEASE_SECONDS", int, 600, "A series whose worker is silent this long is requeued.", minimum=10, maximum=86400),
    Key(
        "HEARTBEAT_SECONDS",
        int,
        5,
        "How often each worker process writes its heartbeat; a lease holder silent for 3 periods is dead.",
        minimum=1,
        maximum=10,  # 3 periods stay within the dashboard's 30 s window of live workers
    ),
    Key(
        "STOP_GRACE_SECONDS",
        int,
        20,
        "A graceful stop waits this long for workers to finish their step, then interrupts them.",
        minimum=1,
        maximum=3600,  # the systemd unit's TimeoutStopSec must stay above it plus 10 s
    ),
    Key("MAX_ATTEMPTS", int, 8, "Tries of a failing step before the images go to ERROR.", minimum=1, maximum=100),
    Key("RETRY_BASE_SECONDS", int, 5, "First back-off; doubles with each attempt.", minimum=0, maximum=3600),
    Key("RETRY_CAP_SECONDS", int, 600, "Longest back-off.", minimum=0, maximum=86400),
    Key(
        "LOW_SPACE_MB",
        int,
        1024,
        "Warn (dashboard, /health, /metrics) when a folder Sendit writes has less free space (MiB); 0 = never.",
        minimum=0,
        maximum=1 << 30,
    ),
    Key("WEB_HOST", str, "127.0.0.1", "Address of the web server of `sendit run`."),
    Key(
        "HTTPS",
        bool,
        False,
        "The web server is reached over HTTPS (through a proxy setting X-Forwarded-Proto): secure cookies.",
    ),
    Key("WEB_PORT", int, 8000, "Port of the web server of `sendit run`.", minimum=1, maximum=65535),
    Key("ALLOWED_HOSTS", str, "127.0.0.1,localhost", "Comma-separated host names the web server answers."),
    # -- alerts (docs/operations.md, Alerts) --
    Key(
        "SITE_URL",
        str,
        "",
        "The dashboard's address as people reach it (https://sendit.example.org), for links in alerts.",
    ),
    Key(
        "ALERT_WEBHOOK_URL",
        str,
        "",
        "POST a JSON alert here (series ERROR or QUARANTINED, destination unreachable, low space); empty = off.",
        secret=True,
    ),
    Key("ALERT_EMAIL_TO", str, "", "Comma-separated addresses that get the alerts by e-mail; empty = off."),
    Key("ALERT_EMAIL_FROM", str, "sendit@localhost", "Sender address of alert e-mails."),
    Key(
        "ALERT_UNREACHABLE_MINUTES",
        int,
        10,
        "Alert when a destination has not answered for this long; 0 = never.",
        minimum=0,
        maximum=10080,
    ),
    Key(
        "EMAIL_BACKEND",
        str,
        "smtp",
        "Django mail backend for alerts: smtp, console (to the log stream), or a dotted backend class.",
    ),
    Key("EMAIL_HOST", str, "localhost", "SMTP server for alert e-mails."),
    Key("EMAIL_PORT", int, 25, "SMTP port.", minimum=1, maximum=65535),
    Key("EMAIL_HOST_USER", str, "", "SMTP user name; empty = no login."),
    Key("EMAIL_HOST_PASSWORD", str, "", "SMTP password.", secret=True),
    Key("EMAIL_USE_TLS", bool, False, "SMTP with STARTTLS."),
    # -- the C-STORE listener of `sendit run` (README, Receiving over DICOM) --
    Key(
        "LISTEN_PORT",
        int,
        0,
        "DICOM port of the C-STORE listener started by `sendit run`; 0 = no listener.",
        minimum=0,
        maximum=65535,
    ),
    Key("LISTEN_HOST", str, "127.0.0.1", "Address the listener binds (0.0.0.0 = every interface)."),
    Key("LISTEN_AET", str, "SENDIT", "The listener's AE title (the called AE title senders must use)."),
    Key(
        "ALLOWED_CALLERS",
        str,
        "",
        "Comma list of calling AE titles the listener accepts, each optionally AET@host; any other is rejected.",
    ),
    Key(
        "SERIES_IDLE_SECONDS",
        int,
        30,
        "A received series is complete once none of its instances arrived for this long.",
        minimum=1,
        maximum=86400,
    ),
    Key("LISTEN_TLS_CERT", str, "", "PEM certificate (chain) for DICOM over TLS on the listener; empty = no TLS."),
    Key("LISTEN_TLS_KEY", str, "", "PEM private key of LISTEN_TLS_CERT (if not in the same file)."),
    Key("LISTEN_TLS_CA", str, "", "PEM CA bundle: when set, callers must present a certificate it signed."),
    Key(
        "STORAGE_COMMITMENT",
        bool,
        False,
        "Verify DICOM deliveries by N-ACTION storage commitment (the report comes to the listener) instead of C-FIND.",
    ),
    Key(
        "STORAGE_COMMITMENT_SECONDS",
        int,
        60,
        "How long a worker waits for the peer's storage commitment report.",
        minimum=1,
        maximum=3600,
    ),
    # -- the DICOMweb destination (docs/destinations.md) --
    Key("DICOMWEB_URL", str, "", "DICOMweb base URL (STOW-RS to {url}/studies, QIDO-RS to verify); empty = off."),
    Key("DICOMWEB_USERNAME", str, "", "Basic-auth user for DICOMWEB_URL."),
    Key("DICOMWEB_PASSWORD", str, "", "Basic-auth password for DICOMWEB_URL.", secret=True),
    Key("DICOMWEB_TOKEN", str, "", "Bearer token for DICOMWEB_URL (instead of a user and password).", secret=True),
    Key(
        "DICOMWEB_GOOGLE_CREDENTIALS",
        str,
        "",
        "Service-account JSON for Google's Cloud Healthcare API: tokens from google-auth (sendit[google]).",
    ),
    Key(
        "DICOMWEB_BATCH",
        int,
        20,
        "Instances per STOW-RS request (one multipart/related body).",
        minimum=1,
        maximum=1000,
    ),
    Key(
        "DICOMWEB_TIMEOUT",
        int,
        60,
        "Seconds to wait for each DICOMweb answer (the connect: at most 5 s).",
        minimum=1,
        maximum=3600,
    ),
)
KEYS_BY_NAME = {key.name: key for key in KEYS}
ALIASES = {alias: key.name for key in KEYS for alias in key.aliases}

# SENDIT_* variables that are not keys but are read on purpose. Any other SENDIT_* variable is refused
# as a misspelt key. "Unknown" means read neither by Sendit nor by its own scripts and tests: the shell
# that runs the test suite holds the latter, and the suite loads this configuration from it.
OTHER_VARIABLES: dict[str, str] = {
    "SENDIT_CONFIG": "path of sendit.toml (sendit)",
    "SENDIT_TEST_POSTGRES_URL": "PostgreSQL for the database tests (scripts/test.sh)",
    "SENDIT_TEST_REDIS_URL": "Redis for the database tests (scripts/test.sh)",
    "SENDIT_UPDATE_SCREENSHOTS": "rewrite docs/screenshots (tests/test_browser.py)",
}


class Original(NamedTuple):
    """A setting of the original project (pydicom/sendit) that is not a key here, and what does its job."""

    replaced_by: str  # our key, or "" when nothing is needed
    note: str

    def advice(self) -> str:
        if self.replaced_by:
            return f"replaced by {self.replaced_by}" + (f" ({self.note})" if self.note else "")
        return f"not needed: {self.note}"


# The original's settings/config.py and secrets.py over its history; those with our name (SECRET_KEY,
# DEBUG, DEIDENTIFY_RESTFUL, SEND_TO_ORTHANC, ORTHANC_*, ORTHAC_PORT, SEND_TO_GOOGLE, GOOGLE_CLOUD_STORAGE,
# GOOGLE_APPLICATION_CREDENTIALS) are keys. docs/configuration.md has the table; a test keeps it in step.
_PIXELS = "on by default: an image that may show burned-in text is read by OCR, released only if none is found"
_DASHER_CREDENTIALS = "or DASHER_TOKEN_URL with DASHER_CLIENT_ID and DASHER_CLIENT_SECRET; docs/identifiers.md"
ORIGINAL_SETTINGS: dict[str, Original] = {
    "ANONYMIZE_RESTFUL": Original("DEIDENTIFY_RESTFUL", ""),
    "SOM_STUDY": Original("DASHER_STUDY", "the study name sent to the identifier service"),
    "STANFORD_APPLICATION_CREDENTIALS": Original("DASHER_TOKEN_FILE", _DASHER_CREDENTIALS),
    "STANFORD_CLIENT_SECRETS": Original("DASHER_TOKEN_FILE", _DASHER_CREDENTIALS),
    "DEIDENTIFY_PIXELS": Original("DEID_FILTER", _PIXELS),
    "ANONYMIZE_PIXELS": Original("DEID_FILTER", _PIXELS),
    "STUDY_DEID": Original("DEID_RECIPE", "a pydicom/deid recipe file; its %filter sections may go in DEID_FILTER"),
    "ENTITY_ID": Original("", "the entity is always PatientID; DASHER_ID_SOURCE names its id_source"),
    "ITEM_ID": Original("", "the item is always AccessionNumber; DASHER_ITEM_ID_SOURCE names its id_source"),
    "DATA_BASE": Original("INPUT_FOLDER", "the watched folder; DATA_DIR holds Sendit's own folders"),
    "DATA_SUBFOLDER": Original("INPUT_FOLDER", "the watched folder itself, e.g. /data/1_6"),
    "DATA_INPUT_FOLDERS": Original("INPUT_FOLDER", "one watched folder; `sendit import PATH...` takes others"),
    "GOOGLE_STORAGE_COLLECTION": Original("GOOGLE_STORAGE_PREFIX", "the folder of the bucket objects go under"),
    "GOOGLE_PROJECT_NAME": Original("GOOGLE_PROJECT", "the project of Datastore"),
    "GOOGLE_PROJECT_ID_HEADER": Original(
        "", "objects are named by pseudonym and de-identified UIDs (docs/destinations.md)"
    ),
    "RUN_SERIAL": Original("WORKERS", "WORKERS = 1 works on one series at a time"),
    "LOCKDOWN_PASSWORDS": Original("", "the dashboard has its own accounts (`sendit createuser`)"),
}

_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s/@:]*):\S*@")


def mask_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it shown as ``***``.

    Up to the last ``@`` of the word: a password holding an unescaped ``@`` or ``/`` is masked too,
    and at worst a path with an ``@`` is masked with it."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


@dataclass(frozen=True, repr=False)
class Config:
    """The validated configuration: one typed attribute per key of ``KEYS``, in the same order.

    A plain dataclass rather than a lookup by name, so that mypy rejects ``cfg.ORTHANC_PROT``;
    ``tests/test_config.py`` checks that the fields and ``KEYS`` agree in name and type, and
    ``__post_init__`` refuses a value of the wrong type (a test's ``replace(cfg, WORKERS="3")``).
    Build one with ``load_config`` (or ``Config.from_values``); change one with ``dataclasses.replace``.
    """

    SECRET_KEY: str
    DEBUG: bool
    LOG_LEVEL: str
    LOG_FORMAT: str
    DATA_DIR: Path
    INPUT_FOLDER: Path
    OUTPUT_FOLDER: Path | None
    WORK_FOLDER: Path
    QUARANTINE_FOLDER: Path
    STORAGE_URL: str
    S3_ENDPOINT_URL: str
    S3_REGION: str
    S3_ACCESS_KEY_ID: str
    S3_SECRET_ACCESS_KEY: str
    DATABASE_URL: str
    QUEUE_URL: str
    WORKERS: int
    BATCH_SIZE: int
    PART_SIZE: int
    DEIDENTIFY_RESTFUL: bool
    IDENTIFIER_PROVIDER: str
    DATE_SHIFT_MIN_DAYS: int
    DATE_SHIFT_MAX_DAYS: int
    DEID_OPTIONS: str
    DEID_RECIPE: str
    DEID_FILTER: str
    OCR: bool
    OCR_ON_TEXT: str
    OCR_EVERY_NTH_FRAME: int
    OCR_MAX_SIDE: int
    OCR_RELEASE_CONFIDENCE: int
    DASHER_URL: str
    DASHER_STUDY: str
    DASHER_TOKEN: str
    DASHER_TOKEN_FILE: str
    DASHER_TOKEN_URL: str
    DASHER_CLIENT_ID: str
    DASHER_CLIENT_SECRET: str
    DASHER_REFRESH_TOKEN: str
    DASHER_ID_SOURCE: str
    DASHER_ITEM_ID_SOURCE: str
    DASHER_TIMEOUT: Timeout
    DASHER_MAX_ATTEMPTS: int
    DASHER_MAX_ITEMS: int
    DASHER_JITTER_BOUND: int
    PATIENT_NAME_FORMAT: str
    CUSTOM_FIELD_MAP: dict[str, str]
    SEND_TO_ORTHANC: bool
    ORTHANC_IPADDRESS: str
    ORTHANC_PORT: int
    ORTHANC_AET: str
    SENDIT_AET: str
    ORTHANC_MAX_PDU: int
    ORTHANC_TIMEOUT: int
    ORTHANC_URL: str
    ORTHANC_USERNAME: str
    ORTHANC_PASSWORD: str
    SEND_TO_GOOGLE: bool
    GOOGLE_CLOUD_STORAGE: str
    GOOGLE_APPLICATION_CREDENTIALS: str
    GOOGLE_PROJECT: str
    GOOGLE_STORAGE_PREFIX: str
    GOOGLE_DATASTORE_KIND: str
    GOOGLE_NIFTI: bool
    GOOGLE_TIMEOUT: int
    KEEP_ORIGINALS: bool
    KEEP_WORKING: bool
    RETENTION_DAYS: int
    RESCAN_SECONDS: int
    STABLE_SECONDS: int
    LEASE_SECONDS: int
    HEARTBEAT_SECONDS: int
    STOP_GRACE_SECONDS: int
    MAX_ATTEMPTS: int
    RETRY_BASE_SECONDS: int
    RETRY_CAP_SECONDS: int
    LOW_SPACE_MB: int
    WEB_HOST: str
    HTTPS: bool
    WEB_PORT: int
    ALLOWED_HOSTS: str
    SITE_URL: str
    ALERT_WEBHOOK_URL: str
    ALERT_EMAIL_TO: str
    ALERT_EMAIL_FROM: str
    ALERT_UNREACHABLE_MINUTES: int
    EMAIL_BACKEND: str
    EMAIL_HOST: str
    EMAIL_PORT: int
    EMAIL_HOST_USER: str
    EMAIL_HOST_PASSWORD: str
    EMAIL_USE_TLS: bool
    LISTEN_PORT: int
    LISTEN_HOST: str
    LISTEN_AET: str
    ALLOWED_CALLERS: str
    SERIES_IDLE_SECONDS: int
    LISTEN_TLS_CERT: str
    LISTEN_TLS_KEY: str
    LISTEN_TLS_CA: str
    STORAGE_COMMITMENT: bool
    STORAGE_COMMITMENT_SECONDS: int
    DICOMWEB_URL: str
    DICOMWEB_USERNAME: str
    DICOMWEB_PASSWORD: str
    DICOMWEB_TOKEN: str
    DICOMWEB_GOOGLE_CREDENTIALS: str
    DICOMWEB_BATCH: int
    DICOMWEB_TIMEOUT: int
    source: Path | None = field(default=None, kw_only=True)  # the file read, if any

    def __post_init__(self) -> None:
        wrong = [key.name for key in KEYS if not key.accepts(getattr(self, key.name))]
        if wrong:  # names and types only: a value may be a secret
            raise TypeError(f"configuration values of the wrong type: {', '.join(wrong)}")

    @classmethod
    def from_values(cls, values: Mapping[str, Any], source: Path | None = None) -> Config:
        """From a mapping holding exactly the keys of ``KEYS``, each already of its type."""
        unknown = sorted(set(values) - set(KEYS_BY_NAME))
        if unknown:
            raise TypeError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**values, source=source)

    @property
    def values(self) -> dict[str, Any]:
        """A copy of every value by key name: for code that walks the keys, and for provider plug-ins."""
        return {key.name: getattr(self, key.name) for key in KEYS}

    def masked(self) -> dict[str, str]:
        """The effective values for display; secrets shown as set / not set, passwords in URLs as ``***``."""
        result: dict[str, str] = {}
        for key in KEYS:
            value = getattr(self, key.name)
            if key.secret:
                result[key.name] = "****** (set)" if value else "(not set)"
            else:
                result[key.name] = mask_url(shown(key, value))
        return result

    def __repr__(self) -> str:
        return f"Config(source={self.source!r}, ...)"  # never the values: some are secrets


def shown(key: Key, value: Any) -> str:
    """A value as the operator writes it (``false``, ``5,30``, ``{}``, ``off``), for display and docs."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "true" if value else "false"
    if key.kind is Timeout and isinstance(value, tuple):
        return ",".join(f"{seconds:g}" for seconds in value)
    if isinstance(value, Mapping):
        return json.dumps(dict(value))
    return str(value)


def _parse(key: Key, raw: Any, origin: str) -> tuple[Any, str | None]:
    """Turn a TOML or environment value into the key's type; the error line never echoes a secret."""
    shown = "<hidden>" if key.secret else repr(raw)
    if key.kind is bool:
        if isinstance(raw, bool):
            return raw, None
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True, None
        if text in ("0", "false", "no", "off", ""):
            return False, None
        return None, f"{origin}: must be true or false, got {shown}"
    if key.kind is int:
        if isinstance(raw, bool):
            return None, f"{origin}: must be a whole number, got {shown}"
        try:
            number = int(str(raw).strip())
        except ValueError:
            return None, f"{origin}: must be a whole number, got {shown}"
        if key.minimum is not None and number < key.minimum or key.maximum is not None and number > key.maximum:
            return None, f"{origin}: must be between {key.minimum} and {key.maximum}, got {number}"
        return number, None
    if key.kind is Timeout:
        return _parse_timeout(raw, origin, shown)
    if key.kind is dict:
        return _parse_text_map(raw, origin, shown)
    if not isinstance(raw, str | int | float) or isinstance(raw, bool):
        return None, f"{origin}: must be a string, got {type(raw).__name__}"
    return str(raw), None


def _parse_timeout(raw: Any, origin: str, shown: str) -> tuple[Timeout | None, str | None]:
    """One number for both, or ``connect,read`` (text or a TOML array), because the two differ in practice."""
    wrong = f'{origin}: must be seconds, one number or "connect,read", got {shown}'
    parts = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list | tuple) else [raw]
    if not 1 <= len(parts) <= 2:
        return None, wrong
    seconds: list[float] = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, str | int | float):
            return None, wrong
        try:
            seconds.append(float(part))
        except ValueError:
            return None, wrong
    if not all(math.isfinite(s) and s > 0 for s in seconds):
        return None, f"{origin}: must be greater than 0 seconds, got {shown}"
    return Timeout(seconds[0], seconds[-1]), None


def _parse_text_map(raw: Any, origin: str, shown: str) -> tuple[dict[str, str] | None, str | None]:
    """A TOML table, or a JSON object in text (the environment can only hold text)."""
    wrong = f"{origin}: must be a JSON object (or TOML table) of text values, got {shown}"
    if isinstance(raw, str):
        if not raw.strip():
            return {}, None
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None, wrong
    if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
        return None, wrong
    return {str(k): v for k, v in raw.items()}, None


def find_config_file(explicit: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get("SENDIT_CONFIG"):
        return Path(env["SENDIT_CONFIG"])
    candidate = Path.cwd() / CONFIG_FILE
    return candidate if candidate.exists() else None


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None, require_secret: bool = True
) -> Config:
    """Read the file (if any), apply the environment, fill derived defaults and validate everything."""
    env = os.environ if env is None else env
    source = find_config_file(path, env)
    file_values: dict[str, Any] = {}
    problems: list[str] = []
    if source is not None:
        try:
            with open(source, "rb") as handle:
                file_values = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError([f"{source}: configuration file not found"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: not valid TOML ({exc})"]) from None
    base = source.parent.resolve() if source is not None else Path.cwd()
    # No file and no key in the environment: the operator is in the wrong folder (or never ran init).
    no_file = source is None and require_secret and not env.get(ENV_PREFIX + "SECRET_KEY")
    if no_file:
        problems.append(
            f"no {CONFIG_FILE} in {Path.cwd()} (and neither --config nor SENDIT_CONFIG names one):"
            f" run `sendit init` to write one, or run sendit in the folder that holds it"
        )
    problems.extend(_unknown_names(file_values, f"{source}: ", ""))
    problems.extend(_unknown_names(env, "", ENV_PREFIX))
    problems.extend(_alias_conflicts(file_values, f"{source}: ", ""))
    problems.extend(_alias_conflicts(env, "", ENV_PREFIX))
    values: dict[str, Any] = {}
    for key in KEYS:
        raw: Any = key.default
        origin = key.name
        for name in (key.name, *key.aliases):
            if name in file_values:
                raw, origin = file_values[name], f"{source}: {name}"
                break
        for name in (key.name, *key.aliases):
            if ENV_PREFIX + name in env:
                raw, origin = env[ENV_PREFIX + name], ENV_PREFIX + name
                break
        if key.name == "DATABASE_URL" and ENV_PREFIX + key.name not in env and env.get("DATABASE_URL"):
            raw, origin = env["DATABASE_URL"], "DATABASE_URL"
        value, problem = _parse(key, raw, origin)
        if problem:
            problems.append(problem)
        values[key.name] = value
    if problems:
        raise ConfigError(problems)
    _derive(values, base)
    problems.extend(_check(values, require_secret))
    if problems:
        raise ConfigError(problems)
    return Config.from_values(values, source)


def _unknown_names(names: Mapping[str, Any], where: str, prefix: str) -> list[str]:
    """A line for each name (of the file, or of the environment under ``prefix``) that is no key: the
    original project's settings say what does their job here, others get the closest key as a "did you
    mean". The variables of ``OTHER_VARIABLES`` pass."""
    known = set(KEYS_BY_NAME) | set(ALIASES)
    problems: list[str] = []
    for full in sorted(names):
        if not full.startswith(prefix) or full in OTHER_VARIABLES:
            continue
        name = full[len(prefix) :]
        if name in known:
            continue
        if name in ORIGINAL_SETTINGS:
            problems.append(f"{where}{full}: a setting of the original sendit; {ORIGINAL_SETTINGS[name].advice()}")
            continue
        if prefix and full in known:  # SENDIT_AET is a key itself: its variable is SENDIT_SENDIT_AET
            guess: str | None = full
        else:
            close = difflib.get_close_matches(name.upper(), sorted(KEYS_BY_NAME), n=1, cutoff=0.7)
            guess = close[0] if close else None
        hint = f"; did you mean {prefix}{guess}?" if guess else " (the README's Configuration table lists the keys)"
        problems.append(f"{full}: unknown setting{hint}" if prefix else f"{where}unknown key {full}{hint}")
    return problems


def _alias_conflicts(names: Mapping[str, Any], where: str, prefix: str) -> list[str]:
    """A key set under its own name and its alias (ORTHANC_PORT, ORTHAC_PORT) to different values: which
    one was meant is a guess, so neither is taken."""
    problems: list[str] = []
    for key in KEYS:
        given = [(prefix + name, names[prefix + name]) for name in (key.name, *key.aliases) if prefix + name in names]
        if len({str(value).strip() for _, value in given}) > 1:
            (own, mine), *others = given
            both = ", ".join(f"{alias} = {'<hidden>' if key.secret else value}" for alias, value in others)
            problems.append(
                f"{where}{both} differs from {own} = {'<hidden>' if key.secret else mine}"
                f" ({', '.join(alias for alias, _ in others)} is the original project's spelling);"
                f" did you mean {own} alone?"
            )
    return problems


def _derive(values: dict[str, Any], base: Path) -> None:
    data_dir = (base / values["DATA_DIR"]).resolve()
    values["DATA_DIR"] = data_dir
    for name, default in (
        ("INPUT_FOLDER", "input"),
        ("WORK_FOLDER", "work"),
        ("QUARANTINE_FOLDER", "quarantine"),
        ("OUTPUT_FOLDER", "output"),
    ):
        raw = str(values[name]).strip()
        if KEYS_BY_NAME[name].optional and raw.lower() in ("off", "none", "false"):
            values[name] = None
        else:
            values[name] = (base / raw).resolve() if raw else data_dir / default
    for name in ("DEID_RECIPE", "DEID_FILTER"):  # recipe paths are relative to the config file
        raw = str(values[name]).strip()
        if raw and raw.lower() not in ("default", "none"):
            values[name] = str((base / raw).resolve())
    if str(values["GOOGLE_APPLICATION_CREDENTIALS"]).strip():  # relative to the config file, like a recipe
        values["GOOGLE_APPLICATION_CREDENTIALS"] = str(
            (base / values["GOOGLE_APPLICATION_CREDENTIALS"].strip()).resolve()
        )
    if not values["DATABASE_URL"]:
        values["DATABASE_URL"] = f"sqlite:///{data_dir / 'sendit.sqlite3'}"
    if not values["QUEUE_URL"]:
        values["QUEUE_URL"] = f"sqlite:///{data_dir / 'queue.sqlite3'}"


def _check_folders(values: dict[str, Any]) -> list[str]:
    """The watched folder must not hold, nor sit inside, any folder or file Sendit writes itself:
    otherwise it would ingest its own output, working copies or database."""
    problems: list[str] = []
    watched: Path = values["INPUT_FOLDER"]
    data_dir: Path = values["DATA_DIR"]
    own = {
        name: Path(values[name])
        for name in ("WORK_FOLDER", "QUARANTINE_FOLDER", "OUTPUT_FOLDER")
        if values[name] is not None
    }
    own.update({"DATA_DIR/kept": data_dir / "kept", "DATA_DIR/skipped": data_dir / "skipped"})
    for url_key in ("DATABASE_URL", "QUEUE_URL"):
        if values[url_key].startswith("sqlite:///"):
            own[url_key] = Path(values[url_key][len("sqlite:///") :])
    for name, path in own.items():
        if path == watched or watched in path.parents or path in watched.parents:
            problems.append(f"INPUT_FOLDER: must not contain or lie inside {name} ({path})")
    return problems


def _check(values: dict[str, Any], require_secret: bool) -> list[str]:
    problems: list[str] = _check_folders(values)
    if (
        values["OUTPUT_FOLDER"] is None
        and not values["SEND_TO_ORTHANC"]
        and not values["ORTHANC_URL"]
        and not values["SEND_TO_GOOGLE"]
        and not values["DICOMWEB_URL"]
    ):
        problems.append(
            "OUTPUT_FOLDER: is off and no other destination is on (SEND_TO_ORTHANC, ORTHANC_URL, SEND_TO_GOOGLE,"
            " DICOMWEB_URL);"
            " images would be delivered nowhere"
        )
    if require_secret and len(values["SECRET_KEY"]) < 32:
        problems.append("SECRET_KEY: must be at least 32 characters (run `sendit init` to make one)")
    low, high = values["DATE_SHIFT_MIN_DAYS"], values["DATE_SHIFT_MAX_DAYS"]
    if low > high:
        problems.append(f"DATE_SHIFT_MIN_DAYS: must not exceed DATE_SHIFT_MAX_DAYS ({low} > {high})")
    elif low == high == 0:
        problems.append("DATE_SHIFT_MIN_DAYS/DATE_SHIFT_MAX_DAYS: the range holds only 0 days; dates would not move")
    for name, schemes in (
        ("DATABASE_URL", ("sqlite", "postgres", "postgresql")),
        ("QUEUE_URL", ("sqlite", "redis", "rediss")),
    ):
        scheme = values[name].split("://", 1)[0] if "://" in values[name] else ""
        if scheme not in schemes:
            problems.append(f"{name}: must start with one of {', '.join(s + '://' for s in schemes)}")
    storage = values["STORAGE_URL"]
    bucket = re.compile(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/|$)")  # S3 bucket naming rules; no credentials
    if storage and not (storage.startswith("file:///") or bucket.match(storage)):
        problems.append("STORAGE_URL: must be empty, s3://bucket/prefix or file:///folder (credentials go in S3_*)")
    if values["S3_ENDPOINT_URL"] and not values["S3_ENDPOINT_URL"].startswith(("http://", "https://")):
        problems.append("S3_ENDPOINT_URL: must start with http:// or https://")
    for name in ("ORTHANC_URL", "SITE_URL"):
        if values[name] and not values[name].startswith(("http://", "https://")):
            problems.append(f"{name}: must start with http:// or https://")
    if values["ALERT_WEBHOOK_URL"] and not values["ALERT_WEBHOOK_URL"].startswith(("http://", "https://")):
        problems.append("ALERT_WEBHOOK_URL: must start with http:// or https://")  # never the URL: it may hold a token
    backend = values["EMAIL_BACKEND"].strip()
    if backend not in EMAIL_BACKENDS and not re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", backend):
        problems.append(f"EMAIL_BACKEND: must be smtp, console or a dotted class path, got {backend!r}")
    problems.extend(_check_listener(values))
    if values["DICOMWEB_URL"] and not values["DICOMWEB_URL"].startswith(("http://", "https://")):
        problems.append("DICOMWEB_URL: must start with http:// or https://")
    chosen = [name for name in ("DICOMWEB_TOKEN", "DICOMWEB_USERNAME", "DICOMWEB_GOOGLE_CREDENTIALS") if values[name]]
    if len(chosen) > 1:
        problems.append(f"{chosen[0]}: set one way to log in to DICOMWEB_URL, not {' and '.join(chosen)}")
    if values["DEIDENTIFY_RESTFUL"] and not values["IDENTIFIER_PROVIDER"]:
        from sendit.identifiers.dasher.settings import DasherSettings

        try:
            DasherSettings.from_config(values)
        except ValueError as exc:
            problems.append(str(exc))
    problems.extend(_check_deid(values))
    problems.extend(_check_google(values))
    for name, allowed in (("LOG_LEVEL", LOG_LEVELS), ("LOG_FORMAT", LOG_FORMATS)):
        if values[name].strip().lower() not in (choice.lower() for choice in allowed):
            problems.append(f"{name}: must be one of {', '.join(allowed)}, got {values[name]!r}")
    if values["RETRY_BASE_SECONDS"] > values["RETRY_CAP_SECONDS"]:
        problems.append("RETRY_BASE_SECONDS: must not exceed RETRY_CAP_SECONDS")
    return problems


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")  # Cloud Storage's bucket naming rules, in short


def _check_google(values: dict[str, Any]) -> list[str]:
    """With SEND_TO_GOOGLE: a bucket name Storage would accept, a readable credentials file."""
    if not values["SEND_TO_GOOGLE"]:
        return []
    problems: list[str] = []
    bucket = values["GOOGLE_CLOUD_STORAGE"]
    if not bucket:
        problems.append("GOOGLE_CLOUD_STORAGE: needed with SEND_TO_GOOGLE = true (the bucket name)")
    elif not _BUCKET.match(bucket):
        problems.append("GOOGLE_CLOUD_STORAGE: not a bucket name (3-222 of a-z, 0-9, '.', '_', '-'), no gs:// or /")
    if values["GOOGLE_STORAGE_PREFIX"].startswith("/") or ".." in values["GOOGLE_STORAGE_PREFIX"].split("/"):
        problems.append("GOOGLE_STORAGE_PREFIX: must not start with / nor hold a '..' part")
    credentials = values["GOOGLE_APPLICATION_CREDENTIALS"]
    if credentials:
        try:
            json.loads(Path(credentials).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:  # the path only: the file is a secret
            problems.append(
                f"GOOGLE_APPLICATION_CREDENTIALS: cannot read {credentials}: "
                + (getattr(exc, "strerror", None) or "unreadable")
            )
        except ValueError:
            problems.append(f"GOOGLE_APPLICATION_CREDENTIALS: {credentials} is not a JSON key file")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,99}", values["GOOGLE_DATASTORE_KIND"]):
        problems.append("GOOGLE_DATASTORE_KIND: letters, digits and '_', starting with a letter")
    return problems


def _check_listener(values: dict[str, Any]) -> list[str]:
    """A listener needs callers to accept (else it would refuse everyone) and a complete TLS setting."""
    from sendit.relay.callers import parse_callers

    problems: list[str] = []
    try:
        callers = parse_callers(values["ALLOWED_CALLERS"])
    except ValueError as exc:
        return [f"ALLOWED_CALLERS: {exc}"]
    if values["LISTEN_PORT"] and not callers:
        problems.append("ALLOWED_CALLERS: LISTEN_PORT is set but no caller is allowed; name the senders' AE titles")
    if values["STORAGE_COMMITMENT"] and not (values["SEND_TO_ORTHANC"] and values["LISTEN_PORT"]):
        problems.append(
            "STORAGE_COMMITMENT: needs SEND_TO_ORTHANC (the DICOM destination it verifies) and LISTEN_PORT"
            " (the peer sends its report to the listener)"
        )
    if (values["LISTEN_TLS_KEY"] or values["LISTEN_TLS_CA"]) and not values["LISTEN_TLS_CERT"]:
        problems.append("LISTEN_TLS_CERT: LISTEN_TLS_KEY or LISTEN_TLS_CA is set but there is no certificate")
    return problems


def _check_deid(values: dict[str, Any]) -> list[str]:
    """DEID_OPTIONS names known options; DEID_RECIPE and DEID_FILTER load (errors name the line);
    OCR_ON_TEXT is one of its choices."""
    from sendit.deid.profile import DeidOptions
    from sendit.deid.recipe import RecipeError, load_recipe

    problems: list[str] = []
    try:
        DeidOptions.from_names(values["DEID_OPTIONS"].split(","))
    except ValueError as exc:
        problems.append(f"DEID_OPTIONS: {exc}")
    for name in ("DEID_RECIPE", "DEID_FILTER"):
        raw = str(values[name]).strip()
        if raw and raw.lower() not in ("default", "none"):
            try:
                load_recipe(raw)
            except RecipeError as exc:
                problems.append(f"{name}: {exc}")
    if str(values["DEID_RECIPE"]).strip().lower() in ("default", "none"):
        problems.append('DEID_RECIPE: give a recipe file, or leave it empty ("default" and "none" are for DEID_FILTER)')
    from sendit.deid.ocr import ON_TEXT_CHOICES

    if values["OCR_ON_TEXT"] not in ON_TEXT_CHOICES:
        problems.append(f"OCR_ON_TEXT: must be one of {', '.join(ON_TEXT_CHOICES)}, got {values['OCR_ON_TEXT']!r}")
    return problems


def write_config(directory: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """Write a commented sendit.toml with a fresh SECRET_KEY; refuses to overwrite an existing one."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CONFIG_FILE
    if target.exists():
        raise FileExistsError(f"{target} exists; not overwriting it")
    chosen: dict[str, Any] = {"SECRET_KEY": secrets.token_urlsafe(48), "DATA_DIR": "sendit-data"}
    chosen.update(overrides or {})
    lines = ["# Sendit configuration. Every key can be overridden as SENDIT_<KEY> in the environment.", ""]
    for key in KEYS:
        lines.append(f"# {key.help}")
        value = chosen.get(key.name, key.default)
        line = f"{key.name} = {_toml_value(key, value)}"
        lines.append(line if key.name in chosen else "# " + line)
        lines.append("")
    target.write_text("\n".join(lines), encoding="utf-8")
    target.chmod(0o600)
    return target


def _toml_value(key: Key, value: Any) -> str:
    """Numbers and booleans bare; everything else as a TOML string in the form the environment takes."""
    if isinstance(value, bool | int):
        return shown(key, value)
    text = shown(key, value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def database_settings(url: str) -> dict[str, Any]:
    """Django DATABASES['default'] for a sqlite:/// or postgres:// URL."""
    from urllib.parse import parse_qs, unquote, urlsplit

    if url.startswith("sqlite:///"):
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": url[len("sqlite:///") :],  # sqlite:////abs/path keeps its leading slash
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;",
            },
        }
    parts = urlsplit(url)
    # Query options (sslmode, sslrootcert, sslcert, sslkey, connect_timeout, …) are libpq's connection
    # parameters: they reach psycopg as they are, so TLS to a remote database is one URL.
    options = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "CONN_MAX_AGE": 60,
        "OPTIONS": options,
    }
