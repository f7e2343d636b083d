"""``koala_script()`` told who the visitor is: explicit values, or the ``get_user`` getter.

For apps whose users are not Flask-Login's ``current_user`` (a session-only OAuth app), as
docs/browser.md shows. The templates below are the ones the page shows.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask, render_template_string
from flask_login import LoginManager, login_user

from flask_koala import Koala

from .support import USERS, User

GETTER_PAGE = "{{ koala_script(get_user=oauth_user) }}"
EXPLICIT_PAGE = '{{ koala_script(email=account.email, traits={"plan": account.plan}) }}'


class Account:
    def __init__(self, email: Any, plan: Any = "pro") -> None:
        self.email = email
        self.plan = plan


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s", TESTING=True, KOALA_PUBLIC_KEY="pk_test")
    login_manager = LoginManager(app)
    login_manager.user_loader(USERS.get)
    app.extensions["test_koala"] = Koala(app)

    # The docs' getter, as the page shows it.
    from flask import session

    def oauth_user():  # type: ignore[no-untyped-def]
        return session.get("user")  # {"email": ..., "name": ...} after the callback, or None

    app.add_template_global(oauth_user)
    return app


def render(app: Flask, template: str, session_user: Any = None, **context: Any) -> str:
    with app.test_request_context("/"):
        from flask import session

        if session_user is not None:
            session["user"] = session_user
        return render_template_string(template, **context)


def identify_args(page: str) -> Any:
    """The arguments of the ``ko.identify(...)`` the page queues, or ``None``."""
    start = page.find("ko.identify(")
    if start < 0:
        return None
    decoder = json.JSONDecoder()
    email, end = decoder.raw_decode(page, start + len("ko.identify("))
    traits, _ = decoder.raw_decode(page, page.index(",", end) + 1)
    return email, traits


def test_getter_mapping_is_identified(app: Flask) -> None:
    page = render(app, GETTER_PAGE, {"email": "sam@example.com", "name": "Sam"})

    assert identify_args(page) == ("sam@example.com", {"name": "Sam"})


def test_getter_returning_none_identifies_nobody(app: Flask) -> None:
    page = render(app, GETTER_PAGE)

    assert identify_args(page) is None
    assert "sdk.js" in page


def test_getter_returning_an_email(app: Flask) -> None:
    page = render(app, "{{ koala_script(get_user=lambda_email) }}", lambda_email=lambda: "a@b.co")

    assert identify_args(page) == ("a@b.co", {})


def test_getter_returning_a_user_goes_through_the_identity_loader(app: Flask) -> None:
    koala: Koala = app.extensions["test_koala"]

    @koala.identity_loader
    def loader(user: User) -> dict[str, Any]:
        return {"email": user.email, "tier": "gold"}

    page = render(app, "{{ koala_script(get_user=get) }}", get=lambda: USERS["jane"])

    assert identify_args(page) == ("jane@example.com", {"tier": "gold"})


def test_getter_with_a_bad_email_identifies_nobody(app: Flask) -> None:
    page = render(app, GETTER_PAGE, {"email": "not an email"})

    assert identify_args(page) is None


@pytest.mark.allow_errors
def test_getter_that_raises_still_renders_the_pixel(app: Flask) -> None:
    def broken() -> None:
        raise RuntimeError("boom")

    page = render(app, "{{ koala_script(get_user=broken) }}", broken=broken)

    assert "sdk.js" in page
    assert identify_args(page) is None


def test_explicit_values_are_identified(app: Flask) -> None:
    page = render(app, EXPLICIT_PAGE, account=Account("pat@example.com"))

    assert identify_args(page) == ("pat@example.com", {"plan": "pro"})


def test_explicit_values_win_over_the_getter_and_current_user(app: Flask) -> None:
    template = "{{ koala_script(email='pat@example.com', get_user=oauth_user) }}"
    with app.test_request_context("/"):
        from flask import session

        session["user"] = {"email": "sam@example.com"}
        login_user(USERS["jane"])
        page = render_template_string(template)

    assert identify_args(page) == ("pat@example.com", {})


def test_explicit_traits_that_are_not_a_mapping_identify_nobody(app: Flask) -> None:
    page = render(app, "{{ koala_script(email='pat@example.com', traits='x') }}")

    assert identify_args(page) is None


def test_explicit_bad_email_identifies_nobody(app: Flask) -> None:
    page = render(app, EXPLICIT_PAGE, account=Account("pat at example"))

    assert identify_args(page) is None


def test_explicit_values_are_escaped(app: Flask) -> None:
    account = Account("x@example.com", plan="</script><script>alert(1)</script>\u2028<!--")

    page = render(app, EXPLICIT_PAGE, account=account)

    body = page.split(">", 1)[1].rsplit("</script>", 1)[0]
    assert "</script" not in body.lower()
    assert "<!--" not in body
    assert "\u2028" not in body
    assert identify_args(page) == ("x@example.com", {"plan": account.plan})


def test_getter_values_are_escaped(app: Flask) -> None:
    hostile = {"email": "e@example.com", "name": "</SCRIPT><img src=x onerror=alert(1)>&'"}

    page = render(app, GETTER_PAGE, hostile)

    body = page.split(">", 1)[1].rsplit("</script>", 1)[0]
    assert "</script" not in body.lower()
    assert "<img" not in body
    assert identify_args(page) == ("e@example.com", {"name": hostile["name"]})


def test_identify_off_ignores_what_it_was_told(app: Flask) -> None:
    app.config["KOALA_SNIPPET_IDENTIFY"] = False
    app.extensions.pop("koala")
    Koala(app)

    page = render(app, EXPLICIT_PAGE, account=Account("pat@example.com"))

    assert "sdk.js" in page
    assert identify_args(page) is None


def test_without_arguments_current_user_is_still_identified(app: Flask) -> None:
    with app.test_request_context("/"):
        login_user(User("u1", "u1@example.com"))
        page = render_template_string("{{ koala_script() }}")

    assert identify_args(page) == ("u1@example.com", {})
