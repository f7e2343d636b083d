"""A test app with a real Flask-Login login view, and the values and seams tests share."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from flask import Flask, jsonify, request
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user

from flask_koala import Koala
from flask_koala._engine import Verdict
from flask_koala._ledger import Ledger
from flask_koala._payload import Call

PROFILE_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
OTHER_PROFILE_ID = "9b2c1e6a-1d3f-4c55-8e7a-0f1e2d3c4b5a"


class User(UserMixin):
    """A Flask-Login user; ``email`` may be anything, as it may in a real app."""

    def __init__(self, user_id: str, email: Any = None, **extra: Any) -> None:
        self.id = user_id
        self.email = email
        for key, value in extra.items():
            setattr(self, key, value)


USERS = {
    "jane": User("jane", "jane@example.com", name="Jane Doe"),
    "noemail": User("noemail", None),
    "bademail": User("bademail", "not an email"),
}


def build_app(config: dict[str, Any] | None = None, koala: Koala | None = None) -> Flask:
    """A small app whose ``/login`` view calls ``login_user`` as a real app does."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="test-secret",
        TESTING=True,
        KOALA_PUBLIC_KEY="pk_test",
        KOALA_SUPPRESS_SEND=False,
    )
    app.config.update(config or {})
    login_manager = LoginManager(app)

    @login_manager.user_loader
    def load_user(user_id: str) -> User | None:
        return USERS.get(user_id)

    @app.post("/login/<user_id>")
    def login(user_id: str) -> Any:
        login_user(USERS[user_id], remember=request.args.get("remember") == "1")
        return jsonify(ok=True)

    @app.post("/logout")
    def logout() -> Any:
        logout_user()
        return jsonify(ok=True)

    @app.get("/whoami")
    def whoami() -> Any:
        return jsonify(user=getattr(current_user, "id", None))

    koala = koala or Koala()
    koala.init_app(app)
    _KOALAS[app] = koala
    return app


# The Koala instance behind each app build_app made: tests drive apps through it, as an
# app's own code does, rather than through flask-koala's internals.
_KOALAS: weakref.WeakKeyDictionary[Flask, Koala] = weakref.WeakKeyDictionary()


def koala_of(app: Flask) -> Koala:
    """The Koala instance that :func:`build_app` set ``app`` up with."""
    return _KOALAS[app]


def flushed_stats(app: Flask, koala: Koala | None = None) -> dict[str, int]:
    """The app's counters once every accepted call has ended."""
    koala = koala or koala_of(app)
    with app.app_context():
        koala.flush(5)
        return dict(koala.stats)


def delivered(app: Flask, receiver: Any, koala: Koala | None = None) -> list[dict[str, Any]]:
    """Every body the receiver took, once the app's calls have ended, none breaking the contract.

    ``koala`` is the instance the app was set up with; by default the one of :func:`build_app`.
    """
    with app.app_context():
        assert (koala or koala_of(app)).flush(5)
    assert receiver.violations == []
    return list(receiver.bodies)


def visitor(app: Flask) -> Any:
    """A test client whose browser carries a ``ko_id`` cookie."""
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    return client


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def doc_section(*headings: str) -> str:
    """The text of these docs sections, in the order given.

    A heading is a docs page's title (``# Testing your app``: the whole page) or, when no page
    has that title, a ``## `` section of the README or a page. The docs tests run the code of
    the section they cover, so the docs cannot drift from what the code does.
    """
    texts = [p.read_text(encoding="utf-8") for p in (README, *sorted(DOCS.glob("*.md")))]
    parts = []
    for heading in headings:
        pages = [text for text in texts if text.startswith(f"# {heading}\n")]
        sections = [
            "## " + chunk
            for text in texts
            for chunk in text.split("\n## ")[1:]
            if chunk.split("\n", 1)[0] == heading
        ]
        assert pages or sections, f"the docs lack {heading!r}"
        parts.append((pages or sections)[0])
    return "\n".join(parts)


#: The name the docs tests used while the guide was one README.
readme_section = doc_section


def free_port() -> int:
    """A loopback TCP port that nothing listens on (until some other process takes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Child:
    """A command in a child process, its output read line by line on a thread.

    Stderr is read with stdout unless ``merge_stderr`` is False: then it is kept apart, in
    :attr:`stderr` once the child has ended. A Python child writes unbuffered UTF-8, so each
    line arrives as printed. Every wait is bounded: :meth:`stop` and :meth:`wait` SIGKILL a
    child that overruns theirs, with whatever it started.
    """

    def __init__(
        self,
        command: list[str],
        *,
        cwd: Path = ROOT,
        env: Optional[Mapping[str, str]] = None,
        merge_stderr: bool = True,
    ) -> None:
        env = {**(os.environ if env is None else env)}
        env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            text=True,
            encoding="utf-8",
            start_new_session=True,  # a kill takes whatever it started along
        )
        #: The lines read so far, without their newline; every line once the child has ended.
        self.seen: list[str] = []
        #: Its stderr, once it has ended (empty when merged into the lines).
        self.stderr = ""
        #: Its exit code, once :meth:`wait` or :meth:`stop` has seen it end.
        self.returncode: Optional[int] = None
        self._lines: queue.Queue[Optional[str]] = queue.Queue()  # None: stdout has ended
        self._stdout_ended = False
        self._readers = [threading.Thread(target=self._read_lines, daemon=True)]
        if not merge_stderr:
            self._readers.append(threading.Thread(target=self._read_stderr, daemon=True))
        for reader in self._readers:
            reader.start()

    @property
    def output(self) -> str:
        """The lines read so far, as one text."""
        return "\n".join(self.seen)

    def read_until(self, pattern: str, timeout: float = 20) -> list[str]:
        """The lines after those read before, up to the first that matches ``pattern`` (a regex).

        Raises AssertionError, naming the lines it saw, if none does within ``timeout`` seconds
        or before stdout ends.
        """
        start = len(self.seen)
        deadline = time.monotonic() + timeout
        while (line := self._next_line(deadline - time.monotonic())) is not None:
            if re.search(pattern, line):
                return self.seen[start:]
        raise AssertionError(f"no line matching {pattern!r} in {timeout}s: {self.seen[start:]}")

    def wait_for(self, pattern: str, timeout: float = 20) -> bool:
        """Whether a line matching ``pattern`` (a regex) comes within ``timeout`` seconds."""
        try:
            self.read_until(pattern, timeout)
        except AssertionError:
            return False
        return True

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``signum``, then :meth:`wait` for the child to end; its exit code."""
        self.process.send_signal(signum)  # no-op once the child has ended
        return self.wait(timeout)

    def wait(self, timeout: float = 20) -> int:
        """The exit code once the child ends, its output all read; -9 if it overran ``timeout``."""
        if self.returncode is not None:
            return self.returncode  # its process group is gone: its id may be another's now
        try:
            code: Optional[int] = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        # What is left of its process group (all of it, if it overran) goes now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if code is None:
            code = self.process.wait()
        for reader in self._readers:
            reader.join(5)  # bounded: a grandchild that left the group may hold a pipe open
        while self._next_line(0) is not None:
            pass
        self.returncode = code
        return code

    def _next_line(self, timeout: float) -> Optional[str]:
        """The next line, now in :attr:`seen`; None if none came in time or stdout has ended."""
        if self._stdout_ended:
            return None
        try:
            line = self._lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if line is None:
            self._stdout_ended = True
        else:
            self.seen.append(line)
        return line

    def _read_lines(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout as stdout:
            for line in stdout:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr as stderr:
            self.stderr = stderr.read()


def kill(process: subprocess.Popen[Any]) -> None:
    """SIGKILL a child, and its process group if it leads one, then reap it (bounded)."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    # A grandchild outside the group may still hold the pipes open: do not wait on it forever.
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=5)


def communicate(process: subprocess.Popen[Any], timeout: float) -> tuple[Any, Any]:
    """``process.communicate(timeout)``, killing the child if it overruns or the wait fails.

    ``Popen.communicate`` leaves an overrunning child running; a hung child must not outlive
    the test it hung (nor keep the suite from finishing).
    """
    try:
        return process.communicate(timeout=timeout)
    except BaseException:
        kill(process)
        raise


def wait(process: subprocess.Popen[Any], timeout: float) -> int:
    """``process.wait(timeout)``, killing the child if it overruns or the wait fails."""
    try:
        return process.wait(timeout)
    except BaseException:
        kill(process)
        raise


def child_processes() -> set[int]:
    """The pids of this process's children that are still running (not zombies). Linux only."""
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(pid) for pid in f.read().split())
    return {pid for pid in pids if _running(pid)}


def kill_new_children(before: set[int], grace: float) -> list[int]:
    """Kill the running children not in ``before``, after ``grace`` seconds to exit; their pids.

    A child leading a process group is killed with its group.
    """
    deadline = time.monotonic() + grace  # a child told to stop may still be on its way out
    while (leaked := child_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    return sorted(leaked)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class SlowResetLedger(Ledger):
    """A ledger whose first reset after construction waits 0.2 s and sets ``resetting``.

    As in a child forked from C (uWSGI without its fork hooks), where two request threads
    make the first calls at once: a second thread's call lands during the first one's
    reset, and a reset that is not under the fork lock would wipe its count.
    """

    armed = False  # Ledger.__init__ resets too

    def __init__(self) -> None:
        super().__init__(lambda: None)
        self.resetting = threading.Event()
        self.armed = True

    def reset(self) -> None:
        if self.armed and not self.resetting.is_set():
            self.resetting.set()
            time.sleep(0.2)
        super().reset()


class RecordingChannel:
    """Answers each attempt from a script of verdicts (then ``sent``); records the batches."""

    def __init__(self, owner: RecordingHandler) -> None:
        self._owner = owner

    def handle(self, batch: Sequence[Call]) -> Verdict:
        owner = self._owner
        owner.opened.wait(10)
        with owner.lock:
            owner.batches.append(list(batch))
            owner.memos.append(getattr(batch, "memo", None))
            return owner.verdicts.pop(0) if owner.verdicts else Verdict("sent", status=200)

    def close(self) -> None:
        with self._owner.lock:
            self._owner.closed += 1


class RecordingHandler:
    def __init__(self, *verdicts: Verdict) -> None:
        self.verdicts = list(verdicts)
        self.batches: list[list[Call]] = []
        self.memos: list[object] = []
        self.lock = threading.Lock()
        self.opened = threading.Event()
        self.opened.set()
        self.open_gate = threading.Event()
        self.open_gate.set()
        self.closed = 0

    def open(self) -> RecordingChannel:
        self.open_gate.wait(10)
        return RecordingChannel(self)


def koala_threads() -> list[str]:
    """The names of the flask-koala delivery threads alive now, sorted."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("flask-koala-"))
