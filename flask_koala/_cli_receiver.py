"""``flask koala receiver`` (also ``python -m flask_koala.testing``): a loopback Koala that
prints each call as it arrives, until Ctrl-C or SIGTERM.

It needs no app, so nothing here imports Flask. Every line printed is masked (emails,
visitor ids, keys) and made safe for a terminal, since a call holds whatever a client sent.
"""

from __future__ import annotations

import contextlib
import http
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Optional

import click

from ._redact import mask

if TYPE_CHECKING:
    from types import FrameType

    from ._receiver import ReceivedCall

__all__ = ["format_call", "receiver_command", "shorten"]

_MAX_SHOWN = 300  # characters of a body or an answer shown on one line


@click.command("receiver")
@click.option("--host", default="127.0.0.1", show_default=True, help="The interface to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8787,
    show_default=True,
    help="The port to listen on; 0 picks a free one.",
)
def receiver_command(host: str, port: int) -> None:
    """Run a loopback Koala printing each call, until Ctrl-C.

    Point KOALA_API_URL at the URL it prints. Each call is checked against Koala's
    contract; violations are printed and answered 400, as a strict collector would.
    """
    from ._loopback_http import is_loopback
    from ._receiver import KoalaReceiver  # a test server: loaded only when asked for

    printer = _Printer(click.echo)
    receiver = KoalaReceiver(host, port, on_call=printer)
    try:
        receiver.start()
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    with _stopped_by_signals() as wait:
        try:
            listening = receiver.url
            if not is_loopback(host):  # 0.0.0.0, say: the URL is how this machine reaches it
                listening = f"{host}:{receiver.port} (from this machine, {receiver.url})"
            click.echo(f"Koala receiver listening on {listening}")
            click.echo(f"Set KOALA_API_URL = {receiver.url!r} in your app. Ctrl-C stops.")
            wait()
        except KeyboardInterrupt:
            pass
        finally:
            _hold_signals()  # a second Ctrl-C, or a SIGTERM after it, waits for stop()
            receiver.stop()
    with printer.lock:
        click.echo(f"Stopped after {len(receiver.calls)} call(s).")


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[Callable[[], None]]:
    """Turn Ctrl-C and SIGTERM into ``KeyboardInterrupt`` while serving; restore after.

    Explicitly, because a process started in the background by a shell inherits SIGINT
    ignored, and ``docker stop`` or ``kill`` send SIGTERM, which would skip ``stop()``.
    Yields the wait for that interrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        yield _sleep_forever  # signals are only handled on the main thread
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield _wait_for_signal
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(sig, handler)


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


def _wait_for_signal() -> None:
    """Block the main thread until a signal handler raises.

    Not ``time.sleep()``: the kernel may hand a signal sent to the process to any thread
    (the receiver's own, say), and then a sleeping main thread would not wake to run the
    handler. Every caught signal writes to the wakeup socket, whichever thread caught it.
    """
    reader, writer = socket.socketpair()
    with reader, writer:
        writer.setblocking(False)
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        try:
            while True:
                reader.recv(64)  # the handler runs (and raises) once this returns
        finally:
            signal.set_wakeup_fd(previous)


def _interrupt(signum: int, frame: Optional[FrameType]) -> None:
    _hold_signals()  # before raising: a signal right behind this one must not cut stop()
    raise KeyboardInterrupt


def _hold_signals() -> None:
    """Let Ctrl-C and SIGTERM do nothing until the handlers are put back.

    A handler that does nothing, not ``SIG_IGN``: a signal already caught but not yet
    handled when the handler changes would otherwise print "ignored due to race condition".
    """
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _do_nothing)


def _do_nothing(signum: int, frame: Optional[FrameType]) -> None:
    pass


class _Printer:
    """Prints calls whole: they arrive on several connection threads at once."""

    def __init__(self, echo: Callable[[str], Any]) -> None:
        self._echo = echo
        self.lock = threading.Lock()

    def __call__(self, call: ReceivedCall) -> None:
        text = format_call(call)
        with self.lock:
            self._echo(text)


def format_call(call: ReceivedCall, *, clock: Callable[[], float] = time.time) -> str:
    """A few lines about one received call: what came, who it is about, what it says.

    The first line has the time, method, path and the status answered; then the person,
    one line per entry, and one per contract violation.
    """
    stamp = time.strftime("%H:%M:%S", time.localtime(clock()))
    lines = [f"{stamp} {call.method} {call.path} -> {_status(call.status)}"]
    body = call.body
    if isinstance(body, dict):
        person = [f"{key} {body[key]}" for key in ("profile_id", "email") if key in body]
        if person:
            lines.append("  " + ", ".join(str(part) for part in person))
        for name in ("identifies", "events", "page_views"):
            entries = body.get(name)
            if isinstance(entries, list):
                lines.extend("  " + _entry(name, entry) for entry in entries)
    elif call.raw:
        lines.append(f"  body {shorten(call.raw.decode('utf-8', 'replace'))}")
    lines.extend(f"  violation: {violation}" for violation in call.violations)
    return "\n".join(_printable(mask(line)) for line in lines)


def _printable(text: str) -> str:
    """The text with every character a terminal might act on escaped, as ``repr`` does.

    A path, an email or a trait is whatever a client sent, and escape sequences in it could
    retitle, clear or recolour the terminal, or reorder what it shows (bidi overrides).
    """
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() or char == " " else char.encode("unicode_escape").decode()
        for char in text
    )


def _status(status: Optional[int]) -> str:
    if status is None:
        return "connection dropped, no answer"
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _entry(array: str, entry: object) -> str:
    if not isinstance(entry, dict):
        return f"{array}: {shorten(_json(entry))}"
    kind = entry.get("type", array)
    if kind == "identify":
        return f"identify traits {shorten(_json(entry.get('traits')))}"
    if kind == "track":
        props = shorten(_json(entry.get("properties")))
        return f"track {_json(entry.get('event'))} properties {props}"
    return f"{kind} {shorten(_json(entry))}"


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."
