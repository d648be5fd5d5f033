"""The WSGI application, metered."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_site.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402

from meterage.wsgi import MeterageMiddleware  # noqa: E402

application = MeterageMiddleware(get_wsgi_application())
