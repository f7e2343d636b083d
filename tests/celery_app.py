"""The Celery app a test worker runs: ``celery -A tests.celery_app worker``.

Built from the environment alone, with no Flask app, as a worker fleet may be: the task
gets everything it needs from its arguments.
"""

from __future__ import annotations

import os

from celery import Celery

from flask_koala.celery import register_task

app = Celery("flask_koala_tests", broker=os.environ["KOALA_TEST_BROKER_URL"])
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_default_queue="never-consumed",  # every flask-koala task must name its own queue
    worker_hijack_root_logger=True,
)
register_task(app)
