"""Storage Commitment Push Model (PS3.4 Annex J): the standard's own way to ask "do you hold these?".

The requester sends N-ACTION-RQ (Action Type 1, "Request Storage Commitment") naming each instance
by SOP Class and SOP Instance UID under a fresh Transaction UID; the peer answers at once, then
reports later with N-EVENT-REPORT-RQ (Event Type 1: all committed; 2: some failed) carrying the
same Transaction UID, the committed instances (Referenced SOP Sequence) and the failed ones (Failed
SOP Sequence, each with a Failure Reason). Orthanc (since 1.6) sends the report on an association
of its own to the requester's AE, as most implementations do: Sendit's listener receives it.

This module builds the request and reads the report; it knows neither the network nor the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.uid import UID

#: PS3.4 J.3 (and PS3.6 Annex A): the SOP Class, and its well-known SOP Instance
STORAGE_COMMITMENT_PUSH = UID("1.2.840.10008.1.20.1")
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
#: PS3.4 Table J.3-1: Action Type ID of "Request Storage Commitment"
REQUEST_COMMITMENT = 1
#: PS3.4 Table J.3-2: Event Type IDs of the report
ALL_COMMITTED = 1
SOME_FAILED = 2


@dataclass(frozen=True)
class CommitmentReport:
    """What the peer committed to, for one transaction; ``failed`` maps a UID to its Failure Reason."""

    transaction_uid: str
    committed: frozenset[str] = frozenset()
    failed: Mapping[str, int] = field(default_factory=dict)


def commitment_request(transaction_uid: str, instances: Mapping[str, str]) -> Dataset:
    """The N-ACTION-RQ Action Information (PS3.4 Table J.3-1); ``instances``: SOPInstanceUID → SOP Class."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for instance_uid, class_uid in instances.items():
        item = Dataset()
        item.ReferencedSOPClassUID = class_uid
        item.ReferencedSOPInstanceUID = instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def parse_report(ds: Dataset) -> CommitmentReport:
    """The N-EVENT-REPORT-RQ Event Information (PS3.4 Table J.3-2); ValueError when it has no Transaction UID."""
    transaction_uid = str(ds.get("TransactionUID", "") or "")
    if not transaction_uid:
        raise ValueError("storage commitment report without a Transaction UID")
    committed = frozenset(
        str(item.ReferencedSOPInstanceUID)
        for item in ds.get("ReferencedSOPSequence", [])
        if "ReferencedSOPInstanceUID" in item
    )
    failed = {
        str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", 0x0110) or 0x0110)
        for item in ds.get("FailedSOPSequence", [])
        if "ReferencedSOPInstanceUID" in item
    }
    return CommitmentReport(transaction_uid, committed, failed)
