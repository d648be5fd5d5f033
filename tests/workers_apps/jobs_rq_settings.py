"""RQ settings for the meterage.integrations.rq tests (``rq worker -c jobs_rq_settings``),
imported by the worker process before it forks any work horse: it exports its group's
numbers (``meterage.otel.configure()`` from the OTEL_* variables) and the depth of queue
``held``, which the worker does not listen on (``REDIS_URL`` is the worker's redis). With
``JOBS_RQ_SAMPLE`` set it also calls ``meterage.integrations.rq.instrument(sample=...)``
(for a worker class of RQ's own)."""

from __future__ import annotations

import os

import redis
import rq

import meterage.integrations.rq
import meterage.otel

meterage.otel.configure()
if os.environ.get("JOBS_RQ_SAMPLE"):
    meterage.integrations.rq.instrument(sample=float(os.environ["JOBS_RQ_SAMPLE"]))
HELD = rq.Queue("held", connection=redis.Redis.from_url(os.environ["REDIS_URL"]))
meterage.integrations.rq.queue_depth(HELD)
