"""Admin views; identifier responses are visible only with their own permission."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from sendit.relay.files import masked
from sendit.relay.models import (
    AlertState,
    ApiToken,
    BlankingRule,
    Delivery,
    Event,
    Image,
    ReceivedFile,
    ScanState,
    Series,
    SeriesIdentifiers,
    Study,
    Summary,
    WorkerHeartbeat,
)


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "created")


@admin.register(Series)
class SeriesAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "modality", "status", "stage", "attempts", "last_error", "updated")
    list_filter = ("status", "stage")
    exclude = ("header",)


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Paths are shown masked (folders are often named after the patient), as in the logs."""

    list_display = ("id", "series_id", "status", "reason", "masked_path", "updated")
    list_filter = ("status",)
    raw_id_fields = ("series",)
    exclude = ("path", "set_aside_at")
    readonly_fields = ("masked_path",)

    @admin.display(description="path (masked)")
    def masked_path(self, obj: Image) -> str:
        return masked(obj.path)


@admin.register(ReceivedFile)
class ReceivedFileAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "status", "reason", "masked_path", "created")
    list_filter = ("status",)
    exclude = ("path", "stored_at")
    readonly_fields = ("masked_path",)
    raw_id_fields = ("image",)

    @admin.display(description="path (masked)")
    def masked_path(self, obj: ReceivedFile) -> str:
        return masked(obj.path)


@admin.register(SeriesIdentifiers)
class SeriesIdentifiersAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "series_id", "provider", "created")

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.has_perm("relay.view_identifier_response"))


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("created", "series_id", "image_id", "from_status", "to_status", "reason", "user")
    list_filter = ("to_status",)


admin.site.register(Delivery)
admin.site.register(Summary)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Tokens can be revoked (deleted) here; the secret itself was shown once and is not stored."""

    list_display = ("prefix", "user", "name", "created", "last_used")
    readonly_fields = ("key_hash", "prefix", "created", "last_used")


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "started", "seen")


@admin.register(BlankingRule)
class BlankingRuleAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Site blanking rules drawn on the review page: untick "active" to stop applying one (layout facts
    only, no patient values)."""

    list_display = ("id", "modality", "manufacturer", "model_name", "rows", "columns", "region", "active", "user")
    list_filter = ("active", "modality")
    readonly_fields = ("image_id_was", "user", "created")

    @admin.display(description="region x0,y0,x1,y1")
    def region(self, obj: BlankingRule) -> str:
        return f"{obj.x0},{obj.y0},{obj.x1},{obj.y1}"


@admin.register(AlertState)
class AlertStateAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "since", "sent")


@admin.register(ScanState)
class ScanStateAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Delete the row of a watcher host that was retired, or /health keeps saying its scans are stale."""

    list_display = ("name", "finished", "ok", "failures", "error")
    readonly_fields = ("name", "started", "finished", "ok", "error", "failures", "ignored")
