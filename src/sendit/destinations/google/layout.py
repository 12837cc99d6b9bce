"""Object names in the bucket: ``<prefix>/<pseudonym>/<study UID>/<series UID>/<SOP UID>.dcm``.

Every part is a pseudonym or a de-identified UID made safe as a path part (the folder destination's
:func:`~sendit.destinations.folder.safe_path_part`), so no PHI can appear in a name. A series' NIfTI
volume and its sidecar lie beside its instances as ``<series UID>[suffix].nii.gz`` / ``.json``.
"""

from __future__ import annotations

from sendit.destinations.folder import safe_path_part


def series_prefix(prefix: str, patient_id: str, study_uid: str, series_uid: str) -> str:
    """The "folder" of one series, ending in ``/``."""
    parts = [safe_path_part(patient_id), safe_path_part(study_uid), safe_path_part(series_uid)]
    return "/".join([prefix.strip("/"), *parts] if prefix.strip("/") else parts) + "/"


def instance_name(series: str, sop_instance_uid: str) -> str:
    return f"{series}{safe_path_part(sop_instance_uid)}.dcm"


def link(bucket: str, name: str) -> str:
    return f"gs://{bucket}/{name}"
