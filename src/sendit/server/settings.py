"""Django settings, all derived from Sendit's validated configuration (sendit.toml + SENDIT_* variables)."""

from __future__ import annotations

import logging

from sendit.config import ConfigError, database_settings, load_config

try:
    SENDIT = load_config()
except ConfigError as error:  # start-up refuses to run with a wrong value; the CLI prints the lines
    raise SystemExit("sendit: configuration problems:\n  " + "\n  ".join(error.problems)) from None

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


LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        "withheld": {"()": "sendit.server.settings.withheld_records"},
    },
    "loggers": {
        "sendit": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        "pydicom": {"handlers": ["withheld"], "level": "WARNING", "propagate": False},
        "pynetdicom": {"handlers": ["withheld"], "level": "WARNING", "propagate": False},
    },
}
