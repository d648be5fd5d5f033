"""Framework and job-queue integrations: each module names what its framework knows
(routes, queues) on the call that ``meterage.asgi``, ``meterage.wsgi`` or ``meterage.jobs``
opened."""
