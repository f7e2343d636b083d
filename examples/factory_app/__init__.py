"""An app-factory package using flask-koala, with its own tests in ``tests/``.

Run it against the loopback receiver (two terminals, from the repository root)::

    python -m flask_koala.testing          # prints each call as it arrives
    flask --app examples.factory_app run
    curl -b ko_id=3f2504e0-4f89-41d3-9a0c-0305e82c3301 \
        -d email=jane@example.com -d password=secret http://127.0.0.1:5000/login

Its tests use the ``flask_koala.testing`` plugin; from a clone, after ``make test``:
``.venv/bin/python -m pytest examples/factory_app``.

Settings: the defaults below, then ``FLASK_*`` environment variables
(``FLASK_KOALA_PUBLIC_KEY=pk_...``), then ``create_app(config)``, so the same factory
serves deployments and tests.
"""

from __future__ import annotations

from typing import Any, Optional

from flask import Flask

from .auth import auth, login_manager
from .extensions import koala


def create_app(config: Optional[dict[str, Any]] = None) -> Flask:
    """Build the app; ``config`` overrides everything, as tests want."""
    app = Flask(__name__)
    app.config.from_mapping(
        SECRET_KEY="change-me",
        KOALA_PUBLIC_KEY="pk_example",
        # The loopback receiver: nothing leaves the machine until you point this at
        # your own Koala-compatible collector.
        KOALA_API_URL="http://127.0.0.1:8787",
    )
    app.config.from_prefixed_env()
    app.config.update(config or {})
    login_manager.init_app(app)
    koala.init_app(app)
    app.register_blueprint(auth)
    return app
