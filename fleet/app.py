"""`celery -A fleet.app ...`: fleet's Celery app, made from the settings
(FLEET_CONFIG, FLEET_* variables), so that Celery's own tools — `celery
inspect`, `status`, `events`, `purge`, `revoke` and Flower — talk to a
running fleet: its broker, key prefix, transport options, result backend and
agents' queues. Importing it loads the settings and imports Celery."""

from __future__ import annotations

from fleet.broker.celery_app import make_celery
from fleet.settings import load_settings

app = make_celery(load_settings())
