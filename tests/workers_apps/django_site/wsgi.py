"""The WSGI application, metered."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_site.settings")

from django.core.wsgi import get_wsgi_application

from meterage.wsgi import MeterageMiddleware

application = MeterageMiddleware(get_wsgi_application())
