"""Per-app state: what ``init_app`` keeps in ``app.extensions["koala"]``, and finding it.

Every Flask-side module reaches an app's settings, counters and pipeline through the two
functions here, so the extension key and the helpful errors live in one place.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

from flask import Flask, current_app

from ._config import KoalaConfig
from ._ledger import Ledger
from ._pipeline import Pipeline
from ._transport import TransportFactory

__all__ = ["EXTENSION_KEY", "AppState", "current_state", "state_of"]

#: The key of :class:`AppState` in ``app.extensions``.
EXTENSION_KEY = "koala"


class AppState:
    """One app's settings, ledger and request-side pipeline.

    ``owner`` is the :class:`~flask_koala.Koala` instance that initialised the app; it is
    only compared, so that an app cannot be driven through a second instance by mistake.
    ``transport_factory`` makes what ``flask koala identify`` posts through.
    """

    __slots__ = (
        "__weakref__",
        "app_ref",
        "config",
        "ledger",
        "owner",
        "pipeline",
        "transport_factory",
    )

    def __init__(
        self,
        owner: object,
        app: Flask,
        config: KoalaConfig,
        ledger: Ledger,
        pipeline: Pipeline,
        transport_factory: TransportFactory,
    ) -> None:
        self.owner = owner
        self.transport_factory = transport_factory
        self.app_ref = weakref.ref(app)
        self.config = config
        self.ledger = ledger
        self.pipeline = pipeline

    def shutdown(self, timeout: Optional[float]) -> bool:
        """Stop this app's sending for good (``koala.shutdown``); ``True`` when all was sent.

        Then the drops and failures the once-a-minute WARNINGs held back are logged.
        """
        pipeline = self.pipeline
        if pipeline.suppressed is not None:
            pipeline.suppressed.shutdown(timeout)
        flushed = True if pipeline.dispatcher is None else pipeline.dispatcher.shutdown(timeout)
        self.ledger.report_held()
        return flushed


def state_of(app: Any) -> Optional[AppState]:
    """The state of ``app``, or ``None`` when flask-koala was never initialised on it."""
    extensions = getattr(app, "extensions", None)
    return None if extensions is None else extensions.get(EXTENSION_KEY)


def current_state(owner: Optional[object] = None) -> AppState:
    """The state of the current app.

    Raises:
        RuntimeError: no app context; the app was never initialised; or ``owner`` is given
            and another :class:`~flask_koala.Koala` instance initialised it.
    """
    try:
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    except RuntimeError:
        raise RuntimeError(
            "flask-koala needs an application context: call it inside a request, a CLI "
            "command, or `with app.app_context():`."
        ) from None
    state = state_of(app)
    if state is None:
        raise RuntimeError(
            f"flask-koala is not initialised on app {app.name!r}: call "
            "koala.init_app(app) (or Koala(app)) in your app factory."
        )
    if owner is not None and state.owner is not owner:
        raise RuntimeError(
            f"app {app.name!r} was initialised by another Koala instance; use that one."
        )
    return state
