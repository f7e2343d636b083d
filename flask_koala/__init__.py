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

from typing import TYPE_CHECKING, Any

from . import signals
from ._config import KoalaConfig
from ._exceptions import ConfigError, KoalaError, TransportError
from ._version import __version__

if TYPE_CHECKING:
    from ._extension import Koala

__all__ = [
    "ConfigError",
    "Koala",
    "KoalaConfig",
    "KoalaError",
    "TransportError",
    "__version__",
    "signals",
]


def __getattr__(name: str) -> Any:
    # Koala brings Flask, Flask-Login and click: loaded when first asked for, so that a
    # Celery worker importing flask_koala.celery loads none of them.
    if name == "Koala":
        from ._extension import Koala

        return Koala
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
