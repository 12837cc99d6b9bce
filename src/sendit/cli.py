"""The `sendit` command: set-up, the long-running service, one-shot imports and the engine alone."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sendit.config import Config, ConfigError, load_config, write_config


def _fail(lines: list[str]) -> int:
    print("sendit: configuration problems:", file=sys.stderr)
    for line in lines:
        print("  " + line, file=sys.stderr)
    return 2


def _django(migrate: bool = True) -> Config:
    """Set Django up on the validated configuration; makes the data folders and the schema."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sendit.server.settings")
    import django
    from django.conf import settings

    django.setup()
    cfg = settings.SENDIT
    for name in ("DATA_DIR", "INPUT_FOLDER", "WORK_FOLDER", "QUARANTINE_FOLDER"):
        Path(cfg.values[name]).mkdir(parents=True, exist_ok=True)
    if migrate:
        from sendit.relay.installation import KeyMismatch, check_key
        from sendit.relay.installation import migrate as migrate_schema

        migrate_schema(Path(cfg.DATA_DIR))
        try:
            check_key(cfg.SECRET_KEY)
        except KeyMismatch as exc:
            raise SystemExit(f"sendit: {exc}") from None
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
    problems = 0
    for name in ("DATA_DIR", "INPUT_FOLDER", "WORK_FOLDER", "QUARANTINE_FOLDER"):
        folder = Path(cfg.values[name])
        try:
            folder.mkdir(parents=True, exist_ok=True)
            ok = os.access(folder, os.W_OK)
        except OSError:
            ok = False
        print(f"  [{'ok' if ok else 'FAIL'}] {name} writable")
        problems += not ok
    _django(migrate=False)
    from sendit.relay import runtime

    for destination in runtime.destinations():
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
    return 1 if problems else 0


def cmd_worker(args: argparse.Namespace) -> int:
    cfg = _django()
    from django.db import connections
    from huey.consumer import Consumer

    from sendit.relay.tasks import huey, requeue_stale
    from sendit.web.heartbeat import install

    install(huey)  # each worker process shows itself as alive on the dashboard

    requeue_stale()
    connections.close_all()
    workers = args.workers or cfg.WORKERS
    consumer = Consumer(huey, workers=workers, worker_type="process", periodic=True, initial_delay=0.1, max_delay=1.0)
    consumer.run()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Watcher and web server in this process; the queue workers in a child `sendit worker`."""
    cfg = _django()
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from django.core.wsgi import get_wsgi_application

    from sendit.relay.ingest import IngestReport
    from sendit.relay.tasks import enqueue
    from sendit.relay.watcher import Watcher

    worker = subprocess.Popen([sys.executable, "-m", "sendit", "worker"], env=os.environ.copy())

    def enqueue_ingested(report: IngestReport) -> None:
        enqueue(report.series_ids)

    watcher = Watcher(Path(cfg.INPUT_FOLDER), cfg.RESCAN_SECONDS, enqueue_ingested)
    watcher.start()

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - wsgiref's name
            return None

    host, port = args.host or cfg.WEB_HOST, args.port or cfg.WEB_PORT
    server = make_server(host, port, get_wsgi_application(), server_class=Server, handler_class=QuietHandler)
    print(f"sendit: watching {cfg.INPUT_FOLDER}; status page on http://{host}:{port}/ ; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        watcher.stop()
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


def _import(paths: list[Path], wait: bool, workers: int, quiet: bool = False) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sendit.relay.housekeeping import images_per_status, reasons_per_status
    from sendit.relay.ingest import IngestReport, complete_files, ingest_paths
    from sendit.relay.inline import run_inline
    from sendit.relay.models import TERMINAL, Image, Status

    console = Console(stderr=True, quiet=quiet)
    report = IngestReport()
    for path in paths:
        if not path.exists():
            console.print(f"[red]{path}: no such file or folder[/red]")
            return 2
        report.add(ingest_paths([path] if path.is_file() else complete_files(path)))
    for name, _, reason in report.problems:
        console.print(f"[yellow]{name}: {reason}[/yellow]")
    console.print(
        f"ingested {report.images} image(s) in {len(report.series_ids)} series"
        f" ({report.rejected} rejected, {report.skipped} skipped, {report.quarantined} quarantined,"
        f" {report.reprocessed} again)"
    )
    series_ids = report.series_ids | report.resumable
    if not wait:
        from sendit.relay.tasks import enqueue

        enqueue(series_ids)
        return 0
    if report.resumable:
        console.print(f"resuming {len(report.resumable)} series recorded earlier and still in flight")
    images = Image.objects.filter(series_id__in=series_ids)
    total = images.count()
    # no refresh thread (auto_refresh=False): the worker pool forks, and a fork should find no other thread
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=False,
    ) as progress:
        task = progress.add_task("de-identify and deliver", total=total)

        def update() -> None:
            progress.update(task, completed=images.filter(status__in=TERMINAL).count(), refresh=True)

        run_inline(series_ids, workers, on_progress=update)
        update()
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


def cmd_status(args: argparse.Namespace) -> int:
    _django()
    from sendit.relay.housekeeping import problem_reasons, status_counts
    from sendit.web.overview import free_space, space_lines

    counts = status_counts()
    space = free_space()
    if args.json:
        problems = [list(row) for row in problem_reasons()]
        print(json.dumps({"counts": counts, "problems": problems, "disk": space}, indent=2, default=str))
        return 0
    for status, n in counts.items():
        print(f"{status:15s} {n}")
    for line in space_lines(space):
        print(f"disk: {line}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    _django()
    from sendit.relay.housekeeping import retry_errors
    from sendit.relay.tasks import enqueue

    series = retry_errors(args.series or None)
    enqueue(series)
    print(f"requeued {len(series)} series")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
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
    from sendit.deid import build_deidentifier, deid_folder
    from sendit.identifiers.local import LocalProvider

    provider = LocalProvider(cfg.SECRET_KEY, cfg.DATE_SHIFT_MIN_DAYS, cfg.DATE_SHIFT_MAX_DAYS)
    engine = build_deidentifier(cfg.SECRET_KEY, cfg.DEID_OPTIONS, cfg.DEID_RECIPE, cfg.DEID_FILTER)
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
    print(f"demo: `SENDIT_CONFIG={directory / 'sendit.toml'} sendit status` shows the counts")
    return result


def cmd_createuser(args: argparse.Namespace) -> int:
    """A dashboard/API account; with --token also a bearer token for scripts (printed once)."""
    _django()
    from getpass import getpass

    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    from sendit.web.tokens import issue

    users = get_user_model()
    user = users.objects.filter(username=args.username).first()
    if user is not None and not (args.token or args.identifiers):
        hint = "--token adds an API token, --identifiers the permission"
        print(f"sendit: user {args.username} exists ({hint})", file=sys.stderr)
        return 1
    if user is None:
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
        user = users.objects.create_user(args.username, password=password or None)
        if args.superuser:
            user.is_staff = user.is_superuser = True
            user.save(update_fields=["is_staff", "is_superuser"])
        print(f"created user {args.username}" + (" (superuser)" if args.superuser else ""))
    if args.identifiers:
        user.user_permissions.add(Permission.objects.get(codename="view_identifier_response"))
        print(f"{args.username} may see identifier responses")
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
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write sendit.toml with a fresh SECRET_KEY")
    p.add_argument("directory", nargs="?", default=".")
    p.set_defaults(func=cmd_init)
    sub.add_parser("check", help="print the effective configuration; check folders and destinations").set_defaults(
        func=cmd_check
    )
    p = sub.add_parser("run", help="watcher + workers + web server")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("worker", help="run the queue workers")
    p.add_argument("--workers", type=int)
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("import", help="ingest folders now")
    p.add_argument("paths", nargs="+")
    p.add_argument("--wait", action="store_true", help="process here and exit 0 only if all ended DONE/SKIPPED")
    p.add_argument("--workers", type=int)
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("status", help="counts per status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("retry", help="retry images in ERROR")
    p.add_argument("series", nargs="*", type=int)
    p.set_defaults(func=cmd_retry)
    p = sub.add_parser("cleanup", help="prune finished rows older than RETENTION_DAYS")
    p.add_argument("--days", type=int)
    p.set_defaults(func=cmd_cleanup)
    p = sub.add_parser("deid", help="de-identify a folder into another, no database")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--workers", type=int, help="processes (default WORKERS)")
    p.set_defaults(func=cmd_deid)
    p = sub.add_parser("demo", help="generate a demo data set and take it to DONE")
    p.add_argument("directory", nargs="?", default="sendit-demo")
    p.add_argument("--patients", type=int, default=3)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("createuser", help="an account for the dashboard and the API")
    p.add_argument("username")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p.add_argument("--no-password", action="store_true", help="no password login (for a token-only script user)")
    p.add_argument("--superuser", action="store_true", help="may also use /admin/ and see everything")
    p.add_argument("--identifiers", action="store_true", help="may see identifier responses (people → pseudonyms)")
    p.add_argument("--token", action="store_true", help="print a new API bearer token for this user")
    p.set_defaults(func=cmd_createuser)
    p = sub.add_parser("manage", help="Django's manage.py (createsuperuser, migrate, ...)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_manage)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sendit.dicomio.quiet import install_log_guard

    install_log_guard()  # first: no DICOM library's text (it quotes values) reaches a console or log
    args = build_parser().parse_args(argv)
    if args.config:
        os.environ["SENDIT_CONFIG"] = str(Path(args.config).resolve())
    try:
        return int(args.func(args))
    except ConfigError as error:
        return _fail(error.problems)


if __name__ == "__main__":
    sys.exit(main())
