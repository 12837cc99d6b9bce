"""Django settings, all derived from Sendit's validated configuration (sendit.toml + SENDIT_* variables)."""

from __future__ import annotations

import json
import logging
import traceback
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from sendit.config import EMAIL_BACKENDS, ConfigError, database_settings, load_config

try:
    SENDIT = load_config()
except ConfigError as error:  # start-up refuses to run with a wrong value; the CLI prints the lines
    raise SystemExit("sendit: configuration problems:\n  " + "\n  ".join(error.problems)) from None

try:  # the installed package's own metadata: what `sendit --version`, the dashboard and /metrics show
    SENDIT_VERSION = package_version("sendit")
except PackageNotFoundError:  # run from a source tree that was never installed
    SENDIT_VERSION = "unknown"

SECRET_KEY = SENDIT.SECRET_KEY
DEBUG = SENDIT.DEBUG
ALLOWED_HOSTS = [host.strip() for host in SENDIT.ALLOWED_HOSTS.split(",") if host.strip()]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "ninja",  # serves the API docs' assets from the package instead of a CDN
    "sendit.relay",  # the models, the pipeline and the queue
    "sendit.web",  # the operator's pages, API and /metrics (templates and static files)
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "sendit.web.middleware.OutOfRangeMiddleware",  # an id too large for the database: 400, not 500
]

ROOT_URLCONF = "sendit.server.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "sendit.web.context.version",
            ]
        },
    }
]
WSGI_APPLICATION = "sendit.server.wsgi.application"

DATABASES = {"default": database_settings(SENDIT.DATABASE_URL)}

# Login and API-token throttling counts failures here (sendit.web.throttle). In process memory: `sendit
# run` serves the web from one process (threads share it); no table to create, and it still works when
# the database is full. Several web processes would each count on their own.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "LOCATION": "sendit",
        "OPTIONS": {"MAX_ENTRIES": 20000},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Django's user/password check, throttled after repeated failures (the login page and the admin's).
AUTHENTICATION_BACKENDS = ["sendit.web.throttle.ThrottledModelBackend"]
# alert e-mails (sendit.relay.alerts) through Django's mail backends
EMAIL_BACKEND = EMAIL_BACKENDS.get(SENDIT.EMAIL_BACKEND.strip(), SENDIT.EMAIL_BACKEND.strip())
EMAIL_HOST = SENDIT.EMAIL_HOST
EMAIL_PORT = SENDIT.EMAIL_PORT
EMAIL_HOST_USER = SENDIT.EMAIL_HOST_USER
EMAIL_HOST_PASSWORD = SENDIT.EMAIL_HOST_PASSWORD
EMAIL_USE_TLS = SENDIT.EMAIL_USE_TLS
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = SENDIT.ALERT_EMAIL_FROM

# `sendit createuser`, `sendit manage changepassword` and the admin's forms check new passwords
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

# Sessions and CSRF: cookies are never readable from JavaScript; with HTTPS they travel only over TLS.
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_AGE = 12 * 3600
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = bool(SENDIT.HTTPS)
if SENDIT.HTTPS:
    # behind a TLS-terminating proxy that sets X-Forwarded-Proto; only set HTTPS = true when one does
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"


def withheld_records() -> logging.Handler:
    """The handler for pydicom's and pynetdicom's loggers. Their records quote DICOM values: it
    counts them and writes nothing (a PHI-free count goes to the `sendit.dicomio` logger), and they
    never propagate to a handler of the root logger. Their warnings are the business of
    `sendit.dicomio.quiet.install_log_guard`, which also covers `py.warnings` should anything turn on
    `logging.captureWarnings`. (A factory: the dotted path `sendit.dicomio.quiet.X` does not resolve,
    the package's `quiet` is the function.)"""
    from sendit.dicomio.quiet import WithheldRecords

    return WithheldRecords()


class JsonLines(logging.Formatter):
    """``LOG_FORMAT = "json"``: one object per line for log collectors (time in UTC, level, logger,
    message). An exception adds its type and stack, never its text: an exception's text may quote a
    value (the text format keeps Python's usual traceback, as before)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["stack"] = "".join(traceback.format_tb(record.exc_info[2]))
        return json.dumps(entry)  # ASCII with escapes: a newline in a message never splits the line


class OneLineWarning(logging.Filter):
    """Django's security loggers report a client's fault (a Host header not in ALLOWED_HOSTS: a
    scanner, a wrong URL) at ERROR with a traceback; here it is one WARNING line, the message only
    (and none when ``LOG_LEVEL`` is ERROR: the handler's level saw the record's ERROR)."""

    def __init__(self, level: str = "WARNING") -> None:
        super().__init__()
        self.shown = logging.getLevelName(level) <= logging.WARNING

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return self.shown


def logging_config(level: str, form: str) -> dict[str, Any]:
    """Django's ``LOGGING`` for ``LOG_LEVEL`` and ``LOG_FORMAT``. Sendit's loggers from ``level`` on;
    Django's and every other library's (the queue's) from WARNING on at least: below that they may
    quote SQL parameters or request headers. pydicom's and pynetdicom's records are withheld
    whatever the level (see :func:`withheld_records`)."""
    level = level.strip().upper()
    quieter = logging.getLevelName(max(logging.WARNING, logging.getLevelName(level)))
    line: dict[str, Any] = (
        {"()": JsonLines}
        if form.strip().lower() == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": line},
        "filters": {"one_line_warning": {"()": OneLineWarning, "level": level}},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "line", "level": level},
            "security": {
                "class": "logging.StreamHandler",
                "formatter": "line",
                "level": level,
                "filters": ["one_line_warning"],
            },
            "withheld": {"()": "sendit.server.settings.withheld_records"},
        },
        # the queue's and other libraries' lines, formatted like ours (before: Python's bare fallback)
        "root": {"handlers": ["console"], "level": quieter},
        "loggers": {
            "sendit": {"handlers": ["console"], "level": level, "propagate": False},
            "django": {"handlers": ["console"], "level": quieter, "propagate": False},
            "django.security": {"handlers": ["security"], "level": quieter, "propagate": False},
            "pydicom": {"handlers": ["withheld"], "level": "WARNING", "propagate": False},
            "pynetdicom": {"handlers": ["withheld"], "level": "WARNING", "propagate": False},
        },
    }


LOGGING = logging_config(SENDIT.LOG_LEVEL, SENDIT.LOG_FORMAT)
