"""The ``flask koala`` commands: check a setup, send one call, watch calls arrive.

``init_app`` adds the :data:`koala_cli` group to ``app.cli``, and the package registers it
as a ``flask.commands`` entry point, so ``flask`` gets::

    flask koala check                 the effective settings; exit 1 on a problem
    flask koala identify EMAIL        one real call, its HTTP status and Koala's answer
    flask koala receiver              a loopback Koala printing each call as it arrives

``check`` never touches the network: it judges the settings alone. ``identify`` is the
online test; where the app's sending is disabled, or suppressed (as under ``app.testing``)
with ``KOALA_API_URL`` off this machine, it refuses unless given ``--force``. ``receiver``
needs no app (the entry point makes ``flask koala`` available without one) and also runs
as ``python -m flask_koala.testing``.

Output goes to the terminal through click, which may be shared, recorded or pasted into a
ticket: emails, visitor ids and keys are partly masked (``j***@example.com``, ``3f2504e0-…``,
``pk_t…st``), enough to tell calls apart and never the whole value. The receiver and
how it prints a call live in ``_cli_receiver``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import click
from flask import Flask, current_app
from flask.cli import AppGroup, ScriptInfo

from ._cli_receiver import receiver_command, shorten
from ._config import DEFAULT_API_URL, SUSPENDED_ERROR, KoalaConfig
from ._delivery import attempt
from ._exceptions import ConfigError
from ._ids import parse_profile_id
from ._payload import MAX_BODY_BYTES, Call, build_body, clean_email, clean_traits, encode_body
from ._redact import mask, mask_key
from ._retry import is_retryable
from ._state import AppState, state_of
from ._transport import Response, Transport
from ._version import __version__

if TYPE_CHECKING:
    from ._config import Timeout

__all__ = ["koala_cli", "mask_key"]

_LABEL = 12  # width of the labels in `check`

koala_cli = AppGroup(
    "koala",
    help="Check the flask-koala setup, send a test identify, or run a loopback receiver.",
)
koala_cli.add_command(receiver_command)


# -- check ---------------------------------------------------------------------------------


@koala_cli.command("check", with_appcontext=False)
def check_command() -> None:
    """Print the effective settings; exit 1 on a problem.

    A problem is a setting that, outside tests, keeps logins from reaching Koala or makes
    them wait on it, or one init_app refuses. Offline: nothing is sent; `flask koala
    identify` makes a real call.
    """
    with _load_app().app_context():
        _check()


def _load_app() -> Flask:
    """The app, loaded here rather than by ``with_appcontext``: a setting ``init_app``
    refuses is then one ``problem:`` line naming the key, not the factory's traceback."""
    try:
        return click.get_current_context().ensure_object(ScriptInfo).load_app()
    except ConfigError as exc:  # raised by init_app while the app was being made
        click.echo(f"problem: {mask(str(exc))}", err=True)
        click.get_current_context().exit(1)


def _check() -> None:
    config = _state().config.while_testing(current_app.testing)
    problems, notes = _judge(config, testing=current_app.testing)
    for label, value in _describe(config):
        click.echo(f"{label:<{_LABEL}} {value}")
    for note in notes:
        click.echo(f"note: {note}")
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        click.get_current_context().exit(1)
    click.echo("OK")


def _describe(config: KoalaConfig) -> list[tuple[str, str]]:
    endpoint = _masked_endpoint(config)
    if not config.identify_on_login and not config.identify_on_remember:
        on_login = "nothing (only explicit koala.identify() calls)"
    elif config.identify_on_login and config.identify_on_remember:
        on_login = "identify (password logins and remember-me restores)"
    elif config.identify_on_login:
        on_login = "identify (password logins; not remember-me restores)"
    else:
        on_login = "identify (remember-me restores only)"
    return [
        ("flask-koala", __version__),
        ("public key", mask_key(config.public_key)),
        ("endpoint", endpoint),
        ("sending", _sending(config)),
        ("on login", on_login),
        ("cookie", f"{config.cookie_name} (when missing: {config.missing_cookie})"),
        ("timeout", f"{_seconds(config.timeout)}, {_retries(config)}"),
    ]


def _retries(config: KoalaConfig) -> str:
    if config.mode == "celery":  # the worker retries, with its own limit
        return f"up to {config.celery_max_retries} retries (in the Celery worker)"
    return f"up to {config.max_retries} retries"


def _sending(config: KoalaConfig) -> str:
    mode = config.mode
    if mode == "disabled":
        return "disabled (KOALA_ENABLED = False): no call is made"
    if mode == "suppressed":
        return "suppressed (KOALA_SUPPRESS_SEND): calls are checked and recorded, never sent"
    if mode == "sync":
        return "synchronous (KOALA_SYNC): each call is sent on the thread that makes it"
    if mode == "celery":
        return f"enabled, through Celery (queue {config.celery_queue!r})"
    return (
        f"enabled, in the background ({config.max_workers} thread(s), "
        f"queue of {config.max_queue_size})"
    )


def _judge(config: KoalaConfig, *, testing: bool) -> tuple[list[str], list[str]]:
    """Split what is worth saying into problems (exit 1) and notes (exit 0).

    A problem is a setting that, outside tests, keeps logins from reaching Koala or
    makes them wait on it. Anything that may well be intended is only a note.
    """
    problems: list[str] = []
    notes: list[str] = []
    mode = config.mode
    if mode == "disabled":
        problems.append("KOALA_ENABLED is False: no login is identified to Koala")
    elif mode == "suppressed" and not testing:
        problems.append(
            "KOALA_SUPPRESS_SEND is True outside testing: calls are recorded, never sent"
        )
    elif mode == "sync" and not testing:
        problems.append(
            "KOALA_SYNC is True outside testing: every login waits for Koala's answer; "
            "leave it False in a web app"
        )
    if config.sending and not config.public_key:
        # Only after init_app, which requires the key where sending is on: the app was made
        # while testing, and is not testing any more.
        problems.append("KOALA_PUBLIC_KEY is not set: calls are recorded, never sent")
    if mode == "suppressed" and testing:
        notes.append("sending is suppressed because the app is testing")
    if config.sending and config.api_url == DEFAULT_API_URL:
        notes.append(
            f"Koala's own hosts answer every call 400 {SUSPENDED_ERROR!r} since ingest was "
            "suspended; point KOALA_API_URL at your Koala-compatible collector"
        )
    if not config.identify_on_login and not config.identify_on_remember:
        notes.append("identify on login is off: only explicit koala.identify() calls are sent")
    return problems, notes


def _masked_endpoint(config: KoalaConfig) -> str:
    return f"{config.api_url}/web/projects/{mask_key(config.public_key)}/batch"


def _seconds(timeout: Timeout) -> str:
    if isinstance(timeout, tuple):
        return f"{timeout[0]:g}s to connect, {timeout[1]:g}s to read"
    return f"{timeout:g}s"


# -- identify ------------------------------------------------------------------------------


def _email(ctx: click.Context, param: click.Parameter, value: str) -> str:
    email = clean_email(value)
    if email is None:
        # Not echoed: what was typed may be most of a real address (see the module docstring).
        raise click.BadParameter(
            "is not an email address (at most 254 characters, one @ with text on both sides, "
            "no spaces or control characters)"
        )
    return email


def _profile_id(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    profile_id = parse_profile_id(value)
    if profile_id is None:
        raise click.BadParameter("is not a UUID like the ko_id cookie holds (not echoed)")
    return profile_id


def _traits(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    traits: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter("each --trait is KEY=VALUE, with a non-empty key")
        traits[key.strip()] = value
    if clean_traits(traits)[0] is None:
        # A byte that is not UTF-8, passed on by the shell as a lone surrogate.
        raise click.BadParameter("a --trait holds text UTF-8 cannot encode (not echoed)")
    return traits


@koala_cli.command("identify", with_appcontext=False)
@click.argument("email", callback=_email)
@click.option(
    "--profile-id",
    metavar="UUID",
    callback=_profile_id,
    help="The visitor's ko_id cookie value. Without it the call names the email only.",
)
@click.option(
    "--trait",
    "traits",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_traits,
    help="A trait to send, as a string; repeat for more.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Send even though KOALA_ENABLED = False or KOALA_SUPPRESS_SEND turn sending off.",
)
def identify_command(
    email: str, profile_id: Optional[str], traits: dict[str, Any], force: bool
) -> None:
    """Send one identify call now and print Koala's answer.

    Sent once, on this thread, whatever KOALA_SYNC says: it is the live test of a setup.
    Where sending is disabled, or suppressed (as under app.testing) with KOALA_API_URL off
    this machine, it refuses unless --force is given, so a test suite never reaches Koala
    by accident; a suppressed app still sends to a loopback collector. Exits 1 unless
    Koala answers 2xx.
    """
    with _load_app().app_context():
        _identify(email, profile_id, traits, force)


def _identify(email: str, profile_id: Optional[str], traits: dict[str, Any], force: bool) -> None:
    state = _state()
    config = state.config.while_testing(current_app.testing)
    if not config.enabled and not force:
        raise click.ClickException(
            "sending is off (KOALA_ENABLED is False), so nothing was sent; "
            "pass --force to send anyway"
        )
    if config.suppress_send and not force:
        if not config.api_is_local:
            raise click.ClickException(
                "sending is suppressed (KOALA_SUPPRESS_SEND is on) and KOALA_API_URL is not "
                "on this machine, so nothing was sent; pass --force to send anyway"
            )
        click.echo("sending is suppressed, but KOALA_API_URL is on this machine: sending")
    if not config.public_key:
        raise click.ClickException(
            "KOALA_PUBLIC_KEY is not set: it names the workspace the call is for"
        )
    call = Call.identify(profile_id=profile_id, email=email, traits={**traits, "email": email})
    body = encode_body(build_body([call]))
    if len(body) > MAX_BODY_BYTES:
        raise click.BadParameter(
            f"the call would be {len(body)} bytes, over Koala's {MAX_BODY_BYTES}-byte limit",
            param_hint="'--trait'",
        )
    who = f"profile_id {profile_id}" if profile_id else "no profile_id (email only)"
    click.echo(f"POST {_masked_endpoint(config)}")
    click.echo(mask(f"  email {email}, {who}, message_id {call.message_id}"))
    transport = _KeepAnswer(state.transport_factory())
    try:
        outcome = attempt(transport, config.endpoint, body, config.timeout)
    finally:
        transport.close()
    answer = transport.answer
    if answer is None:
        raise click.ClickException(
            mask(f"no answer from {config.api_url} ({outcome.reason}: {outcome.error})")
        )
    click.echo(mask(f"HTTP {answer.status} {shorten(answer.text) or '(empty body)'}"))
    if outcome.outcome == "sent":
        click.echo("Koala accepted the call.")
        return
    raise click.ClickException(mask(_refusal(answer.status, outcome.error or "")))


def _refusal(status: int, error: str) -> str:
    message = f"Koala refused the call with HTTP {status}: {error or '(no error text)'}"
    if error == SUSPENDED_ERROR:
        return (
            f"{message}. Koala's ingest is suspended: its hosts answer this to every call. "
            "Point KOALA_API_URL at a Koala-compatible collector."
        )
    if is_retryable(status):
        return f"{message} (temporary: the extension would retry it)"
    return f"{message} (permanent: the extension would not retry it)"


class _KeepAnswer:
    """Wraps a transport to keep the last answer, which ``attempt()`` only classifies."""

    def __init__(self, inner: Transport) -> None:
        self._inner = inner
        self.answer: Optional[Response] = None

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        self.answer = self._inner.post(url, body, headers, timeout)
        return self.answer

    def close(self) -> None:
        self._inner.close()


# -- plumbing ------------------------------------------------------------------------------


def _state() -> AppState:
    state = state_of(current_app)
    if state is None:
        raise click.ClickException(
            f"flask-koala is not initialised on app {current_app.name!r}: call "
            "koala.init_app(app) in your app factory"
        )
    return state
