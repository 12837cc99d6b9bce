"""pydicom's messages quote the values they complain about ("Invalid value for VR DA: '…'"), and
those values are often PHI. Everything in Sendit that reads or writes DICOM goes through here:

* :func:`redact_pydicom_logs` blanks every quoted part of pydicom's log records before any handler
  sees them (installed once, when :mod:`sendit.dicomio` is imported);
* :func:`quiet` silences pydicom's warnings, which quote values the same way, for a block of code.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class _RedactValues(logging.Filter):
    """Quoted parts of a pydicom log record are replaced by ``'<redacted>'``."""

    _QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._QUOTED.sub("'<redacted>'", record.getMessage())
        record.args = None
        return True


def redact_pydicom_logs() -> None:
    """Install the redacting filter on pydicom's logger (once, however often called)."""
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, _RedactValues) for f in logger.filters):
        logger.addFilter(_RedactValues())


@contextmanager
def quiet() -> Iterator[None]:
    """No warning raised inside this block reaches a log or the console."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
