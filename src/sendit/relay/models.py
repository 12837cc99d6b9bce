"""Study, Series, Image, their identifiers, deliveries and the event log of every status change.

Original identifiers live here only while the work is in flight; pruning replaces finished rows with
a PHI-free ``Summary``. Paths are stored relative to the input folder.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Status(models.TextChoices):
    NEW = "NEW", "The image was just added to the application."
    PROCESSING = "PROCESSING", "The image is being de-identified."
    DONEPROCESSING = "DONEPROCESSING", "The image is de-identified, but has not been sent."
    SENT = "SENT", "The image has been sent, and verified received."
    DONE = "DONE", "The image has been received, and is ready for cleanup."
    ERROR = "ERROR", "A step failed after its retries; retry when the cause is fixed."
    QUARANTINED = "QUARANTINED", "The image cannot be de-identified safely; a person must look."
    SKIPPED = "SKIPPED", "A duplicate or a filtered file; nothing to do."


class Stage(models.TextChoices):
    """Where a series is in the pipeline (its status is the aggregate of its images')."""

    INGESTED = "ingested", "Recorded; waiting for a worker."
    IDENTIFIED = "identified", "Replacement identifiers stored."
    DEIDENTIFIED = "deidentified", "Working copies written."
    DELIVERED = "delivered", "Every destination confirmed the images sent."
    VERIFIED = "verified", "Every destination was asked and holds the images."
    RETRYING = "retrying", "A step failed; it runs again after a back-off."
    REQUEUED = "requeued", "A person sent images back into the pipeline."
    SPLIT = "split", "Split into parts, each de-identified and delivered by any free worker."
    ERROR = "error", "A step failed for good; images went to ERROR."


TERMINAL = (Status.DONE, Status.SKIPPED, Status.QUARANTINED, Status.ERROR)
IN_FLIGHT = (Status.NEW, Status.PROCESSING, Status.DONEPROCESSING, Status.SENT)


class Study(models.Model):
    study_uid = models.CharField(max_length=64, unique=True)
    deid_study_uid = models.CharField(max_length=64, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "studies"

    def __str__(self) -> str:
        return f"study #{self.pk}"


class Series(models.Model):
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="series")
    series_uid = models.CharField(max_length=64, unique=True)
    deid_series_uid = models.CharField(max_length=64, blank=True)
    modality = models.CharField(max_length=16, blank=True)
    # The identifying header values the identifier provider needs; PHI, pruned with the row.
    header = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.NEW, db_index=True)
    stage = models.CharField(max_length=32, choices=Stage.choices, default=Stage.INGESTED)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    lease_owner = models.CharField(max_length=255, blank=True)
    lease_expires = models.DateTimeField(null=True, blank=True, db_index=True)
    # Fencing token: +1 at every acquisition. A status change names the generation it holds, so a
    # worker that lost its lease (paused, cut off) changes nothing when it wakes.
    lease_generation = models.PositiveBigIntegerField(default=0)
    # the series description as researchers get it (scrubbed: sendit.deid.metadata), for the dashboard
    description = models.CharField(max_length=200, blank=True)
    # the status an alert was last sent for (sendit.relay.alerts): one alert per change, whichever worker
    alerted_status = models.CharField(max_length=16, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "series"

    def __str__(self) -> str:
        return f"series #{self.pk}"


class Image(models.Model):
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="images")
    sop_instance_uid = models.CharField(max_length=64, unique=True)
    deid_sop_instance_uid = models.CharField(max_length=64, blank=True)
    path = models.CharField(max_length=1024, db_index=True, help_text="Relative to the input folder.")
    size = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    set_aside_at = models.CharField(max_length=1024, blank=True, help_text="Where a quarantined original was moved.")
    # With STORAGE_URL set: the original's key in the store ("originals/<sha256>"); empty when it is
    # read in the input folder.
    stored_key = models.CharField(max_length=255, blank=True, help_text="The original's key in the storage bucket.")
    cleaned_at = models.DateTimeField(null=True, blank=True, help_text="When the original and copy were removed.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.NEW, db_index=True)
    reason = models.CharField(max_length=500, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["series", "status"])]
        # the roles (sendit.web.roles) are groups of these permissions
        permissions = [
            ("review_image", "Can see the original data of quarantined images and rejected files"),
            ("discard_image", "Can discard images and rejected files"),
        ]

    def __str__(self) -> str:
        return f"image #{self.pk}"


class SeriesPart(models.Model):
    """A contiguous range of one split series' image ids, de-identified and delivered up to SENT by
    whichever worker holds its own lease (pipeline.run_part); the series' run joins the parts
    (verification, series destinations, clean-up) once every part is finished."""

    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="parts")
    first_image_id = models.BigIntegerField()
    last_image_id = models.BigIntegerField()
    lease_owner = models.CharField(max_length=255, blank=True)
    lease_expires = models.DateTimeField(null=True, blank=True)
    # the part's fencing token, as Series.lease_generation: +1 at every acquisition
    lease_generation = models.PositiveBigIntegerField(default=0)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"part #{self.pk} of series #{self.series_id}"


class SeriesIdentifiers(models.Model):
    """The identifier provider's answer for one series, stored before de-identification starts."""

    series = models.OneToOneField(Series, on_delete=models.CASCADE, related_name="identifiers")
    provider = models.CharField(max_length=200)
    response = models.JSONField()
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "series identifiers"
        permissions = [("view_identifier_response", "Can see identifier responses (maps people to pseudonyms)")]


class Delivery(models.Model):
    """One image confirmed by one destination; a re-send after a crash skips what is recorded here."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="deliveries")
    destination = models.CharField(max_length=64)
    status_code = models.IntegerField(null=True, blank=True)
    note = models.CharField(max_length=300, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["image", "destination"], name="one_delivery_per_destination")]
        # the dashboard's last success and throughput per destination
        indexes = [models.Index(fields=["destination", "created"], name="delivery_destination_created")]
        verbose_name_plural = "deliveries"


class ReceivedFile(models.Model):
    """A file that did not become an Image: not DICOM, truncated, a duplicate or a conflict."""

    path = models.CharField(max_length=1024, db_index=True, help_text="Relative to the input folder.")
    status = models.CharField(max_length=16, choices=Status.choices, db_index=True)
    reason = models.CharField(max_length=500)
    stored_at = models.CharField(max_length=1024, blank=True, help_text="Where the file was moved.")
    image = models.ForeignKey(Image, null=True, blank=True, on_delete=models.SET_NULL)
    created = models.DateTimeField(auto_now_add=True, db_index=True)
    # what a person did about it (sendit.web.rejected): "retried by …", "discarded by …"; empty = open
    resolved = models.CharField(max_length=200, blank=True, db_index=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"received file #{self.pk}"  # not the path: folder names may be patient names


class Event(models.Model):
    """A status change: when, what, from, to and why; no patient values."""

    created = models.DateTimeField(auto_now_add=True, db_index=True)
    series = models.ForeignKey(Series, null=True, blank=True, on_delete=models.CASCADE, related_name="events")
    image = models.ForeignKey(Image, null=True, blank=True, on_delete=models.CASCADE, related_name="events")
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16)
    reason = models.CharField(max_length=500, blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        ordering = ["-created", "-id"]
        # the dashboard's throughput chart and /metrics count recent events by target status
        indexes = [models.Index(fields=["to_status", "created"], name="event_to_status_created")]


class Summary(models.Model):
    """What remains of a pruned series: counts and times, no identifiers of any kind."""

    series_id_was = models.BigIntegerField()
    modality = models.CharField(max_length=16, blank=True)
    images = models.PositiveIntegerField()
    counts = models.JSONField(default=dict)
    first_seen = models.DateTimeField()
    finished = models.DateTimeField()
    pruned = models.DateTimeField(auto_now_add=True)


class ApiToken(models.Model):
    """A script's bearer token for the API and /metrics; only its SHA-256 is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    key_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12, help_text="The first characters, to tell tokens apart.")
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"token {self.prefix}… of user #{self.user_id}"


class WorkerHeartbeat(models.Model):
    """Each queue worker process, and each process while it holds a lease, writes here every
    HEARTBEAT_SECONDS (in database time). The dashboard counts the recent worker rows; any host
    judges a lease holder whose row is missing or silent for 3 periods dead (relay.liveness)."""

    name = models.CharField(
        max_length=255, unique=True, help_text="host:pid:namespace — how this process's lease owner names begin"
    )
    host = models.CharField(max_length=255, blank=True)
    boot_id = models.CharField(max_length=64, blank=True, help_text="the kernel's boot id")
    pid_namespace = models.CharField(max_length=16, blank=True, help_text="digest of boot id and PID namespace")
    pid = models.IntegerField(null=True, blank=True)
    worker = models.BooleanField(default=True, help_text="a queue worker (else a process holding a lease)")
    started = models.DateTimeField()
    seen = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.name


class ScanState(models.Model):
    """The last scan of the input folder by each watcher: the dashboard, /health and /metrics show it.

    A scan that fails as a whole (folder gone, database down) must be visible, not only logged.
    """

    name = models.CharField(max_length=255, unique=True, help_text="host of the watcher")
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    ok = models.BooleanField(default=True)
    error = models.CharField(max_length=500, blank=True)
    failures = models.PositiveIntegerField(default=0, help_text="consecutive failed scans")
    # entries left alone on purpose, by rule (hidden, in progress, too long): {"hidden": 3, ...}
    ignored = models.JSONField(default=dict)

    def __str__(self) -> str:
        return f"scan by {self.name}"


class Installation(models.Model):
    """Facts every process of one installation must agree on (one row per name).

    ``secret_key_fingerprint``: a keyed digest of SECRET_KEY. A process started with another key
    would de-identify the same images under other UIDs; it refuses to start instead.
    """

    name = models.CharField(max_length=64, unique=True)
    value = models.CharField(max_length=255)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class PeriodicRun(models.Model):
    """When a periodic job last ran anywhere: of many consumers on many hosts, one runs it per period."""

    name = models.CharField(max_length=64, unique=True)
    last_run = models.DateTimeField()
    host = models.CharField(max_length=255, blank=True)

    def __str__(self) -> str:
        return self.name


class BlankingRule(models.Model):
    """A site rule a reviewer drew on a quarantined image: blank this region of every image that
    matches the criteria (a ``%filter graylist`` label, applied with the DEID_FILTER rules).

    The criteria are layout facts (modality, maker, model, size), never patient values.
    """

    modality = models.CharField(max_length=16)
    manufacturer = models.CharField(max_length=64, blank=True)
    model_name = models.CharField(max_length=64, blank=True)
    rows = models.PositiveIntegerField()
    columns = models.PositiveIntegerField()
    x0 = models.PositiveIntegerField()
    y0 = models.PositiveIntegerField()
    x1 = models.PositiveIntegerField()
    y1 = models.PositiveIntegerField()
    active = models.BooleanField(default=True)
    image_id_was = models.BigIntegerField(null=True, blank=True, help_text="The image it was drawn on.")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"blanking rule #{self.pk}"


class AlertState(models.Model):
    """A condition that lasts (a destination silent, a file system low on space): since when, and
    whether its alert went out, so each episode alerts once whichever process looks."""

    name = models.CharField(max_length=100, unique=True)
    since = models.DateTimeField()
    sent = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name


class CommitmentReport(models.Model):
    """A storage commitment report (N-EVENT-REPORT) the listener received, until the worker that
    asked reads it. The worker waiting for it may be in another process or on another host."""

    transaction_uid = models.CharField(max_length=64, unique=True)
    committed = models.JSONField(default=list, help_text="de-identified SOPInstanceUIDs the peer holds")
    failed = models.JSONField(default=dict, help_text="de-identified SOPInstanceUID → Failure Reason")
    received = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return f"commitment report #{self.pk}"
