"""No original value in any output stream: the real `sendit import`, `deid` and `run`, started as a
user starts them, on a corpus whose values make pydicom complain (and quote them); and the process
guard (:func:`sendit.dicomio.quiet.install_log_guard`) on what escapes a ``quiet()`` block.

pydicom's warnings quote the value they complain about ("Invalid value for VR UI: '…'"); its
logger does too. The corpus plants canaries (see :mod:`tests.test_deid_canary`) and values pydicom
warns about — UIDs with a leading zero in a component (common in vendors' UIDs, and accepted by
the relay), an overlong UID, invalid dates and times, odd value lengths, a person name with too many
components, an unknown VR and an unknown character set — and every command's stdout, stderr and any
log file it leaves is searched for every canary and every original UID and patient value.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from sendit.demo import generate_demo
from tests.helpers import stop_process_group, wait_for
from tests.test_deid_canary import Canaries, canary_file

SECRET = "logs-phi-test-secret-key-0123456789-abcdefgh"
TERMINAL = ("DONE", "QUARANTINED", "SKIPPED", "ERROR")


@contextmanager
def _lenient() -> Iterator[None]:
    """Let pydicom write the malformed values a real archive holds (and say nothing about them)."""
    settings = pydicom_config.settings
    reading, writing = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = reading, writing


def _leading_zero(uid: str, k: int) -> str:
    """A UID pydicom calls invalid (a component with a leading zero) that the relay accepts."""
    return f"{uid[:50].rstrip('.')}.0{k:04d}"


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, old
    return data.replace(old, new)


def _plant_demo(path: Path, k: int) -> None:
    """Values pydicom warns about, one kind more per file (a few files reach DONE, others not)."""
    ds = pydicom.dcmread(path)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(ds, keyword, _leading_zero(str(getattr(ds, keyword)), k if keyword == "SOPInstanceUID" else 7))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = f"CANARYPN{k}A^B=C=D=E"  # four component groups: pydicom allows three
    ds.SeriesDescription = f"CANARYLONG{k} " + "x" * 70  # longer than LO allows
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = f"1.2.3.CANARYREF{k}"  # letters in a UID
    ds.ReferencedImageSequence = Sequence([ref])
    ds.InstitutionName = f"CANARYODD{k:02d}"  # made odd-length below
    ds.StationName = f"CANARYVR{k:02d}"  # given an unknown VR below (variant 4)
    variant = k % 7
    if variant == 1:
        ds.StudyDate = "2021-13-45"
    elif variant == 2:
        ds.SeriesTime, ds.ContentTime = "256199", "12:61:99"
    elif variant == 3:
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.1078." + "1234567890" * 4 + f"{k:04d}"  # 72 characters
    elif variant == 5:
        ds.SpecificCharacterSet = "ISO_IR 999"
        ds.OperatorsName = f"CANARYCS{k}^Zoë".encode("latin-1")
    elif variant == 6:
        ds.add_new(0x00181030, "LO", f"CANARYDS{k}\\" + "y" * 70)
    ds.save_as(path)
    data = path.read_bytes()
    data = _replace_once(
        data, b"LO\x0c\x00" + f"CANARYODD{k:02d}".encode(), b"LO\x0b\x00" + f"CANARYODD{k:02d}"[:-1].encode()
    )
    if variant == 4:
        data = _replace_once(
            data, b"SH\x0a\x00" + f"CANARYVR{k:02d}".encode(), b"ZZ\x0a\x00" + f"CANARYVR{k:02d}".encode()
        )
    if variant == 6:  # SliceThickness with a decimal comma
        data = _replace_once(data, b"\x18\x00\x50\x00DS\x04\x001.0 ", b"\x18\x00\x50\x00DS\x04\x001,0 ")
    path.write_bytes(data)


def build_corpus(folder: Path) -> tuple[list[Path], set[str]]:
    """The input files, and every value that must not appear in any output stream."""
    with _lenient():
        written = generate_demo(folder / "demo", patients=2, images_per_series=3, size=16)
        for k, path in enumerate(written):
            _plant_demo(path, k)
        markers: set[bytes] = set()
        for k, syntax in enumerate((ExplicitVRLittleEndian, ImplicitVRLittleEndian)):
            canaries = Canaries(keep_dated_times=True, counter=itertools.count(1 + 20_000 * k))
            path = canary_file(folder / f"canary{k}.dcm", canaries, syntax)
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.999.0{k}.{k}"
            ds.save_as(path)
            written.append(path)
            markers.update(canaries.markers)
        secrets = {m.decode("latin-1") for m in markers}
        for path in written:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "AccessionNumber"):
                value = ds.get(keyword)
                if value:
                    secrets.add(str(value))
            if ds.get("PatientName"):
                secrets.update(part for part in re.split(r"[\^=]", str(ds.PatientName)) if len(part) >= 5)
    assert len(written) >= 10
    return written, {s for s in secrets if len(s) >= 5}


def sendit(cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sendit", *args],
        cwd=cwd,
        env=cli_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_env(tmp: Path) -> dict[str, str]:
    """A user's environment: no test settings, and Python's own warning defaults (PYTHONWARNINGS unset)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SENDIT_", "DJANGO_")) and k not in ("DATABASE_URL", "PYTHONWARNINGS")
    }
    env.update({"SENDIT_CONFIG": str(tmp / "sendit.toml"), "SENDIT_WORKERS": "2"})
    return env


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    (tmp_path / "sendit.toml").write_text(f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\nRETRY_BASE_SECONDS = 0\n')
    return tmp_path


def leaks(streams: dict[str, str], secrets: set[str]) -> list[str]:
    """``stream: value`` for every secret found; the log files under ``data`` count as streams."""
    return sorted(f"{name}: {secret}" for name, text in streams.items() for secret in secrets if secret in text)


def log_files(root: Path) -> dict[str, str]:
    return {str(p): p.read_text(errors="replace") for p in root.rglob("*.log") if p.is_file()}


def _counts(cwd: Path) -> dict[str, int]:
    result = sendit(cwd, "status", "--json")
    return json.loads(result.stdout)["counts"] if result.returncode == 0 else {}


@pytest.mark.slow
def test_import_wait_says_nothing_original(configured: Path) -> None:
    written, secrets = build_corpus(configured / "incoming")
    result = sendit(configured, "import", "--wait", str(configured / "incoming"))
    assert "result:" in result.stderr, result.stderr  # it ran to the end
    counts = _counts(configured)
    assert sum(counts.get(status, 0) for status in TERMINAL) == len(written), counts
    assert counts.get("DONE", 0) >= 2 and counts.get("QUARANTINED", 0) >= 1, counts
    streams = {"stdout": result.stdout, "stderr": result.stderr, **log_files(configured)}
    assert leaks(streams, secrets) == []


@pytest.mark.slow
def test_deid_says_nothing_original(configured: Path) -> None:
    written, secrets = build_corpus(configured / "incoming")
    result = sendit(configured, "deid", "--workers", "2", str(configured / "incoming"), str(configured / "out"))
    assert "de-identified" in result.stdout, result.stderr
    assert len(list((configured / "out").rglob("*.dcm"))) >= 2
    streams = {"stdout": result.stdout, "stderr": result.stderr, **log_files(configured)}
    assert leaks(streams, secrets) == []


@pytest.mark.slow
def test_run_says_nothing_original(configured: Path) -> None:
    out, err = configured / "run.stdout", configured / "run.stderr"
    with out.open("w") as stdout, err.open("w") as stderr:  # files: a full pipe would stall the service
        process = subprocess.Popen(
            [sys.executable, "-m", "sendit", "run", "--port", str(_free_port())],
            cwd=configured,
            env=cli_env(configured),
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    try:
        written, secrets = build_corpus(configured / "staging")
        input_folder = configured / "data" / "input"
        assert wait_for(lambda: input_folder.exists(), 30)
        for entry in (configured / "staging").iterdir():
            entry.rename(input_folder / entry.name)

        def finished() -> bool:
            counts = _counts(configured)
            return sum(counts.get(status, 0) for status in TERMINAL) == len(written)

        assert wait_for(finished, 120, every=1.0), _counts(configured)
    finally:
        stop_process_group(process)
    assert "watching" in out.read_text()
    streams = {"stdout": out.read_text(), "stderr": err.read_text(), **log_files(configured)}
    assert leaks(streams, secrets) == []


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_manage_shell_withholds_what_pydicom_says(configured: Path) -> None:
    """An operator reading a file in `sendit manage shell` (as one does with a quarantined file):
    pydicom's complaints, outside any ``quiet()``, show as a count, never with the value."""
    written, secrets = build_corpus(configured / "incoming")
    code = (
        "import pydicom\n"
        f"for path in {[str(path) for path in written]!r}:\n"
        "    try:\n"
        "        print('read', len([element.value for element in pydicom.dcmread(path).iterall()]))\n"
        "    except Exception as exc:\n"
        "        print('unreadable', type(exc).__name__)\n"
    )
    result = sendit(configured, "manage", "shell", "-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "read" in result.stdout
    assert leaks({"stdout": result.stdout, "stderr": result.stderr}, secrets) == []
    assert "pydicom: UserWarning withheld" in result.stderr  # something was said, and counted


# -- the guard in one process: no subprocess, so part of the fast loop ------------------------------

QUOTED = 'x\'y CANARYQUOTE "z"'  # both quote kinds: pydicom's repr escapes one of them


@pytest.fixture
def operator_handler() -> Iterator[list[str]]:
    """What a handler an operator puts on the root logger (a log file, the journal) receives."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    handler = Keep(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    yield seen
    root.removeHandler(handler)


def test_library_log_records_never_reach_an_operators_handler(operator_handler: list[str]) -> None:
    from sendit.dicomio import read_header  # noqa: F401 - importing the package installs the logger guard

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DataElement(0x00080060, "CS", QUOTED)  # pydicom logs "Invalid value for VR CS: <the value>"
    logging.getLogger("pynetdicom.assoc").warning("Affected SOP Instance UID: 1.2.3.CANARYNET")
    assert [line for line in operator_handler if "CANARY" in line] == []
    from sendit.dicomio.quiet import withheld

    counts = withheld()
    assert counts.get("pydicom: WARNING record", 0) >= 1 and counts.get("pynetdicom.assoc: WARNING record", 0) >= 1


def test_a_warning_that_escapes_quiet_in_another_thread_is_withheld(recwarn: pytest.WarningsRecorder) -> None:
    """``quiet()`` is ``warnings.catch_warnings``, which is process-wide: thread A leaving its block
    restores the filters while thread B is still inside its own. The process guard catches that."""
    from sendit.dicomio.quiet import install_log_guard, quiet, withheld

    install_log_guard()  # what every `sendit` process does first (pytest undoes the warnings part)
    before = withheld().get("pydicom: UserWarning", 0)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with quiet():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second() -> None:
        a_in.wait(10)
        with quiet():
            b_in.set()
            a_out.wait(10)
            DataElement(0x00080060, "CS", QUOTED)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any("CANARY" in str(w.message) for w in recwarn.list)
    assert withheld().get("pydicom: UserWarning", 0) == before + 1  # it did escape quiet(), and was counted
