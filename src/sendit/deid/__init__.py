"""De-identification: PS3.15 Annex E Basic Profile, keyed UID remapping and date shifting.

A functional core with no Django: ``Deidentifier(secret_key).deidentify_file(src, dst, ids)`` is all a
notebook needs; :func:`deid_folder` runs the engine over a folder with an identifier provider.
"""

from sendit.deid.engine import Deidentifier, DeidError, DeidResult
from sendit.deid.folder import FolderSummary, deid_folder
from sendit.deid.profile import DeidOptions

__all__ = ["DeidError", "DeidOptions", "DeidResult", "Deidentifier", "FolderSummary", "deid_folder"]
