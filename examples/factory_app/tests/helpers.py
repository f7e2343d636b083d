"""What the tests share besides fixtures."""

from __future__ import annotations

from typing import Any

#: A visitor id as Koala's browser pixel sets it in the ``ko_id`` cookie.
VISITOR = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def log_in(client: Any, email: str = "jane@example.com", password: str = "secret") -> Any:
    """Log in through the real view, which calls ``login_user``.

    Flask-Login's own test helpers write the session directly and never fire the login
    signal, so they would not identify anybody.
    """
    return client.post("/login", data={"email": email, "password": password})
