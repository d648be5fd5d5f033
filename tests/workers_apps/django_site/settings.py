"""Settings of the test Django project: no database, no apps beyond what routing needs."""

SECRET_KEY = "meterage-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_site.urls"
MIDDLEWARE = ["meterage.integrations.django.RouteMiddleware"]
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
