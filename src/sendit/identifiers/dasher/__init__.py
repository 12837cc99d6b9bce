"""Replacement identifiers from a DASHER-compatible REST service.

One ``POST {base}/uid/{study}`` per study (split when it names more items than the service should get
at once) returns a study-specific pseudonym (``suid``) and a day shift (``jitter``) per patient and a
pseudonym per accession. Anything short of a complete, well-formed answer raises ``IdentifierError``:
the caller must never fall back to the original identifiers. Messages and logs name positions and
counts only, never patient values, pseudonyms or the token, because they end up on the dashboard.

One module per concern: ``settings`` (the knobs, checked together), ``query`` (what is asked),
``client`` (HTTP: retries, deadline, token), ``answers`` (what is accepted), ``provider`` (the walk).
"""

from sendit.identifiers.dasher.provider import DasherProvider
from sendit.identifiers.dasher.settings import DasherSettings

__all__ = ["DasherProvider", "DasherSettings"]
