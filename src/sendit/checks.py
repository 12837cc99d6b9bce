"""What `sendit check` (and every command's start) asks before work begins: can each folder be written,
is the web port free, do the database, the queue and the identifier service answer. Each answer is one
line naming the key and the OS's reason, with the exit code it calls for.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

from sendit.config import Config

# Exit codes, the same in every command (README, "Exit codes"): a wrong configuration, or one this
# machine refuses (a value, no sendit.toml, a folder that cannot be written, the web port taken) is 2;
# something Sendit needs that does not answer (database, queue, identifier service, destination), or
# work that did not end well, is 1.
EXIT_CONFIGURATION = 2
EXIT_UNAVAILABLE = 1


class Finding(NamedTuple):
    """One line of `sendit check`: ``code`` is the exit code it calls for when not ok."""

    ok: bool
    line: str
    code: int = EXIT_UNAVAILABLE


def os_reason(exc: BaseException) -> str:
    """The OS's words (``Read-only file system``), or the exception's first line."""
    strerror = getattr(exc, "strerror", None)
    if isinstance(strerror, str) and strerror:
        return strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def folders(cfg: Config) -> list[tuple[str, Path]]:
    """Every folder Sendit writes, by the key that names it (an SQLite file's folder too)."""
    folders = [
        (name, Path(cfg.values[name]))
        for name in ("DATA_DIR", "INPUT_FOLDER", "WORK_FOLDER", "QUARANTINE_FOLDER", "OUTPUT_FOLDER")
        if cfg.values[name] is not None
    ]
    for name in ("DATABASE_URL", "QUEUE_URL"):
        url = str(cfg.values[name])
        if url.startswith("sqlite:///"):
            folders.append((name, Path(url[len("sqlite:///") :]).parent))
    return folders


def folder_problem(name: str, folder: Path, create: bool) -> str | None:
    """Why Sendit cannot write in ``folder``: one line naming its key and the OS's reason; None if it can.
    The probe file's name starts with a dot, so a watcher running meanwhile leaves it alone."""
    import errno
    import tempfile

    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            return f"{name}: {folder} is a file, not a folder"
        except OSError as exc:
            return f"{name}: cannot create {folder}: {os_reason(exc)}"
    elif not folder.exists():  # made when first needed, unless a file stands where a folder must
        above = next((parent for parent in folder.parents if parent.exists()), None)
        if above is not None and not above.is_dir():
            return f"{name}: cannot create {folder}: {os.strerror(errno.ENOTDIR)} ({above} is a file)"
        return None
    if not folder.is_dir():
        return f"{name}: {folder} is a file, not a folder"
    if name == "INPUT_FOLDER":
        # Asked without writing: a probe file would touch the watched folder, and a file there settles
        # only once its folder is quiet (STABLE_SECONDS) — a status poll every second would hold it back.
        if os.access(folder, os.W_OK):
            return None
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        return f"{name}: cannot write in {folder}: {os.strerror(errno.EROFS if read_only else errno.EACCES)}"
    try:
        handle, probe = tempfile.mkstemp(prefix=".sendit-check-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        return f"{name}: cannot write in {folder}: {os_reason(exc)}"
    return None


def folder_findings(cfg: Config, create: bool = True) -> list[Finding]:
    """Each folder, writable or not, once; one inside a folder that failed is left out (that is its problem)."""
    failed: list[Path] = []
    seen: set[Path] = set()
    findings: list[Finding] = []
    for name, folder in folders(cfg):
        if folder in seen or any(bad in folder.parents for bad in failed):
            continue
        seen.add(folder)
        problem = folder_problem(name, folder, create)
        if problem is not None:
            failed.append(folder)
        findings.append(Finding(problem is None, problem or f"{name} writable: {folder}", EXIT_CONFIGURATION))
    return findings


def web_port_finding(cfg: Config) -> Finding:
    """Could `sendit run` listen on WEB_HOST:WEB_PORT? Taken by a running Sendit counts as fine."""
    import errno
    import socket

    host, port = cfg.WEB_HOST, cfg.WEB_PORT
    where = f"{host}:{port}"
    try:  # IPv4, as the web server of `sendit run`
        address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4]
    except OSError as exc:
        return Finding(False, f"WEB_HOST: cannot use {host}: {os_reason(exc)}", EXIT_CONFIGURATION)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and sendit_answers(host, port):
                return Finding(True, f"WEB_PORT {where}: in use by a running Sendit (its /health answers)")
            return Finding(False, f"WEB_PORT: cannot listen on {where}: {os_reason(exc)}", EXIT_CONFIGURATION)
    return Finding(True, f"WEB_PORT {where} is free")


def listen_port_finding(cfg: Config) -> Finding | None:
    """Could `sendit run` start its DICOM listener (LISTEN_PORT free, the TLS files loadable)? None
    when no listener is configured. Taken while this installation's web server answers: fine."""
    import errno
    import socket
    import ssl

    from sendit.relay.callers import tls_context

    if not cfg.LISTEN_PORT:
        return None
    where = f"{cfg.LISTEN_HOST}:{cfg.LISTEN_PORT}"
    try:
        tls_context(cfg.LISTEN_TLS_CERT, cfg.LISTEN_TLS_KEY, cfg.LISTEN_TLS_CA)
    except (OSError, ssl.SSLError) as exc:
        return Finding(False, f"LISTEN_TLS_CERT/KEY/CA: cannot load: {os_reason(exc)}", EXIT_CONFIGURATION)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom's server does
        try:
            sock.bind((cfg.LISTEN_HOST, cfg.LISTEN_PORT))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and sendit_answers(cfg.WEB_HOST, cfg.WEB_PORT):
                return Finding(True, f"LISTEN_PORT {where}: in use, and this Sendit's web server answers")
            return Finding(False, f"LISTEN_PORT: cannot listen on {where}: {os_reason(exc)}", EXIT_CONFIGURATION)
    return Finding(True, f"LISTEN_PORT {where} is free (DICOM listener {cfg.LISTEN_AET})")


def sendit_answers(host: str, port: int) -> bool:
    import httpx

    target = "127.0.0.1" if host in ("", "0.0.0.0") else host
    try:
        reply = httpx.get(f"http://{target}:{port}/health", timeout=2.0, follow_redirects=False)
        return isinstance(reply.json(), dict) and "status" in reply.json()
    except (httpx.HTTPError, ValueError):
        return False


def database_finding(cfg: Config) -> Finding:
    """Connect once (bounded in time); the URL is shown with its password masked."""
    from django.db import connection

    from sendit.config import mask_url

    url = mask_url(cfg.DATABASE_URL)
    if connection.vendor == "postgresql":  # libpq would wait for the OS's TCP time-out
        connection.settings_dict.setdefault("OPTIONS", {}).setdefault("connect_timeout", 10)
    try:
        connection.ensure_connection()
    except Exception as exc:  # any driver's failure is one line, not a traceback
        return Finding(False, f"DATABASE_URL {url}: {mask_url(os_reason(exc))}")
    finally:
        connection.close()
    return Finding(True, f"DATABASE_URL {url} answers")


def queue_finding(cfg: Config) -> Finding:
    from sendit.config import mask_url

    url = mask_url(cfg.QUEUE_URL)
    try:
        if cfg.QUEUE_URL.startswith("redis://"):
            import redis

            client = redis.Redis.from_url(cfg.QUEUE_URL, socket_connect_timeout=10, socket_timeout=10)
            try:
                client.ping()
            finally:
                client.close()
        else:
            from sendit.relay.queue import make_huey

            make_huey(cfg).pending_count()
    except Exception as exc:  # any client's failure is one line, not a traceback
        return Finding(False, f"QUEUE_URL {url}: {mask_url(os_reason(exc))}")
    return Finding(True, f"QUEUE_URL {url} answers")


def identifier_findings(cfg: Config) -> list[Finding]:
    """Does the identifier service answer? Asked about no one: a GET of DASHER_URL (and of the token
    endpoint) without a token; a token file must be readable and hold a token."""
    if cfg.IDENTIFIER_PROVIDER:
        return [Finding(True, f"identifiers: IDENTIFIER_PROVIDER {cfg.IDENTIFIER_PROVIDER} (a plug-in; not asked)")]
    if not cfg.DEIDENTIFY_RESTFUL:
        return [Finding(True, "identifiers: the local keyed provider (no service to ask)")]
    import httpx

    from sendit.config import mask_url
    from sendit.identifiers.dasher.settings import DasherSettings

    dasher = DasherSettings.from_config(cfg.values)
    findings: list[Finding] = []
    if dasher.token_file:
        try:
            token = Path(dasher.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            line = f"DASHER_TOKEN_FILE: cannot read {dasher.token_file}: {os_reason(exc)}"
            findings.append(Finding(False, line, EXIT_CONFIGURATION))
        else:
            line = f"DASHER_TOKEN_FILE {dasher.token_file} " + ("holds a token" if token else "is empty")
            findings.append(Finding(bool(token), line, EXIT_CONFIGURATION))
    timeout = httpx.Timeout(dasher.read_timeout, connect=dasher.connect_timeout)
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for key, url in (("DASHER_URL", dasher.base_url), ("DASHER_TOKEN_URL", dasher.token_url)):
            if not url:
                continue
            try:
                with client.stream("GET", url) as reply:
                    status = reply.status_code
            except httpx.HTTPError as exc:
                findings.append(Finding(False, f"{key} {mask_url(url)}: no answer ({type(exc).__name__})"))
                continue
            if status in (502, 503, 504):  # the service, or the gateway in front of it, is down
                findings.append(Finding(False, f"{key} {mask_url(url)}: answered HTTP {status}"))
            else:
                findings.append(Finding(True, f"{key} {mask_url(url)} answers (HTTP {status})"))
    return findings


def storage_finding(cfg: Config) -> Finding:
    """Can the store that holds originals (STORAGE_URL) be listed? Its location, never a credential."""
    from sendit.storage import open_store

    if not cfg.STORAGE_URL:
        return Finding(True, "STORAGE_URL: originals are read in the input folder (no store)")
    store = open_store(
        cfg.STORAGE_URL,
        endpoint_url=cfg.S3_ENDPOINT_URL,
        region=cfg.S3_REGION,
        access_key_id=cfg.S3_ACCESS_KEY_ID,
        secret_access_key=cfg.S3_SECRET_ACCESS_KEY,
    )
    assert store is not None
    problem = store.check()
    return Finding(problem is None, f"STORAGE_URL {store.location}" + (f": {problem}" if problem else " answers"))


def unavailable(exc: BaseException) -> str | None:
    """One line for a database or queue that failed under a command (exit 1), naming its key and URL
    (password masked); None for anything else, which is a bug to be shown in full."""
    import sqlite3

    from sendit.config import mask_url

    db = sys.modules.get("django.db")
    redis_errors = sys.modules.get("redis.exceptions")
    queue_errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)  # Django wraps its own
    if redis_errors is not None:
        queue_errors += (redis_errors.ConnectionError, redis_errors.TimeoutError)
    if db is not None and isinstance(exc, db.OperationalError | db.InterfaceError):
        key = "DATABASE_URL"
    elif isinstance(exc, queue_errors):
        key = "QUEUE_URL"
    else:
        return None
    cfg = getattr(sys.modules.get("sendit.server.settings"), "SENDIT", None)
    url = f" {mask_url(str(getattr(cfg, key)))}" if isinstance(cfg, Config) else ""
    return f"{key}{url}: {mask_url(os_reason(exc))}"
