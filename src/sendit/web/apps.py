"""The operator's app: pages, templates, static files, the API and /metrics.

It owns no models (they live in sendit.relay, which never imports this package), so it has no
migrations; it is an app so that Django finds its templates and static files.
"""

from django.apps import AppConfig


class WebConfig(AppConfig):
    name = "sendit.web"
    label = "web"
    verbose_name = "Sendit web"
