"""pydicom's and pynetdicom's messages quote the values they complain about ("Invalid value for VR
UI: '…'", a data set dumped element by element), and those values are often PHI: an original UID,
a patient's name, a date. None of their text may reach a console, a log file or the journal.

Two layers:

* :func:`quiet` silences every warning raised inside a block of code; everything in Sendit that
  reads or writes DICOM runs inside one.
* :func:`install_log_guard`, at the start of every ``sendit`` command and of every worker process,
  catches what escapes such a block (a new code path, another thread, a pool worker): a warning
  raised while pydicom or pynetdicom code is on the stack, and every record of their loggers, is
  *withheld* — counted per source, never shown. The first, 10th, 100th, … of each source in a
  process is announced on the ``sendit.dicomio`` logger by source only (``pydicom: UserWarning``),
  so operators know something was said: a warning that escaped ``quiet()`` at WARNING (a code path
  to look at), a logger's record at INFO (pydicom logs every malformed value it meets, ``quiet()``
  or not). Any other warning is shown as Python would show it.

The logger part (:func:`redact_pydicom_logs`) is also installed when :mod:`sendit.dicomio` is
imported, so code that reads DICOM without going through the command line is covered too.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TextIO

#: Top-level packages whose messages may quote DICOM values.
LIBRARIES = ("pydicom", "pynetdicom")
_LIBRARY_MODULES = r"(pydicom|pynetdicom)(\..*)?"

log = logging.getLogger("sendit.dicomio")
_withheld: Counter[str] = Counter()
_lock = threading.Lock()


def withheld() -> dict[str, int]:
    """How many messages were withheld in this process, per source (``pydicom: UserWarning``,
    ``pynetdicom.assoc: ERROR record``); PHI-free, for a status line or a test."""
    with _lock:
        return dict(_withheld)


def _withhold(source: str, level: int) -> None:
    """Count one withheld message; announce the 1st, 10th, 100th, … of each source."""
    with _lock:
        _withheld[source] += 1
        count = _withheld[source]
    if str(count).rstrip("0") == "1":
        log.log(level, "%s withheld (%d so far): its text may quote a DICOM value", source, count)


def _library(name: str) -> str | None:
    top = name.partition(".")[0]
    return top if top in LIBRARIES else None


def _library_on_stack(frame: FrameType | None) -> str | None:
    """The library whose code is running below ``frame`` (a warning it raised, or one raised in a
    callback it called); warnings attribute themselves to a caller (``stacklevel``), so the file a
    warning names is not enough."""
    while frame is not None:
        found = _library(str(frame.f_globals.get("__name__", "")))
        if found is not None:
            return found
        frame = frame.f_back
    return None


class WithheldRecords(logging.Handler):
    """The only handler of the libraries' loggers (which do not propagate): every record is
    withheld and counted; its text is never formatted, let alone written. Named in the Django
    ``LOGGING`` setting."""

    def emit(self, record: logging.LogRecord) -> None:
        _withhold(f"{record.name}: {record.levelname} record", logging.INFO)  # chatter about malformed values


class _WithheldCapturedWarnings(logging.Filter):
    """For ``logging.captureWarnings(True)``: a library's warning arrives on ``py.warnings``
    already formatted, value included; it is withheld there too."""

    def filter(self, record: logging.LogRecord) -> bool:
        library = _library_on_stack(sys._getframe(1))
        if library is None:
            return True
        _withhold(f"{library}: warning", logging.WARNING)
        return False


def redact_pydicom_logs() -> None:
    """Route the libraries' loggers into :class:`WithheldRecords` (once, however often called).

    Logger filters would not do: a logger's filters see only its own records, not its children's
    (``pynetdicom.assoc``); a handler sees both. Propagation is cut so that a handler an operator
    puts on the root logger never receives the text either.
    """
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        logger.propagate = False
        if not any(isinstance(handler, WithheldRecords) for handler in logger.handlers):
            logger.handlers = [WithheldRecords()]
    captured = logging.getLogger("py.warnings")
    if not any(isinstance(f, _WithheldCapturedWarnings) for f in captured.filters):
        captured.addFilter(_WithheldCapturedWarnings())


class _ShowWarning:
    """``warnings.showwarning`` for the whole process: a library's warning is withheld, any other
    is shown by the function it replaced."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        library = _library_on_stack(sys._getframe(1))
        if library is None:
            self.previous(message, category, filename, lineno, file, line)
            return
        _withhold(f"{library}: {category.__name__}", logging.WARNING)  # it escaped every quiet()


def install_log_guard() -> None:
    """At process start (every ``sendit`` command, every worker process); idempotent.

    Besides the hook and the loggers, a filter in front of any ``-W``/``PYTHONWARNINGS`` setting
    sends the libraries' own warnings to the hook: never turned into an exception (whose text
    would carry the value into a traceback) and never dropped uncounted.
    """
    redact_pydicom_logs()
    if not isinstance(warnings.showwarning, _ShowWarning):
        warnings.showwarning = _ShowWarning(warnings.showwarning)
    warnings.filterwarnings("default", module=_LIBRARY_MODULES)


@contextmanager
def quiet() -> Iterator[None]:
    """No warning raised inside this block reaches a log or the console (not even as a count)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
