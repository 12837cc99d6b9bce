"""WSGI entry point for `sendit run` and any WSGI server."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sendit.server.settings")
application = get_wsgi_application()
