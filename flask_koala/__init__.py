"""Identify every Flask-Login login to Koala, off the request thread.

The public surface is what this module exports; everything else is an implementation
detail. ``flask_koala.signals`` and ``flask_koala.testing`` are public modules too.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import signals
from .config import KoalaConfig
from .exceptions import ConfigError, KoalaError
from .extension import Koala

__all__ = ["ConfigError", "Koala", "KoalaConfig", "KoalaError", "__version__", "signals"]
