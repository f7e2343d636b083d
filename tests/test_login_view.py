"""``@koala.identify_login``: both forms, every kind of ``get_user`` result, and the limits."""

from __future__ import annotations

import inspect
import secrets
from typing import Any, Callable

import pytest
from flask import Flask, abort, g, jsonify, redirect, request, url_for
from flask_login import login_user

from flask_koala import Koala
from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID, USERS, User, delivered, flushed_stats, visitor


def add_fake_identity_provider(app: Flask) -> Callable[[str], User | None]:
    """``/oauth/authorize`` approves at once and redirects back with a one-time code.

    Returns the code exchange, a local function standing in for the provider's token
    endpoint: no network.
    """
    codes: dict[str, str] = {}

    @app.get("/oauth/authorize")
    def authorize() -> Any:
        code = secrets.token_urlsafe(8)
        codes[code] = request.args["login_hint"]
        return redirect(
            url_for(request.args["redirect_to"], code=code, state=request.args["state"])
        )

    def exchange(code: str) -> User | None:
        user_id = codes.pop(code, None)
        return None if user_id is None else USERS.get(user_id)

    return exchange


def sign_in_with_provider(client: Any, user_id: str, callback: str = "oauth_callback") -> Any:
    return client.get(
        f"/oauth/authorize?login_hint={user_id}&state=xyz&redirect_to={callback}",
        follow_redirects=True,
    )


# -- the OAuth-style callback ------------------------------------------------------------


def test_oauth_callback_with_get_user_identifies_the_provider_user(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)
    exchange = add_fake_identity_provider(app)

    @app.get("/oauth/callback")
    @koala.identify_login(get_user=lambda: g.get("sso_user"))
    def oauth_callback() -> Any:
        """Finish the sign-in without Flask-Login, as many SSO callbacks do."""
        if request.args.get("state") != "xyz":
            abort(400)
        g.sso_user = exchange(request.args["code"])
        if g.sso_user is None:
            abort(401)
        return redirect("/whoami")

    response = sign_in_with_provider(visitor(app), "jane")
    assert response.status_code == 200
    (body,) = delivered(app, receiver)
    assert body["profile_id"] == PROFILE_ID
    assert body["identifies"][0]["traits"] == {"email": "jane@example.com"}


def test_oauth_callback_with_a_spent_code_sends_nothing(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)
    exchange = add_fake_identity_provider(app)

    @app.get("/oauth/callback")
    @koala.identify_login(get_user=lambda: g.get("sso_user"))
    def oauth_callback() -> Any:
        g.sso_user = exchange(request.args["code"])
        if g.sso_user is None:
            abort(401)
        return redirect("/whoami")

    response = visitor(app).get("/oauth/callback?code=spent&state=xyz")
    assert response.status_code == 401
    assert delivered(app, receiver) == []


def test_oauth_callback_bare_form_identifies_current_user(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_IDENTIFY_ON_LOGIN": False}, koala=koala)
    exchange = add_fake_identity_provider(app)

    @app.get("/oauth/callback")
    @koala.identify_login
    def oauth_callback() -> Any:
        user = exchange(request.args["code"])
        assert user is not None
        login_user(user)
        return redirect("/whoami")

    assert sign_in_with_provider(visitor(app), "jane").get_json() == {"user": "jane"}
    (body,) = delivered(app, receiver)
    assert body["email"] == "jane@example.com"


# -- the bare form -----------------------------------------------------------------------


def test_bare_form_identifies_a_request_loader_login(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.login_manager.request_loader  # type: ignore[attr-defined]
    def from_token(req: Any) -> User | None:
        # Flask-Login sends no user_logged_in for this kind of login.
        return USERS.get(req.headers.get("X-Token", ""))

    @app.post("/sso")
    @koala.identify_login
    def sso() -> Any:
        return jsonify(ok=True)

    visitor(app).post("/sso", headers={"X-Token": "jane"})
    assert delivered(app, receiver)[0]["email"] == "jane@example.com"


def test_bare_form_with_nobody_logged_in_sends_nothing(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/sso")
    @koala.identify_login
    def sso() -> Any:
        return jsonify(ok=False)

    assert visitor(app).post("/sso").status_code == 200
    assert delivered(app, receiver) == []
    assert flushed_stats(app)["skipped"] == 0


def test_bare_form_uses_the_identity_loader(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    koala.identity_loader(lambda user: {"email": user.email, "name": user.name})
    app = make_app({"KOALA_IDENTIFY_ON_LOGIN": False}, koala=koala)

    @app.post("/sso")
    @koala.identify_login
    def sso() -> Any:
        login_user(USERS["jane"])
        return "", 204

    visitor(app).post("/sso")
    traits = delivered(app, receiver)[0]["identifies"][0]["traits"]
    assert traits == {"email": "jane@example.com", "name": "Jane Doe"}


# -- what get_user may return ------------------------------------------------------------


def sso_app(make_app: Callable[..., Flask], koala: Koala, get_user: Callable[[], Any]) -> Flask:
    app = make_app(koala=koala)

    @app.post("/sso")
    @koala.identify_login(get_user=get_user)
    def sso() -> Any:
        return jsonify(ok=True)

    return app


def test_get_user_returning_a_user_goes_through_the_identity_loader(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    koala.identity_loader(lambda user: {"email": user.email, "name": user.name})
    app = sso_app(make_app, koala, lambda: USERS["jane"])
    visitor(app).post("/sso")
    traits = delivered(app, receiver)[0]["identifies"][0]["traits"]
    assert traits == {"email": "jane@example.com", "name": "Jane Doe"}


def test_get_user_returning_an_email(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = sso_app(make_app, koala, lambda: "sam@example.com")
    visitor(app).post("/sso")
    (body,) = delivered(app, receiver)
    assert body["identifies"][0]["traits"] == {"email": "sam@example.com"}


def test_get_user_returning_traits(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = sso_app(make_app, koala, lambda: {"email": "sam@example.com", "plan": "pro"})
    visitor(app).post("/sso")
    traits = delivered(app, receiver)[0]["identifies"][0]["traits"]
    assert traits == {"email": "sam@example.com", "plan": "pro"}


def test_get_user_returning_traits_without_email_is_skipped(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = sso_app(make_app, koala, lambda: {"plan": "pro"})
    assert visitor(app).post("/sso").status_code == 200
    assert flushed_stats(app)["skipped.no_email"] == 1
    assert receiver.bodies == []


def test_get_user_returning_an_empty_email_is_skipped_as_no_email(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    app = sso_app(make_app, koala, lambda: "")
    visitor(app).post("/sso")
    assert flushed_stats(app)["skipped.no_email"] == 1


def test_get_user_returning_a_bad_email_is_skipped(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    app = sso_app(make_app, koala, lambda: "not an email")
    visitor(app).post("/sso")
    assert flushed_stats(app)["skipped.bad_email"] == 1


def test_get_user_returning_none_sends_nothing(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = sso_app(make_app, koala, lambda: None)
    assert visitor(app).post("/sso").get_json() == {"ok": True}
    assert delivered(app, receiver) == []
    assert flushed_stats(app)["skipped"] == 0


def test_get_user_runs_in_the_request_context(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = sso_app(make_app, koala, lambda: request.headers["X-Email"])
    visitor(app).post("/sso", headers={"X-Email": "sam@example.com"})
    assert delivered(app, receiver)[0]["email"] == "sam@example.com"


@pytest.mark.allow_errors
def test_get_user_that_raises_leaves_the_response_alone(
    make_app: Callable[..., Flask], koala: Koala, caplog: pytest.LogCaptureFixture
) -> None:
    def get_user() -> Any:
        raise LookupError("directory is down")

    app = sso_app(make_app, koala, get_user)
    response = visitor(app).post("/sso")
    assert response.get_json() == {"ok": True}
    assert flushed_stats(app)["skipped.loader_error"] == 1
    assert any("get_user raised" in r.getMessage() for r in caplog.records)


# -- when nothing is sent ----------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 500, 503])
def test_error_responses_send_nothing(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver, status: int
) -> None:
    app = make_app(koala=koala)
    calls: list[int] = []

    def get_user() -> str:
        calls.append(1)
        return "sam@example.com"

    @app.post("/sso")
    @koala.identify_login(get_user=get_user)
    def sso() -> Any:
        return jsonify(error="no"), status

    assert visitor(app).post("/sso").status_code == status
    assert delivered(app, receiver) == []
    assert calls == []


def test_aborted_view_sends_nothing(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/sso-abort")
    @koala.identify_login(get_user=lambda: "sam@example.com")
    def sso_abort() -> Any:
        abort(403)

    assert visitor(app).post("/sso-abort").status_code == 403
    assert delivered(app, receiver) == []


def test_redirect_and_created_responses_identify(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/a")
    @koala.identify_login(get_user=lambda: "a@example.com")
    def a() -> Any:
        return redirect("/whoami")

    @app.post("/b")
    @koala.identify_login(get_user=lambda: "b@example.com")
    def b() -> Any:
        return {"created": True}, 201, {"X-Extra": "1"}

    client = visitor(app)
    assert client.post("/a").status_code == 302
    created = client.post("/b")
    assert (created.status_code, created.headers["X-Extra"]) == (201, "1")
    emails = sorted(body["email"] for body in delivered(app, receiver))
    assert emails == ["a@example.com", "b@example.com"]


def test_an_exception_in_the_view_propagates_and_sends_nothing(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    class CallbackError(Exception):
        pass

    @app.post("/sso")
    @koala.identify_login(get_user=lambda: "sam@example.com")
    def sso() -> Any:
        raise CallbackError("provider said no")

    with pytest.raises(CallbackError, match="provider said no"):
        visitor(app).post("/sso")
    assert delivered(app, receiver) == []
    assert flushed_stats(app)["skipped"] == 0


@pytest.mark.allow_errors
def test_an_app_without_koala_still_gets_its_response(
    koala: Koala, caplog: pytest.LogCaptureFixture
) -> None:
    app = Flask(__name__)

    @app.post("/sso")
    @koala.identify_login(get_user=lambda: "sam@example.com")
    def sso() -> Any:
        return jsonify(ok=True)

    assert app.test_client().post("/sso").get_json() == {"ok": True}
    assert any("identifying after a login view failed" in r.getMessage() for r in caplog.records)


# -- async views -------------------------------------------------------------------------


def test_async_view_identifies(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/sso")
    @koala.identify_login(get_user=lambda: "sam@example.com")
    async def sso() -> Any:
        return jsonify(ok=True)

    assert visitor(app).post("/sso").get_json() == {"ok": True}
    assert delivered(app, receiver)[0]["email"] == "sam@example.com"


def test_async_view_bare_form_identifies(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_IDENTIFY_ON_LOGIN": False}, koala=koala)

    @app.post("/sso")
    @koala.identify_login
    async def sso() -> Any:
        login_user(USERS["jane"])
        return jsonify(ok=True)

    visitor(app).post("/sso")
    assert delivered(app, receiver)[0]["email"] == "jane@example.com"


def test_async_view_error_response_sends_nothing(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/sso")
    @koala.identify_login(get_user=lambda: "sam@example.com")
    async def sso() -> Any:
        return "denied", 403

    assert visitor(app).post("/sso").status_code == 403
    assert delivered(app, receiver) == []


def test_async_view_exception_propagates(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/sso")
    @koala.identify_login
    async def sso() -> Any:
        raise KeyError("state")

    with pytest.raises(KeyError):
        visitor(app).post("/sso")
    assert delivered(app, receiver) == []


# -- the decorator itself ----------------------------------------------------------------


def plain_view(user_id: str) -> str:
    """Finish signing in."""
    return user_id


async def async_view(user_id: str) -> str:
    """Finish signing in, asynchronously."""
    return user_id


@pytest.mark.parametrize("view", [plain_view, async_view])
@pytest.mark.parametrize("bare", [True, False])
def test_keeps_name_docstring_and_kind(koala: Koala, view: Any, bare: bool) -> None:
    wrapped = (
        koala.identify_login(view) if bare else koala.identify_login(get_user=lambda: None)(view)
    )
    assert wrapped.__name__ == view.__name__
    assert wrapped.__doc__ == view.__doc__
    assert wrapped.__wrapped__ is view  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(wrapped) == inspect.iscoroutinefunction(view)


def test_url_arguments_reach_the_view(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.get("/sso/<user_id>")
    @koala.identify_login
    def sso(user_id: str) -> Any:
        return jsonify(user=user_id)

    assert visitor(app).get("/sso/jane").get_json() == {"user": "jane"}


def test_one_koala_serves_two_apps(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    first = make_app(koala=koala)
    second = make_app({"KOALA_PUBLIC_KEY": "pk_second"}, koala=koala)

    @koala.identify_login(get_user=lambda: "sam@example.com")
    def sso() -> Any:
        return jsonify(ok=True)

    for app in (first, second):
        app.add_url_rule("/sso", view_func=sso, methods=["POST"])
        visitor(app).post("/sso")
        with app.app_context():
            koala.flush(5)
    assert sorted(call.public_key or "" for call in receiver.calls) == ["pk_second", "pk_test"]


# -- the double-send guard ---------------------------------------------------------------


def test_view_that_also_calls_login_user_sends_once(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/sso")
    @koala.identify_login
    def sso() -> Any:
        login_user(USERS["jane"])
        return jsonify(ok=True)

    visitor(app).post("/sso")
    delivered(app, receiver)
    assert len(receiver.message_ids()) == 1
    assert flushed_stats(app)["skipped.duplicate"] == 1


def test_view_that_logs_in_then_raises_sends_nothing(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/sso")
    @koala.identify_login
    def sso() -> Any:
        login_user(USERS["jane"])
        raise LookupError("the profile fetch failed after login_user")

    with pytest.raises(LookupError, match="after login_user"):
        visitor(app).post("/sso")
    assert delivered(app, receiver) == []
    assert flushed_stats(app)["skipped.view_failed"] == 1


def test_view_that_logs_in_then_answers_an_error_sends_nothing(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/sso")
    @koala.identify_login(get_user=lambda: USERS["jane"])
    def sso() -> Any:
        login_user(USERS["jane"])
        return jsonify(error="account locked"), 403

    assert visitor(app).post("/sso").status_code == 403
    assert delivered(app, receiver) == []
    assert flushed_stats(app)["skipped.view_failed"] == 1


def test_async_view_that_logs_in_then_answers_an_error_sends_nothing(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/sso")
    @koala.identify_login
    async def sso() -> Any:
        login_user(USERS["jane"])
        return "denied", 500

    assert visitor(app).post("/sso").status_code == 500
    assert delivered(app, receiver) == []


def test_a_login_held_by_a_view_is_sent_with_the_logins_visitor(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/sso")
    @koala.identify_login(get_user=lambda: None)  # the getter finds nobody: the signal's call
    def sso() -> Any:
        login_user(USERS["jane"])
        return redirect("/whoami")

    visitor(app).post("/sso")
    (body,) = delivered(app, receiver)
    assert (body["profile_id"], body["email"]) == (PROFILE_ID, "jane@example.com")


def test_logins_outside_a_decorated_view_are_not_held(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    @app.post("/fails")
    def fails() -> Any:
        login_user(USERS["jane"])
        return "no", 500

    visitor(app).post("/fails")
    assert len(delivered(app, receiver)) == 1


def test_guard_is_per_request_even_inside_one_app_context(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    client = visitor(app)
    with app.app_context():  # g would be shared by both requests
        client.post("/login/jane")
        client.post("/login/jane")
    delivered(app, receiver)
    assert len(receiver.message_ids()) == 2


def test_get_user_form_is_decided_when_decorating(koala: Koala) -> None:
    decorator = koala.identify_login(get_user=lambda: None)

    def view() -> str:
        return "ok"

    wrapped = decorator(view)
    assert wrapped.__wrapped__ is view  # type: ignore[attr-defined]


def positional(koala: Koala) -> Any:
    """``koala.identify_login``, for the positional getter form type checkers do not know."""
    return koala.identify_login


def test_get_user_may_be_passed_positionally(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)

    def get_user() -> str:
        return "sam@example.com"

    @app.post("/sso")
    @positional(koala)(get_user)
    def sso() -> Any:
        return jsonify(ok=True)

    assert visitor(app).post("/sso").status_code == 200
    (body,) = delivered(app, receiver)
    assert body["identifies"][0]["traits"] == {"email": "sam@example.com"}


def test_a_positional_getter_leaves_the_view_as_it_was(koala: Koala) -> None:
    def get_user() -> None:
        return None

    def view() -> str:
        """The view's own docstring."""
        return "ok"

    wrapped = positional(koala)(get_user)(view)
    assert wrapped.__wrapped__ is view
    assert wrapped.__name__ == "view"
    assert wrapped.__doc__ == "The view's own docstring."


def test_identify_login_without_view_or_getter_is_a_type_error(koala: Koala) -> None:
    with pytest.raises(TypeError, match="get_user"):
        koala.identify_login()  # type: ignore[call-overload]


def test_identify_login_with_view_and_getter_is_a_type_error(koala: Koala) -> None:
    with pytest.raises(TypeError, match="get_user alone"):
        koala.identify_login(lambda: "ok", get_user=lambda: None)  # type: ignore[call-overload]


def test_a_decorated_view_called_outside_a_request_still_runs(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    app = make_app(koala=koala)

    @koala.identify_login(get_user=lambda: None)
    def sso() -> Any:
        return "called directly, as a unit test may"

    with app.app_context():
        assert sso().get_data(as_text=True) == "called directly, as a unit test may"
