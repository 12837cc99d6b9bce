"""Google Cloud: every de-identified instance (and optionally each series as NIfTI) in a Cloud Storage
bucket, and one metadata entity per series in Datastore.

One folder for the integration: settings, clients and error words (``client``), the object layout
(``layout``), the Storage adapter (``storage``), the NIfTI conversion and its adapter (``nifti``) and
the Datastore adapter (``datastore``). The Google client libraries are imported only when an adapter
is made, so the rest of Sendit runs without them being used. Documented in docs/destinations.md.
"""

from sendit.destinations.google.settings import GoogleSettings

__all__ = ["GoogleSettings"]
