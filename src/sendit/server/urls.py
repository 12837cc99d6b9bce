"""URL map: pages, the API, /metrics and /health; no patient value ever appears in a URL (database ids only)."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.staticfiles.views import serve
from django.urls import path, re_path

from sendit.web import review, views
from sendit.web.api import api


def _static(request, path):  # type: ignore[no-untyped-def]
    """The dashboard's script and the API docs' assets, straight from the packages (no collectstatic)."""
    return serve(request, path, insecure=True)


urlpatterns = [
    path("", views.status_page, name="status"),
    path("series/", views.series_list, name="series-list"),
    path("series/bulk/<str:action>", views.series_bulk, name="series-bulk"),
    path("series/<int:series_id>/", views.series_page, name="series"),
    path("series/<int:series_id>/<str:action>", views.series_action, name="series-action"),
    path("images/<int:image_id>/review", review.review_page, name="review"),
    path("images/<int:image_id>/preview.png", review.preview_png, name="preview"),
    path("images/<int:image_id>/<str:action>", review.review_action, name="review-action"),
    path("files/", views.file_list, name="files"),
    path("files/<int:file_id>/download", views.file_download, name="file-download"),
    path("files/<int:file_id>/<str:action>", views.file_action, name="file-action"),
    path("login/", views.ThrottledLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("api/", api.urls),
    path("metrics", views.metrics_view, name="metrics"),
    path("health", views.health, name="health"),
    path("admin/", admin.site.urls),
    re_path(r"^static/(?P<path>.*)$", login_required(_static), name="static"),
]
