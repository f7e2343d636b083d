"""Testing an app that uses flask-koala: a pytest plugin, and a loopback Koala.

Opt in from your ``conftest.py``; the fixtures build on your own ``app`` fixture::

    pytest_plugins = ["flask_koala.testing"]

    def test_login_identifies_jane(app, koala_calls):
        client = app.test_client()
        client.set_cookie("ko_id", "3f2504e0-4f89-41d3-9a0c-0305e82c3301")
        client.post("/login", data={"email": "jane@example.com"})
        assert koala_calls[0]["email"] == "jane@example.com"

Fixtures:

``koala_calls``
    The list of call bodies (dicts, exactly as they would be sent) that your ``app``
    fixture's Koala accepts during the test: ``koala.record_calls()`` held open for the
    whole test. Works with sending suppressed (the default under ``app.testing``) and
    with sending on alike.
``koala_receiver``
    A started :class:`KoalaReceiver`, stopped after the test: a real HTTP server speaking
    Koala's contract, for tests that let calls go out. Point ``KOALA_API_URL`` at its
    ``url``; read ``bodies`` and ``violations``; inject faults with ``respond_with``,
    ``outage``, ``suspend``, ``delay`` and ``drop_connections``.

``record_calls(app)`` is ``koala.record_calls()`` for a given app, without an app context:
a context manager holding the list of call bodies the app accepts inside the block.

Without pytest, use the receiver directly (``with KoalaReceiver() as koala: ...``), or
run it in a terminal with ``python -m flask_koala.testing [--host H] [--port 8787]``, which
prints each call as it arrives (the same as ``flask koala receiver``).

The plugin is not registered automatically: a test suite that never asks for it is not
touched. pytest itself is only needed for the fixtures; the rest imports without it.

PYTEST_DONT_REWRITE: there are no asserts here to rewrite, and this marker lets a
``conftest.py`` import from this module before naming it in ``pytest_plugins`` without
pytest warning that it was imported too early.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import Any, Optional

from ._hooks import record_calls
from ._receiver import KoalaReceiver, ReceivedCall, check_body
from ._state import state_of

__all__ = ["KoalaReceiver", "ReceivedCall", "check_body", "main", "record_calls"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the loopback receiver until Ctrl-C: ``python -m flask_koala.testing``."""
    from ._cli_receiver import receiver_command

    receiver_command.main(args=argv, prog_name="python -m flask_koala.testing")


def _recorded_calls(app: Any) -> Generator[list[dict[str, Any]], None, None]:
    """Hold ``record_calls()`` of the app's Koala open while the caller yields."""
    if state_of(app) is None:
        raise RuntimeError(
            "koala_calls needs an `app` fixture returning a Flask app on which "
            "koala.init_app(app) was called"
        )
    with record_calls(app) as calls:
        yield calls


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pass
else:

    @pytest.fixture
    def koala_calls(app: Any) -> Iterator[list[dict[str, Any]]]:
        """Call bodies the ``app`` fixture's Koala accepted during the test, in order."""
        yield from _recorded_calls(app)

    @pytest.fixture
    def koala_receiver() -> Iterator[KoalaReceiver]:
        """A running loopback Koala on 127.0.0.1, stopped after the test."""
        with KoalaReceiver() as receiver:
            yield receiver


if __name__ == "__main__":
    main()
