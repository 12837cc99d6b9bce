"""Reading DICOM files: the folder walk, header-only reads for grouping, whole reads for
de-identification, and the checks that decide whether a file is whole, each with a clear reason for
every bad file and never a value from it.

Importing this package installs the filter that keeps pydicom's value-quoting log lines out of logs
(:mod:`sendit.dicomio.quiet`).
"""

from sendit.dicomio.headers import FileHeader, RejectedFile, read_header, read_header_of_bytes
from sendit.dicomio.quiet import quiet, redact_pydicom_logs
from sendit.dicomio.reading import UnreadableFile, read_dicom, sop_class_and_syntax
from sendit.dicomio.walk import NOT_REGULAR, SYMLINK, Found, Kind, walk

redact_pydicom_logs()

__all__ = [
    "NOT_REGULAR",
    "SYMLINK",
    "FileHeader",
    "Found",
    "Kind",
    "RejectedFile",
    "UnreadableFile",
    "quiet",
    "read_dicom",
    "read_header",
    "read_header_of_bytes",
    "sop_class_and_syntax",
    "walk",
]
