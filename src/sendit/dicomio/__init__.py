"""Reading DICOM headers for ingest: fast, header-only, with a clear reason for every bad file."""

from sendit.dicomio.headers import NOT_REGULAR, SYMLINK, FileHeader, RejectedFile, read_header

__all__ = ["NOT_REGULAR", "SYMLINK", "FileHeader", "RejectedFile", "read_header"]
