"""Sendit: a DICOM de-identification relay for research imaging."""

__version__ = "0.1.0"
