"""Identify every Flask-Login login to Koala, off the request thread.

The public surface is what this module exports (:data:`__all__`) and three modules:
``flask_koala.signals`` (blinker signals for every outcome), ``flask_koala.testing`` (the
pytest plugin and the loopback receiver, loaded only when imported) and
``flask_koala.celery`` (what a Celery worker module needs). Every other module is private.

How a login travels, module by module: ``_hooks`` (Flask-Login's signals) -> ``_state``
(the app's state) -> ``_pipeline`` (validate, copy plain values, submit) -> the dispatcher
-> the engine and its handler (HTTP or Celery) -> ``_transport``.
"""

from __future__ import annotations

from . import signals
from ._config import KoalaConfig
from ._exceptions import ConfigError, KoalaError
from ._extension import Koala
from ._version import __version__

__all__ = ["ConfigError", "Koala", "KoalaConfig", "KoalaError", "__version__", "signals"]
