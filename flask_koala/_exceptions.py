"""Exceptions raised by flask-koala.

The tree is small on purpose: flask-koala never raises into a request, so the only
exceptions a user meets are about setting it up.

    KoalaError
    └── ConfigError      a KOALA_* setting is missing or wrong (raised by ``init_app``)
"""

from __future__ import annotations

__all__ = ["ConfigError", "KoalaError"]


class KoalaError(Exception):
    """Base class of every exception flask-koala raises."""


class ConfigError(KoalaError, ValueError, RuntimeError):
    """A ``KOALA_*`` setting is missing or invalid.

    The message always names the key to fix. It is a ``ValueError`` (a bad value) and a
    ``RuntimeError`` (what Flask-SQLAlchemy raises for bad configuration), so code written
    against either convention catches it.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"{key}: {problem}")
