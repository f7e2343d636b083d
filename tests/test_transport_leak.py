"""Sync apps a test suite throws away without shutdown() must not keep their sockets."""

from __future__ import annotations

import gc
import os
import time

from flask_koala._receiver import KoalaReceiver

from .support import build_app, visitor


def _open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass  # closed between listdir and readlink
    return count


def _use_and_drop(receiver: KoalaReceiver) -> None:
    app = build_app({"KOALA_API_URL": receiver.url, "KOALA_SYNC": True})
    response = visitor(app).post("/login/jane")
    assert response.status_code == 200


def test_150_dropped_sync_apps_leave_no_sockets_behind() -> None:
    with KoalaReceiver() as receiver:
        gc.collect()
        before = _open_sockets()
        for _ in range(150):
            _use_and_drop(receiver)
        assert len(receiver.calls) == 150  # each app did open a connection and deliver
        gc.collect()
        # The receiver closes its side once ours is closed; give its threads a moment.
        deadline = time.monotonic() + 5
        while _open_sockets() - before > 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _open_sockets() - before
    assert left <= 5, f"{left} sockets left open by 150 dropped apps"


def test_150_dropped_sync_apps_leave_a_handful_of_sockets_before_any_collection() -> None:
    # A Flask app sits in reference cycles: only the cyclic collector frees it, and a test
    # suite's dropped apps can wait long for a full collection. Their idle connections
    # must not: all sync dispatchers of a process keep a handful together.
    with KoalaReceiver() as receiver:
        gc.collect()
        before = _open_sockets()
        gc.disable()
        try:
            for _ in range(150):
                _use_and_drop(receiver)
            deadline = time.monotonic() + 5
            while _open_sockets() - before > 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            left = _open_sockets() - before
        finally:
            gc.enable()
    assert len(receiver.calls) == 150
    assert left <= 10, f"{left} sockets (both ends) left open by 150 dropped apps"
