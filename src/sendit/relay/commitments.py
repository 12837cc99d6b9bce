"""Storage commitment reports between the listener (which receives them) and the worker (which asked).

The peer sends its N-EVENT-REPORT to Sendit's listener, in `sendit run`; the worker that sent the
N-ACTION waits in another process, maybe on another host. The report goes through the database:
:func:`record` writes it, :func:`wait_for` polls for it (bounded in time) and deletes it once read.
"""

from __future__ import annotations

import time
from datetime import timedelta

from django.utils import timezone

from sendit.destinations.commitment import CommitmentReport
from sendit.relay.models import CommitmentReport as ReportRow

#: how often a waiting worker looks for its report
POLL_SECONDS = 0.2
#: reports nobody read (the worker gave up waiting) are dropped after this long
UNREAD_DAYS = 1


def record(report: CommitmentReport) -> None:
    """Keep a report for its worker; a second report for one transaction (a peer's re-send) is dropped."""
    ReportRow.objects.bulk_create(
        [
            ReportRow(
                transaction_uid=report.transaction_uid,
                committed=sorted(report.committed),
                failed=dict(report.failed),
            )
        ],
        ignore_conflicts=True,
    )


def wait_for(transaction_uid: str, seconds: float) -> CommitmentReport | None:
    """1. Poll for the report of this transaction until it is there or ``seconds`` have passed.
    2. Delete it once read, and reports nobody read for a day. None when it did not come."""
    deadline = time.monotonic() + seconds
    while True:
        row = ReportRow.objects.filter(transaction_uid=transaction_uid).first()
        if row is not None:
            ReportRow.objects.filter(pk=row.pk).delete()
            ReportRow.objects.filter(received__lt=timezone.now() - timedelta(days=UNREAD_DAYS)).delete()
            return CommitmentReport(
                row.transaction_uid,
                frozenset(str(uid) for uid in row.committed),
                {str(uid): int(code) for uid, code in dict(row.failed).items()},
            )
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_SECONDS)
