"""The `sendit` command as a user runs it: its own config, data folder, processes and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from sendit.demo import generate_demo
from tests.helpers import stop_process_group, wait_for

pytestmark = pytest.mark.slow  # starts `sendit` processes

SECRET = "cli-test-secret-key-0123456789-abcdefghijkl"


def sendit(
    tmp: Path, *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sendit", *args],
        cwd=tmp,
        env=env or cli_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no test settings, no DATABASE_URL leaking in from the test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDIT_", "DJANGO_")) and k != "DATABASE_URL"}
    env.update({"SENDIT_CONFIG": str(tmp / "sendit.toml"), "SENDIT_WORKERS": "2", **extra})
    return env


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    (tmp_path / "sendit.toml").write_text(f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\nRETRY_BASE_SECONDS = 0\n')
    return tmp_path


def test_demo_command_takes_the_demo_to_done(tmp_path: Path) -> None:
    # as after the quick start: the virtualenv's bin folder is not on PATH
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    result = sendit(tmp_path, "demo", str(tmp_path / "demo"), env={**cli_env(tmp_path / "demo"), "PATH": path})
    assert result.returncode == 0, result.stderr
    assert "DONE" in result.stderr
    outputs = list((tmp_path / "demo" / "sendit-data" / "output").rglob("*.dcm"))
    assert len(outputs) > 20
    modalities = {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in outputs}
    assert len(modalities) >= 3
    # its hint works as printed, from the same shell
    hint = next(line for line in result.stdout.splitlines() if "shows the counts" in line).split("`")[1]
    shown = subprocess.run(
        hint, shell=True, cwd=tmp_path, env={**cli_env(tmp_path), "PATH": path}, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert "DONE" in shown.stdout


def test_import_wait_exits_nonzero_with_a_summary_by_reason(configured: Path) -> None:
    folder = configured / "incoming"
    written = generate_demo(folder, patients=1, images_per_series=2, size=32)
    (written[0].parent / "junk.bin").write_bytes(b"\x00" * 300)
    result = sendit(configured, "import", str(folder), "--wait")
    assert result.returncode == 1
    assert "junk.bin" in result.stderr and "not a DICOM file" in result.stderr
    assert "did not end DONE or SKIPPED" in result.stderr
    for path in written:  # a folder outside the input folder is the user's: never deleted
        assert path.exists()
    status = sendit(configured, "status", "--json")
    report = json.loads(status.stdout)
    assert report["counts"]["DONE"] == len(written) and report["counts"]["QUARANTINED"] == 0
    assert report["files"]["QUARANTINED"] == 1  # the junk file: counted apart from images


def test_import_wait_exits_zero_when_all_done(configured: Path) -> None:
    folder = configured / "incoming"
    written = generate_demo(folder, patients=1, images_per_series=2, size=32)
    result = sendit(configured, "import", str(folder), "--wait")
    assert result.returncode == 0, result.stderr
    assert len(list((configured / "data" / "output").rglob("*.dcm"))) == len(written)


def test_import_wait_with_a_series_split_across_chunks_delivers_every_image_once(configured: Path) -> None:
    """Series X has files in two folders that the walk reaches apart (a/, then Y's b/, then c/), 400
    files with 3 workers: every image ends DONE and is delivered exactly once (also the case that
    an import overlapping ingest with processing must keep: X would be processed in two runs)."""
    import random

    import numpy as np
    from pydicom.uid import generate_uid

    from sendit.demo import UID_ROOT, Study, make_image, make_patient

    rng = random.Random(3)
    study = Study.fresh(rng, study_id="1", accession="A12345678")
    patient, pixels = make_patient(rng, 0), np.random.default_rng(3)
    folder = configured / "incoming"
    layout = {"X": [("a", 150), ("c", 100)], "Y": [("b", 150)]}  # the walk reads a/, b/, c/
    for name, parts in layout.items():
        series_uid = generate_uid(prefix=UID_ROOT)
        instance = 0
        for sub, count in parts:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                instance += 1
                ds = make_image(patient, study, series_uid, 1 if name == "X" else 2, "CT", instance, 16, pixels)
                ds.save_as(folder / sub / f"{name}{instance:04d}.dcm", enforce_file_format=True)
    result = sendit(configured, "import", str(folder), "--wait", env=cli_env(configured, SENDIT_WORKERS="3"))
    assert result.returncode == 0, result.stderr
    assert "DONE 400" in result.stderr
    delivered = [pydicom.dcmread(path).SOPInstanceUID for path in (configured / "data" / "output").rglob("*.dcm")]
    assert len(delivered) == 400 and len(set(delivered)) == 400


def test_import_wait_starts_processing_before_the_last_file_is_recorded(configured: Path) -> None:
    """Issue 17: the workers start on the first committed chunk. Several series in folders the walk
    reads one after the other: the first is de-identified while later files are still being
    recorded, and every image still ends DONE."""
    import sqlite3

    written = generate_demo(configured / "incoming", patients=6, images_per_series=60, size=64)
    result = sendit(configured, "import", str(configured / "incoming"), "--wait")
    assert result.returncode == 0, result.stderr
    assert f"DONE {len(written)}" in result.stderr
    with sqlite3.connect(configured / "data" / "sendit.sqlite3") as db:
        (last_recorded,) = db.execute("SELECT max(created) FROM relay_image").fetchone()
        (first_processed,) = db.execute(
            "SELECT min(created) FROM relay_event WHERE to_status = 'PROCESSING'"
        ).fetchone()
    assert first_processed < last_recorded, (first_processed, last_recorded)


def test_check_masks_secrets_and_reports_bad_values(configured: Path) -> None:
    result = sendit(configured, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert SECRET not in result.stdout and "SECRET_KEY = ****** (set)" in result.stdout
    bad = sendit(configured, "check", env=cli_env(configured, SENDIT_WORKERS="zero", SENDIT_ORTHANC_PORT="0"))
    assert bad.returncode == 2
    assert "SENDIT_WORKERS" in bad.stderr and "SENDIT_ORTHANC_PORT" in bad.stderr


def test_deid_command_needs_no_database(configured: Path) -> None:
    source = configured / "in"
    written = generate_demo(source, patients=1, images_per_series=2, size=32)
    result = sendit(configured, "deid", str(source), str(configured / "out"))
    assert result.returncode == 0, result.stderr
    outputs = list((configured / "out").rglob("*.dcm"))
    assert len(outputs) == len(written)
    original = pydicom.dcmread(written[0])
    blob = b"".join(p.read_bytes() for p in outputs)
    assert str(original.PatientID).encode() not in blob
    assert not (configured / "data" / "sendit.sqlite3").exists()


def test_run_watches_processes_and_serves_status(configured: Path) -> None:
    """`sendit run`: watcher + Huey workers + web server; a dropped folder ends DONE without a manual step."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sendit", "run", "--port", str(port)],
        cwd=configured,
        env=cli_env(configured),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        staging = configured / "staging"
        written = generate_demo(staging, patients=1, images_per_series=2, size=32)
        input_folder = configured / "data" / "input"
        assert wait_for(lambda: input_folder.exists(), 30)
        for study in staging.iterdir():
            study.rename(input_folder / study.name)
        assert wait_for(lambda: len(list((configured / "data" / "output").rglob("*.dcm"))) == len(written), 90)
        assert wait_for(lambda: _counts(configured).get("DONE") == len(written), 30)
        import httpx

        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json() == {"status": "ok"}
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 302 and "login" in page.headers["location"]  # login required
    finally:
        stop_process_group(process)


def _counts(tmp: Path) -> dict[str, int]:
    result = sendit(tmp, "status", "--json")
    return json.loads(result.stdout)["counts"] if result.returncode == 0 else {}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_killed_import_is_finished_by_running_it_again(configured: Path) -> None:
    """kill -9 in the middle of work; the same command again finishes everything, nothing doubled."""
    folder = configured / "data" / "input" / "batch"
    written = generate_demo(folder, patients=8, images_per_series=12, size=256)
    env = cli_env(configured, SENDIT_WORKERS="1", SENDIT_BATCH_SIZE="5")
    process = subprocess.Popen(
        [sys.executable, "-m", "sendit", "import", str(folder), "--wait"],
        cwd=configured,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    output = configured / "data" / "output"
    try:
        assert wait_for(lambda: len(list(output.rglob("*.dcm"))) >= 5, 60)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    interrupted = _counts(configured)
    assert interrupted["DONE"] < len(written)  # really killed in the middle
    again = sendit(configured, "import", str(folder), "--wait", env=env)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert _counts(configured)["DONE"] == len(written)
    outputs = list(output.rglob("*"))
    assert len([p for p in outputs if p.suffix == ".dcm"]) == len(written)
    assert not [p for p in outputs if p.name.endswith(".part")]


# -- the commands' help, and refusals ----------------------------------------------------------------


def test_every_command_and_option_is_described() -> None:
    from sendit.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help for choice in commands._choices_actions}
    undescribed = []
    for name, command in commands.choices.items():
        if not summaries.get(name) or not command.description:
            undescribed.append(name)
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                undescribed.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not undescribed, f"no help text: {undescribed}"
    assert "migrate" in commands.choices


def test_help_of_a_command_describes_it(configured: Path) -> None:
    result = sendit(configured, "cleanup", "--help")
    assert result.returncode == 0
    assert "PHI-free summary" in result.stdout and "--yes" in result.stdout


def test_status_of_a_fresh_installation_creates_nothing(configured: Path) -> None:
    result = sendit(configured, "status")
    assert result.returncode == 1
    assert "no database yet" in result.stderr and "migrate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (configured / "data").exists()  # no folder, no database file


def test_migrate_makes_the_schema_that_status_reads(configured: Path) -> None:
    migrated = sendit(configured, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "up to date" in migrated.stdout
    again = sendit(configured, "migrate")
    assert again.returncode == 0 and "0 migration(s)" in again.stdout
    status = sendit(configured, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["DONE"] == 0


def test_retry_of_an_unknown_series_is_refused(configured: Path) -> None:
    folder = configured / "incoming"
    generate_demo(folder, patients=1, images_per_series=2, size=32)
    assert sendit(configured, "import", str(folder), "--wait").returncode == 0
    result = sendit(configured, "retry", "1", "999999")
    assert result.returncode == 1
    assert result.stderr.strip() == "sendit: no series 999999; nothing retried"
    assert "requeued" not in result.stdout
    assert sendit(configured, "retry", "1").returncode == 0


def test_cleanup_of_everything_now_needs_yes(configured: Path) -> None:
    folder = configured / "incoming"
    written = generate_demo(folder, patients=1, images_per_series=2, size=32)
    assert sendit(configured, "import", str(folder), "--wait").returncode == 0
    refused = sendit(configured, "cleanup", "--days", "0")
    assert refused.returncode == 1
    assert "--yes" in refused.stderr and "every finished series" in refused.stderr
    assert _counts(configured)["DONE"] == len(written)  # nothing pruned
    assert sendit(configured, "cleanup", "--days", "-1").returncode == 2  # argparse: not a number of days
    done = sendit(configured, "cleanup", "--days", "0", "--yes")
    assert done.returncode == 0, done.stderr
    assert _counts(configured)["DONE"] == 0
