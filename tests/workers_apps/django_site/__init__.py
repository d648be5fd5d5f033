"""A minimal Django project metered by meterage (WSGI middleware + RouteMiddleware)."""
