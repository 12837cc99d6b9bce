"""The `sendit` command: set-up, the long-running service, one-shot imports and the engine alone."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sendit.checks import (
    EXIT_CONFIGURATION,
    EXIT_UNAVAILABLE,
    database_finding,
    folder_findings,
    identifier_findings,
    listen_port_finding,
    os_reason,
    queue_finding,
    storage_finding,
    unavailable,
    web_port_finding,
)
from sendit.config import Config, ConfigError, load_config, write_config


def _version() -> str:
    """The installed package's version (its metadata), as the dashboard and /metrics show it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sendit")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


DEBUG_WARNING = (
    "sendit: warning: DEBUG = true: error pages show code and settings to anyone who reaches the web"
    " server; never in production"
)


def _fail(lines: list[str], code: int = EXIT_CONFIGURATION) -> int:
    """Problems on stderr: one is one line ("sendit: KEY: reason"), several get a heading."""
    if len(lines) == 1:
        print(f"sendit: {lines[0]}", file=sys.stderr)
        return code
    print("sendit: configuration problems:", file=sys.stderr)
    for line in lines:
        print("  " + line, file=sys.stderr)
    return code


def _django(migrate: bool = True, create: bool = True) -> Config:
    """Set Django up on the validated configuration; makes the data folders and the schema.

    The configuration is validated here, before Django's settings read it, so that a wrong value is a
    ``ConfigError`` (exit 2, one line each) in every command, and so is a folder Sendit cannot make or
    write. ``create=False`` makes no folder (one that exists must still be writable)."""
    cfg = load_config()
    if cfg.DEBUG:
        print(DEBUG_WARNING, file=sys.stderr)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sendit.server.settings")
    import django
    from django.conf import settings

    django.setup()
    cfg = settings.SENDIT
    problems = [finding.line for finding in folder_findings(cfg, create) if not finding.ok]
    if problems:
        raise ConfigError(problems)
    if migrate:
        from sendit.relay.installation import KeyMismatch, check_key
        from sendit.relay.installation import migrate as migrate_schema

        migrate_schema(Path(cfg.DATA_DIR))
        try:
            check_key(cfg.SECRET_KEY)
        except KeyMismatch as exc:
            raise ConfigError([str(exc)]) from None
    return cfg


def cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    try:
        target = write_config(directory)
    except FileExistsError as exc:
        print(f"sendit: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {target} (with a fresh SECRET_KEY; keep it secret and keep it stable)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config()
    except ConfigError as error:
        return _fail(error.problems)
    print(f"configuration: {cfg.source or '(defaults and environment only)'}")
    for name, value in cfg.masked().items():
        print(f"  {name} = {value}")
    folders = folder_findings(cfg)
    for finding in folders:
        print(f"  [{'ok' if finding.ok else 'FAIL'}] {finding.line}")
    if not all(finding.ok for finding in folders):  # the database and queue may live there
        print("  (database, queue, identifier service and destinations: checked once every folder is writable)")
        return EXIT_CONFIGURATION
    _django(migrate=False)
    listening = listen_port_finding(cfg)
    findings = [web_port_finding(cfg), *([listening] if listening else [])]
    findings += [database_finding(cfg), queue_finding(cfg), storage_finding(cfg), *identifier_findings(cfg)]
    for finding in findings:
        print(f"  [{'ok' if finding.ok else 'FAIL'}] {finding.line}")
    codes = {finding.code for finding in findings if not finding.ok}
    problems = 0
    from sendit.relay import runtime

    for destination in runtime.all_destinations():
        # A destination's check tries what a run will do (DICOM: association, C-ECHO, C-FIND; REST:
        # GET /system, POST /tools/lookup) and says what to change; ``where`` names whom it asked.
        try:
            reason = destination.check()
        except Exception as exc:  # report it and check the next destination; never a traceback
            reason = f"the check itself failed ({type(exc).__name__})"
        finally:
            destination.close()
        where = getattr(destination, "where", None)
        if reason is None:
            print(f"  [ok] destination {destination.name}" + (f": {where}" if where else ""))
        else:
            print(f"  [FAIL] destination {destination.name}: {reason.removeprefix(f'{destination.name}: ')}")
            problems += 1
    if problems:
        codes.add(EXIT_UNAVAILABLE)
    return max(codes, default=0)


def cmd_worker(args: argparse.Namespace) -> int:
    """The Huey consumer and its worker processes; they stop when it stops (sendit.lifecycle)."""
    if args.parent:  # started by `sendit run`: stop with it, and leave Ctrl-C and hang-up to it
        from sendit.lifecycle import die_with_parent, ignore_terminal_signals

        ignore_terminal_signals()
        if not die_with_parent(args.parent):
            print(f"sendit: worker: parent process {args.parent} is gone; not starting", file=sys.stderr)
            return EXIT_UNAVAILABLE
    cfg = _django()
    from django.db import connections

    from sendit.lifecycle import Consumer
    from sendit.relay.tasks import huey, requeue_stale
    from sendit.web.heartbeat import install

    install(huey)  # each worker process shows itself as alive on the dashboard

    requeue_stale()
    connections.close_all()
    from sendit.relay import runtime

    runtime.store()  # made before the worker processes fork: boto3's service model is loaded once, not per process
    workers = args.workers or cfg.WORKERS
    import logging

    lines = logging.getLogger("sendit.worker")  # the start-up line, and the last one
    consumer = Consumer(
        huey,
        supervised=bool(args.parent),
        on_started=lambda: lines.info(
            "sendit %s worker started: %s processes (pid %s)", _version(), workers, os.getpid()
        ),
        workers=workers,
        worker_type="process",
        periodic=True,
        initial_delay=0.1,
        max_delay=QUEUE_POLL_MAX_SECONDS,
    )
    consumer.run()
    lines.info("sendit worker stopped (pid %s)", os.getpid())
    return 0


def _web_server(host: str, port: int) -> Any:
    """The web server, its socket bound and listening; the application is set later."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - wsgiref's name
            return None

    return Server((host, port), QuietHandler)


def _say_unreachable_destinations() -> None:
    """At start, in the background: a destination that does not answer is named now, not at the first
    series that waits for it."""
    import logging

    from django.db import connections

    from sendit.relay import runtime
    from sendit.relay.housekeeping import check_destinations

    log = logging.getLogger("sendit.run")
    try:
        for row in check_destinations(runtime.all_destinations(), seconds=15):
            if not row["reachable"]:
                log.warning("destination %s is unreachable at start: %s", row["name"], row["problem"])
    except Exception as exc:  # a start-up courtesy: never the reason the service stops
        log.warning("destinations could not be checked at start (%s)", type(exc).__name__)
    finally:
        connections.close_all()


def cmd_run(args: argparse.Namespace) -> int:
    """Web server and watcher in this process; the queue consumer in a child `sendit worker`, started
    again when it dies. SIGTERM, SIGINT or SIGHUP stops them all (sendit.lifecycle)."""
    import logging
    import threading
    import time

    cfg = load_config()
    host, port = args.host or cfg.WEB_HOST, args.port or cfg.WEB_PORT
    try:  # before anything else: a port in use starts nothing
        server = _web_server(host, port)
    except OSError as exc:
        return _fail([f"WEB_HOST:WEB_PORT: cannot listen on {host}:{port}: {os_reason(exc)}"], EXIT_CONFIGURATION)
    cfg = _django()
    from django.core.wsgi import get_wsgi_application

    from sendit import lifecycle
    from sendit.relay.ingest import IngestReport
    from sendit.relay.tasks import enqueue
    from sendit.relay.watcher import Watcher
    from sendit.web import heartbeat

    log = logging.getLogger("sendit.run")
    server.set_app(get_wsgi_application())
    signals = lifecycle.StopSignals()
    signals.install()
    consumer = lifecycle.Supervisor(
        [sys.executable, "-m", "sendit", "worker", "--parent", str(os.getpid())],
        heartbeat.set_consumer_running,
        grace_seconds=cfg.STOP_GRACE_SECONDS,
    )

    def enqueue_ingested(report: IngestReport) -> None:
        enqueue(report.series_ids)

    watcher = Watcher(Path(cfg.INPUT_FOLDER), cfg.RESCAN_SECONDS, enqueue_ingested)
    listener = None
    if cfg.LISTEN_PORT:  # the second way in: C-STORE (sendit.relay.listener)
        from sendit.relay.listener import Listener

        listener = Listener(cfg, enqueue)
        try:  # before anything starts: a port in use starts nothing
            listener.bind()
        except OSError as exc:
            server.server_close()
            return _fail(
                [f"LISTEN_HOST:LISTEN_PORT: cannot listen on {cfg.LISTEN_HOST}:{cfg.LISTEN_PORT}: {os_reason(exc)}"],
                EXIT_CONFIGURATION,
            )
    web = threading.Thread(target=server.serve_forever, name="sendit-web", daemon=True)
    watching = False
    consumer.start()
    try:  # whatever ends the loop (a signal, the web server, an exception), every process is stopped
        watcher.start()
        watching = True
        if listener is not None:
            listener.start()
        web.start()
        listening = f"; DICOM listener {cfg.LISTEN_AET} on {cfg.LISTEN_HOST}:{cfg.LISTEN_PORT}" if listener else ""
        print(
            f"sendit {_version()}: watching {cfg.INPUT_FOLDER}{listening}; status page on http://{host}:{port}/ ;"
            " Ctrl-C stops",
            flush=True,
        )
        threading.Thread(target=_say_unreachable_destinations, name="sendit-start-check", daemon=True).start()
        while not signals.stop and web.is_alive():
            consumer.tick()  # in the main thread: the child's parent-death signal follows the thread that forked it
            time.sleep(0.2)
        if signals.stop:
            log.info(
                "stopping (%s): workers finish their current step (%.0f s at most; a second signal stops at once)",
                signals.name,
                cfg.STOP_GRACE_SECONDS,
            )
        else:
            log.error("the web server stopped; stopping everything")
    finally:
        consumer.request_stop()
        if web.is_alive():
            server.shutdown()
        server.server_close()
        if listener is not None:
            listener.stop()
        if watching:
            watcher.stop()
        consumer.finish_stop(lambda: signals.hurry)
        log.info("stopped")
    code = 0 if signals.stop else 1
    # A thread left waiting on a silent peer (the start-up destination check's DICOM association, which
    # pynetdicom does not make a daemon) would hold the exit for its whole time-out: everything that
    # mattered has stopped, so leave without waiting for it.
    if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    return code


#: An idle worker asks an SQLite queue at least this often (Huey backs off from 0.1 s up to it). It
#: bounds how long a new series waits for a free worker (issue 17: a 20-image series DONE within 2 s
#: of its folder's rename); 4 reads a second per idle worker cost nothing measurable. A Redis queue
#: blocks on the list instead and never waits this long.
QUEUE_POLL_MAX_SECONDS = 0.25

NO_WORKER = "no worker is running: start `sendit run` or `sendit worker`, or use --wait"


def _import(paths: list[Path], wait: bool, workers: int, quiet: bool = False) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sendit.relay.housekeeping import images_per_status, reasons_per_status
    from sendit.relay.ingest import IngestReport, complete_files, ingest_in_chunks, series_left_behind
    from sendit.relay.inline import run_inline
    from sendit.relay.models import TERMINAL, Image, Status

    console = Console(stderr=True, quiet=quiet)
    for path in paths:
        if not path.exists():
            console.print(f"[red]{path}: no such file or folder[/red]")
            return 2
    report = IngestReport()

    def say_ingested() -> None:
        for name, _, reason in report.problems:
            console.print(f"[yellow]{name}: {reason}[/yellow]")
        console.print(
            f"ingested {report.images} image(s) in {len(report.series_ids)} series"
            f" ({report.rejected} rejected, {report.skipped} skipped, {report.quarantined} quarantined,"
            f" {report.reprocessed} again)"
        )
        if report.resumable:
            console.print(f"resuming {len(report.resumable)} series recorded earlier and still in flight")

    def chunks() -> Iterator[IngestReport]:
        for path in paths:
            for part in ingest_in_chunks([path] if path.is_file() else complete_files(path)):
                report.add(part)
                yield part

    if not wait:
        for _ in chunks():
            pass
        say_ingested()
        from sendit.relay.tasks import enqueue
        from sendit.web.heartbeat import alive

        series_ids = report.series_ids | report.resumable
        enqueue(series_ids)
        if series_ids and not alive():  # queued, and nobody to take it
            console.print(NO_WORKER, markup=False, highlight=False, soft_wrap=True)
        return 0

    def handed_on() -> Iterator[set[int]]:
        for part, ready in series_left_behind(chunks()):
            yield ready | part.resumable
        say_ingested()

    # no refresh thread (auto_refresh=False): the worker pool forks, and a fork should find no other thread
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=False,
    ) as progress:
        task = progress.add_task("de-identify and deliver", total=None)

        def update() -> None:
            ids = report.series_ids | report.resumable
            images = Image.objects.filter(series_id__in=ids)
            progress.update(
                task, total=images.count(), completed=images.filter(status__in=TERMINAL).count(), refresh=True
            )

        run_inline((), workers, on_progress=update, arrivals=handed_on())
        update()
    series_ids = report.series_ids | report.resumable
    counts = images_per_status(series_ids)
    console.print(
        "result: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "result: nothing"
    )
    unfinished = [status for status in Status if status not in (Status.DONE, Status.SKIPPED)]
    reasons = reasons_per_status(unfinished, series_ids)
    for _, rejected_as, why in report.problems:  # files that never became images
        if rejected_as != Status.SKIPPED:
            reasons[(rejected_as, why)] = reasons.get((rejected_as, why), 0) + 1
    if reasons:
        console.print(f"[red]{sum(reasons.values())} file(s) did not end DONE or SKIPPED:[/red]")
        for (status, reason), n in sorted(reasons.items(), key=lambda item: -item[1]):
            console.print(f"  {n:6d}  {status:12s} {reason}")
        return 1
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    cfg = _django()
    return _import([Path(p) for p in args.paths], args.wait, args.workers or cfg.WORKERS)


#: `sendit status` asks each destination with this time-out, and waits this much longer at most in all
STATUS_CHECK_SECONDS = 3.0


def _destination_states(cfg: Config) -> list[dict[str, Any]]:
    """Each destination's check, answered within seconds even during an outage (the adapters are
    built with a short time-out, and a check still running after it is reported as no answer)."""
    from dataclasses import replace

    from django.conf import settings

    from sendit.relay import runtime
    from sendit.relay.housekeeping import check_destinations

    settings.SENDIT = replace(
        cfg,
        ORTHANC_TIMEOUT=min(cfg.ORTHANC_TIMEOUT, int(STATUS_CHECK_SECONDS)),
        GOOGLE_TIMEOUT=min(cfg.GOOGLE_TIMEOUT, int(STATUS_CHECK_SECONDS)),
    )
    try:
        destinations = runtime.all_destinations()
    finally:
        settings.SENDIT = cfg
    return check_destinations(destinations, STATUS_CHECK_SECONDS + 2)


def _command() -> str:
    """This same `sendit` as a shell command: `sendit` when PATH finds this one, else its full path
    (after the quick start `.venv/bin` is not on PATH, and a bare `sendit` is "command not found")."""
    import shutil

    argv0 = Path(sys.argv[0])
    path = argv0.absolute() if argv0.name == "sendit" else Path(sys.executable).parent / "sendit"
    if not os.access(path, os.X_OK):  # `python -m sendit` from an environment without the script
        return f"{shlex.quote(sys.executable)} -m sendit"
    found = shutil.which("sendit")
    if found is not None and os.path.samefile(found, path):
        return "sendit"
    return shlex.quote(str(path))


def _schema_problem() -> str | None:
    """Why the database cannot be read with this version's schema; found without creating a database
    file or changing anything (None: it can)."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    no_database = f"no database yet — run `{_command()} run` or `{_command()} migrate` first"
    if connection.vendor == "sqlite" and not Path(connection.settings_dict["NAME"]).is_file():
        return no_database  # connecting would create an empty one
    executor = MigrationExecutor(connection)
    if not executor.loader.applied_migrations:
        return no_database
    if executor.migration_plan(executor.loader.graph.leaf_nodes()):
        return f"the database schema is older than this version of Sendit — run `{_command()} migrate` first"
    return None


def _foreign_key_problem(secret_key: str) -> str | None:
    """installation.check_key without recording a first key: for a command that only reads."""
    from sendit.relay.installation import KEY_FINGERPRINT, key_fingerprint
    from sendit.relay.models import Installation

    recorded = Installation.objects.filter(name=KEY_FINGERPRINT).values_list("value", flat=True).first()
    mine = key_fingerprint(secret_key)
    if recorded is None or recorded == mine:
        return None
    return (
        f"SECRET_KEY differs from the key this database was first used with (fingerprint {recorded[:8]}…, "
        f"this key {mine[:8]}…): use that installation's key on every host"
    )


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _django(migrate=False, create=False)  # only reads: no folder, no database file, no migration
    problem = _schema_problem()
    if problem is not None:
        print(f"sendit: {problem}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    foreign = _foreign_key_problem(cfg.SECRET_KEY)
    if foreign is not None:
        raise ConfigError([foreign])
    from sendit.relay.housekeeping import file_counts, problem_reasons, status_counts
    from sendit.web.overview import free_space, space_lines

    counts = status_counts()
    rejected = file_counts()
    space = free_space()
    problems = problem_reasons()
    destinations = _destination_states(cfg)
    if args.json:
        rows = [list(row) for row in problems]
        report = {
            "counts": counts,
            "files": rejected,
            "problems": rows,
            "disk": space,
            "destinations": destinations,
        }
        print(json.dumps(report, indent=2, default=str))
        return 0
    print("images:")
    for status, n in counts.items():
        print(f"  {status:15s} {n}")
    print("rejected files (not images; `sendit files` lists them):")
    for status, n in rejected.items():
        print(f"  {status:15s} {n}")
    for line in space_lines(space):
        print(f"disk: {line}")
    for state in destinations:
        print(
            f"destination {state['name']}: "
            + ("reachable" if state["reachable"] else f"UNREACHABLE: {state['problem']}")
        )
    if problems:
        print("problems (files that did not end DONE, by reason):")
        for status, reason, n in problems:
            print(f"  {n:6d}  {status:12s} {reason}")
    return 0


def _known_series(asked: set[int], verb: str) -> bool:
    """An unknown id is refused (a typo must not pass for "nothing to do")."""
    from sendit.relay.models import Series

    known = set(Series.objects.filter(pk__in=[i for i in asked if 0 < i < 2**63]).values_list("id", flat=True))
    if asked - known:
        unknown = ", ".join(str(i) for i in sorted(asked - known))
        print(f"sendit: no series {unknown}; nothing {verb}", file=sys.stderr)
        return False
    return True


def _act(action: str, series_ids: list[int], errors_only: bool = False) -> int:
    """The dashboard's button (sendit.web.actions.perform) on each series, as the host's user."""
    import getpass

    from sendit.relay.models import Series, Status
    from sendit.web import actions

    user = actions.CommandLineUser(getpass.getuser())
    for series in Series.objects.filter(pk__in=series_ids).order_by("id"):
        only = list(series.images.filter(status=Status.ERROR).values_list("id", flat=True)) if errors_only else None
        print(actions.perform(action, series, user, only).message())
    return 0


def _file_act(action: str, file_ids: list[int], winner: str = "") -> int:
    """The files page's buttons (sendit.web.rejected.perform), as the host's user."""
    import getpass

    from sendit.relay.models import ReceivedFile
    from sendit.web import actions, rejected

    rows = {row.pk: row for row in ReceivedFile.objects.filter(pk__in=[i for i in file_ids if 0 < i < 2**63])}
    unknown = [str(i) for i in file_ids if i not in rows]
    if unknown:
        print(f"sendit: no received file {', '.join(unknown)}; nothing done", file=sys.stderr)
        return EXIT_UNAVAILABLE
    user = actions.CommandLineUser(getpass.getuser())
    failed = False
    for file_id in file_ids:
        outcome = rejected.perform(action, rows[file_id], user, winner)
        failed = failed or not outcome.changed
        print(outcome.message())
    return 1 if failed else 0


def cmd_files(args: argparse.Namespace) -> int:
    _django(migrate=False)
    from sendit.relay.models import ReceivedFile
    from sendit.web.rejected import file_row

    queryset = ReceivedFile.objects.order_by("id")
    if not args.all:
        queryset = queryset.filter(resolved="")
    rows = [file_row(row) for row in queryset[: args.limit]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        image = f" image #{row['image_id']}" if row["image_id"] else ""
        done = f" [{row['resolved']}]" if row["resolved"] else ""
        print(f"#{row['id']:<6} {row['status']:12s}{image} {row['reason']}{done}")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    _django()
    return _file_act("resolve", [args.file], args.winner)


def cmd_retry(args: argparse.Namespace) -> int:
    _django()
    from sendit.relay.housekeeping import retry_now
    from sendit.relay.models import Series, Status

    if not _known_series(set(args.series), "retried"):
        return EXIT_UNAVAILABLE
    if args.file:
        code = _file_act("retry", args.file)
        if not args.series:
            return code
    if args.series:  # the dashboard's Retry: ERROR and QUARANTINED images of these series
        _act("retry", args.series)
    else:  # every series with images in ERROR; quarantined images need a person to name them
        errors = list(Series.objects.filter(images__status=Status.ERROR).distinct().values_list("id", flat=True))
        _act("retry", errors, errors_only=True)
        print(f"requeued {len(errors)} series")
    if args.now:  # the same as the series page's "Retry now" and POST /api/series/<id>/retry-now
        due = retry_now(args.series or None, who="sendit retry --now")
        print(f"next attempt now for {len(due)} series waiting out a back-off")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    _django()
    if not _known_series(set(args.series), "released"):
        return EXIT_UNAVAILABLE
    return _act("release", args.series)


def cmd_discard(args: argparse.Namespace) -> int:
    _django()
    if not args.series and not args.file:
        print("sendit: name series ids or --file ids", file=sys.stderr)
        return 2
    if not _known_series(set(args.series), "discarded"):
        return EXIT_UNAVAILABLE
    if not args.yes:
        print(
            "sendit: discard deletes the files of the ERROR and QUARANTINED images; confirm with --yes", file=sys.stderr
        )
        return 2
    if args.file:
        code = _file_act("discard", args.file)
        if not args.series:
            return code
    return _act("discard", args.series)


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if days < 0:
        raise argparse.ArgumentTypeError("a number of days cannot be negative")
    return days


def cmd_migrate(args: argparse.Namespace) -> int:
    """The schema step alone (after an upgrade), under the installation's migration lock."""
    cfg = _django(migrate=False)
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    from sendit.relay.installation import KeyMismatch, check_key, migrate

    executor = MigrationExecutor(connection)
    pending = len(executor.migration_plan(executor.loader.graph.leaf_nodes()))
    migrate(Path(cfg.DATA_DIR))
    try:
        check_key(cfg.SECRET_KEY)
    except KeyMismatch as exc:
        raise ConfigError([str(exc)]) from None
    print(f"database schema up to date ({pending} migration(s) were pending)")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    if args.days == 0 and not args.yes:
        print(
            "sendit: --days 0 deletes the rows of every finished series now (a PHI-free summary of each is"
            " kept); add --yes to do so",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    cfg = _django()
    from sendit.relay.housekeeping import prune

    days = cfg.RETENTION_DAYS if args.days is None else args.days
    print(f"pruned {prune(days)} finished series older than {days} day(s); summaries kept")
    return 0


def cmd_deid(args: argparse.Namespace) -> int:
    """The engine alone on a folder: no database, no queue; identifiers from the local keyed provider."""
    try:
        cfg = load_config()
    except ConfigError as error:
        return _fail(error.problems)
    from sendit.deid import build_deidentifier, deid_folder, ocr_settings
    from sendit.identifiers.local import LocalProvider

    provider = LocalProvider(cfg.SECRET_KEY, cfg.DATE_SHIFT_MIN_DAYS, cfg.DATE_SHIFT_MAX_DAYS)
    ocr = ocr_settings(cfg.values)
    engine = build_deidentifier(cfg.SECRET_KEY, cfg.DEID_OPTIONS, cfg.DEID_RECIPE, cfg.DEID_FILTER, ocr=ocr)
    summary = deid_folder(Path(args.input), Path(args.output), engine, provider, workers=args.workers or cfg.WORKERS)
    for name, reason in summary.problems:
        print(f"{name}: {reason}", file=sys.stderr)
    ignored = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(summary.ignored.items()))
    print(
        f"de-identified {summary.written} file(s); {len(summary.problems)} problem(s)"
        + (f"; left alone by rule: {ignored}" if ignored else "")
    )
    return 1 if summary.problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default end to end: config, a generated data set with PHI, import, wait, report."""
    directory = Path(args.directory).resolve()
    if not (directory / "sendit.toml").exists():
        write_config(directory)
    os.environ["SENDIT_CONFIG"] = str(directory / "sendit.toml")
    cfg = _django()
    from sendit.demo import generate_demo

    written = generate_demo(Path(cfg.INPUT_FOLDER), patients=args.patients)
    print(f"demo: generated {len(written)} DICOM files with synthetic PHI in {cfg.INPUT_FOLDER}")
    result = _import([Path(cfg.INPUT_FOLDER)], wait=True, workers=cfg.WORKERS)
    print(f"demo: de-identified output in {cfg.OUTPUT_FOLDER}")
    config = shlex.quote(str(directory / "sendit.toml"))
    print(f"demo: `SENDIT_CONFIG={config} {_command()} status` shows the counts")
    return result


def cmd_createuser(args: argparse.Namespace) -> int:
    """A dashboard/API account with a role; with --token also a bearer token for scripts (printed once)."""
    _django()
    from getpass import getpass

    from django.contrib.auth import get_user_model
    from django.contrib.auth.password_validation import validate_password
    from django.core.exceptions import ValidationError

    from sendit.relay.roles import assign
    from sendit.web.tokens import issue

    role = "admin" if args.superuser else args.role
    if args.identifiers and role in (None, "viewer", "operator"):
        role = "reviewer"  # the identifier permission is the reviewer's
    users = get_user_model()
    user = users.objects.filter(username=args.username).first()
    if user is not None and not (args.token or role):
        hint = "--token adds an API token, --role changes the role"
        print(f"sendit: user {args.username} exists ({hint})", file=sys.stderr)
        return 1
    if user is None:
        try:
            users._meta.get_field("username").run_validators(args.username)  # as the admin's form does
        except ValidationError as error:
            print(f"sendit: user name refused: {' '.join(error.messages)}", file=sys.stderr)
            return 2
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        elif args.no_password:
            password = ""
        elif sys.stdin.isatty():
            password = getpass("password: ")
            if password != getpass("again: "):
                print("sendit: the passwords differ", file=sys.stderr)
                return 1
        else:
            print("sendit: no terminal; give the password with --password-stdin", file=sys.stderr)
            return 2
        if not password and not args.no_password:
            print("sendit: an empty password is not allowed (--no-password makes a token-only user)", file=sys.stderr)
            return 2
        if password:
            try:
                validate_password(password, users(username=args.username))
            except ValidationError as error:
                print(f"sendit: password refused: {' '.join(error.messages)}", file=sys.stderr)
                return 2
        user = users.objects.create_user(args.username, password=password or None)
        role = role or "viewer"
        assign(user, role)
        print(f"created user {args.username} ({role})" + (" (superuser)" if role == "admin" else ""))
    elif role:
        assign(user, role)
        print(f"{args.username} is now {role}")
    if role in ("reviewer", "admin"):
        print(f"{args.username} may see identifier responses and original data in quarantine")
    if args.token:
        print(f"API token (shown once; send it as 'Authorization: Bearer <token>'): {issue(user, 'createuser')}")
    return 0


def cmd_manage(args: argparse.Namespace) -> int:
    _django(migrate=False)
    from django.core.management import execute_from_command_line

    execute_from_command_line(["sendit manage", *args.rest])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sendit", description=__doc__)
    parser.add_argument("--config", help="path of sendit.toml (default: ./sendit.toml or $SENDIT_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        """A subcommand: one line in `sendit --help`, the paragraph in `sendit NAME --help`."""
        return sub.add_parser(name, help=summary, description=description)

    p = command(
        "init",
        "write sendit.toml with a fresh SECRET_KEY",
        "Write DIRECTORY/sendit.toml: every setting with its meaning and default (commented out), and a"
        " fresh random SECRET_KEY. Refuses to overwrite an existing file.",
    )
    p.add_argument("directory", nargs="?", default=".", help="folder for sendit.toml (default: the current folder)")
    p.set_defaults(func=cmd_init)
    p = command(
        "check",
        "check configuration, folders, web port, database, queue, identifiers and destinations",
        "Print the effective configuration (secrets masked), then try what a run needs: every folder"
        " writable, the web port free, database and queue reachable, the identifier service and every"
        " destination answering. Exit 0 when all is well, 2 for a wrong configuration, 1 when something"
        " does not answer.",
    )
    p.set_defaults(func=cmd_check)
    p = command(
        "run",
        "the service: watcher, queue workers and web server",
        "The service: the input-folder watcher and the web server (dashboard, API, /metrics, /health) in"
        " this process; the queue consumer with WORKERS worker processes as a child, started again if it"
        " dies. SIGTERM, SIGINT or SIGHUP stops every process: workers finish the step they are on"
        " (STOP_GRACE_SECONDS, 20 s by default), then are interrupted, and their series resume at the next"
        " start. A second signal stops at once.",
    )
    p.add_argument("--host", help="address the web server listens on (default WEB_HOST)")
    p.add_argument("--port", type=int, help="port the web server listens on (default WEB_PORT)")
    p.set_defaults(func=cmd_run)
    p = command(
        "worker",
        "the queue workers alone (more workers, other hosts)",
        "The queue consumer with WORKERS worker processes, without watcher or web server: more workers on"
        " this or another host sharing the PostgreSQL database and a Redis queue. Requeues interrupted"
        " series at start-up and every minute. SIGTERM or Ctrl-C: the workers finish their current step;"
        " a second signal interrupts them (their series resume later).",
    )
    p.add_argument("--workers", type=int, help="worker processes (default WORKERS)")
    p.add_argument(
        "--parent", type=int, metavar="PID", help="stop when process PID exits (set by `sendit run` for its child)"
    )
    p.set_defaults(func=cmd_worker)
    p = command(
        "import",
        "ingest files or folders now",
        "Ingest these files or folders now; files outside the input folder are never moved or deleted."
        " Without --wait the series are queued for the running workers. With --wait they are processed"
        " here with a progress bar, and the exit code is 0 only if every image ended DONE or SKIPPED"
        " (otherwise 1, with a summary by reason).",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders")
    p.add_argument("--wait", action="store_true", help="process here and exit 0 only if all ended DONE/SKIPPED")
    p.add_argument("--workers", type=int, help="processes with --wait (default WORKERS)")
    p.set_defaults(func=cmd_import)
    p = command(
        "status",
        "counts per status, free space, destinations, problems",
        "Images per status (and files that never became images), free space of every folder, each"
        " destination reachable or not, and the problems by reason. Only reads: it creates no folder and"
        " no database, and changes no schema.",
    )
    p.add_argument("--json", action="store_true", help="the same as one JSON object, for scripts")
    p.set_defaults(func=cmd_status)
    p = command(
        "migrate",
        "create the database schema, or bring it up to date after an upgrade",
        "Create the database schema, or apply the migrations of a new version. Processes on several hosts"
        " take turns (a lock). `sendit run` and `sendit worker` also do this when they start.",
    )
    p.set_defaults(func=cmd_migrate)
    p = command(
        "retry",
        "put images in ERROR (and QUARANTINED, for named series) back into the pipeline",
        "The dashboard's Retry: the ERROR and QUARANTINED images of the named series go back to NEW and"
        " the series are queued again. Without ids, the images in ERROR of every series. An unknown series"
        " id is refused and nothing is retried.",
    )
    p.add_argument("series", nargs="*", type=int, metavar="SERIES_ID", help="series ids (default: all in ERROR)")
    p.add_argument("--now", action="store_true", help="also: series waiting out a back-off try again now")
    p.add_argument(
        "--file", type=int, action="append", default=[], metavar="FILE_ID", help="a rejected file: back to the input"
    )
    p.set_defaults(func=cmd_retry)
    p = command(
        "release",
        "de-identify the QUARANTINED images of series again",
        "The dashboard's Release: QUARANTINED images of the named series are de-identified again (after the"
        " cause was fixed: a recipe, a blanking rule, a replaced file). Nothing is sent without"
        " de-identification: an image that still fails is quarantined again.",
    )
    p.add_argument("series", nargs="+", type=int, metavar="SERIES_ID", help="series ids")
    p.set_defaults(func=cmd_release)
    p = command(
        "discard",
        "give up on the ERROR and QUARANTINED images of series (their files are deleted)",
        "The dashboard's Discard: ERROR and QUARANTINED images of the named series become SKIPPED and"
        " their files (quarantined original, working copy) are deleted; --file deletes a rejected file."
        " Needs --yes.",
    )
    p.add_argument("series", nargs="*", type=int, metavar="SERIES_ID", help="series ids")
    p.add_argument(
        "--file", type=int, action="append", default=[], metavar="FILE_ID", help="a rejected file: delete it"
    )
    p.add_argument("--yes", action="store_true", help="confirm: the files are deleted")
    p.set_defaults(func=cmd_discard)
    p = command(
        "files",
        "list the received files that did not become images",
        "Files that did not become images (not DICOM, truncated, a conflicting copy, missing UIDs, duplicates),"
        " open ones by default: id, status, the image a duplicate or conflict names, and the reason. Act on"
        " them with `sendit retry --file ID`, `sendit discard --file ID --yes` and `sendit resolve`.",
    )
    p.add_argument("--all", action="store_true", help="also the resolved ones")
    p.add_argument("--json", action="store_true", help="as JSON, for scripts")
    p.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    p.set_defaults(func=cmd_files)
    p = command(
        "resolve",
        "choose which copy of a conflicting instance wins",
        "A received file that conflicts with a processed image (same SOPInstanceUID, other content):"
        " --winner processed keeps the image as processed and deletes this copy; --winner this makes this copy"
        " the image's original and processes it again.",
    )
    p.add_argument("file", type=int, metavar="FILE_ID", help="the conflicting received file (`sendit files`)")
    p.add_argument("--winner", choices=("processed", "this"), required=True, help="which copy wins")
    p.set_defaults(func=cmd_resolve)
    p = command(
        "cleanup",
        "prune finished series older than RETENTION_DAYS",
        "Replace each series whose images all ended DONE or SKIPPED, with no change for RETENTION_DAYS, by"
        " a PHI-free summary (counts and times). Series with ERROR or QUARANTINED images are kept. --days 0"
        " (every finished series, now) needs --yes.",
    )
    p.add_argument("--days", type=_days, metavar="N", help="prune after N days instead of RETENTION_DAYS")
    p.add_argument("--yes", action="store_true", help="confirm --days 0: prune every finished series now")
    p.set_defaults(func=cmd_cleanup)
    p = command(
        "deid",
        "de-identify a folder into another (no database, no queue)",
        "The de-identification engine alone: every DICOM file under INPUT is written de-identified under"
        " OUTPUT, with identifiers from the local keyed provider (SECRET_KEY). Hidden and in-progress"
        " (.tmp) entries are left alone, links are never followed. Exit 1 if a file had a problem.",
    )
    p.add_argument("input", help="folder to read (left unchanged)")
    p.add_argument("output", help="folder to write the de-identified files to")
    p.add_argument("--workers", type=int, help="processes (default WORKERS)")
    p.set_defaults(func=cmd_deid)
    p = command(
        "demo",
        "generate a demo data set and take it to DONE",
        "Write DIRECTORY/sendit.toml if there is none, generate DICOM files with invented PHI in its input"
        " folder, and process them to DONE on the embedded defaults (SQLite, a local output folder).",
    )
    p.add_argument("directory", nargs="?", default="sendit-demo", help="folder for the demo (default: sendit-demo)")
    p.add_argument("--patients", type=int, default=3, help="synthetic patients to generate (default 3)")
    p.set_defaults(func=cmd_demo)
    p = command(
        "createuser",
        "an account for the dashboard and the API",
        "Create an account for the dashboard and the API with a role (the password is asked twice, or read"
        " from stdin, and must pass Django's password validators), or give an existing account an API token"
        " or another role.",
    )
    p.add_argument("username", help="the account's user name")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p.add_argument("--no-password", action="store_true", help="no password login (for a token-only script user)")
    p.add_argument(
        "--role",
        choices=("viewer", "operator", "reviewer", "admin"),
        help="viewer (default: look), operator (retry, release), reviewer (original data, discard), admin",
    )
    p.add_argument("--superuser", action="store_true", help="the same as --role admin (also /admin/)")
    p.add_argument("--identifiers", action="store_true", help="at least --role reviewer (sees identifier responses)")
    p.add_argument("--token", action="store_true", help="print a new API bearer token for this user")
    p.set_defaults(func=cmd_createuser)
    p = command(
        "manage",
        "one of Django's management commands (shell, changepassword, ...)",
        "Run a Django management command on Sendit's configuration. For the schema use `sendit migrate`,"
        " which takes the installation's migration lock.",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...", help="the command and its arguments")
    p.set_defaults(func=cmd_manage)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sendit.dicomio.quiet import install_log_guard

    install_log_guard()  # first: no DICOM library's text (it quotes values) reaches a console or log
    parser = build_parser()
    parser.add_argument("--version", action="version", version=f"sendit {_version()}")
    args = parser.parse_args(argv)
    if args.config:
        os.environ["SENDIT_CONFIG"] = str(Path(args.config).resolve())
    try:
        return int(args.func(args))
    except ConfigError as error:
        return _fail(error.problems)
    except Exception as exc:
        line = unavailable(exc)
        if line is None:
            raise
        return _fail([line], EXIT_UNAVAILABLE)


if __name__ == "__main__":
    sys.exit(main())
