"""Extension objects, created once and bound to each app in ``create_app``."""

from __future__ import annotations

from typing import Any

from flask_koala import Koala

koala = Koala()


@koala.identity_loader
def koala_traits(user: Any) -> dict[str, Any]:
    """What Koala learns about a user at login: the email, and the plan as a trait."""
    return {"email": user.email, "plan": user.plan}
