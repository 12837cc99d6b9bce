"""Identifier providers: where replacement PatientID, AccessionNumber and date shift come from."""

from sendit.identifiers.base import IdentifierError, IdentifierProvider, Identifiers, SeriesHeader

__all__ = ["IdentifierError", "IdentifierProvider", "Identifiers", "SeriesHeader"]
