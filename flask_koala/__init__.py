"""Identify every Flask-Login login to Koala, off the request thread.

The public surface is what this module exports; everything else is an implementation
detail. ``flask_koala.signals`` and ``flask_koala.testing`` are public modules too.
"""

from __future__ import annotations

from . import signals
from ._config import KoalaConfig
from ._exceptions import ConfigError, KoalaError
from ._extension import Koala
from ._version import __version__

__all__ = ["ConfigError", "Koala", "KoalaConfig", "KoalaError", "__version__", "signals"]
