"""RQ settings, ``rq worker --config rq_settings``: how the RQ worker joins the group.

``rq worker`` imports its settings module in the worker process itself, before it forks any
work horse: so this is where the long-lived worker sets up the export
(``meterage.otel.configure()`` from the OTEL_* variables: a Prometheus scrape endpoint or
OTLP pushes). Each job runs in a work horse forked from this process, which exits with
``os._exit`` without exporting anything; with ``METERAGE_MULTIPROCESS=1`` in the worker's
environment the worker and its horses are one group, and what the horses metered is
exported by the worker.
"""

from __future__ import annotations

import meterage.otel

meterage.otel.configure()
