"""Reading DICOM headers for ingest: fast, header-only, with a clear reason for every bad file."""

from sendit.dicomio.headers import FileHeader, RejectedFile, read_header

__all__ = ["FileHeader", "RejectedFile", "read_header"]
