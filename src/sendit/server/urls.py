"""URL map: the admin and the status page; no patient value ever appears in a URL."""

from django.contrib import admin
from django.urls import path

from sendit.relay import views

urlpatterns = [
    path("", views.status_page, name="status"),
    path("health", views.health, name="health"),
    path("admin/", admin.site.urls),
]
