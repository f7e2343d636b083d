"""The test suite's own safety nets: timeouts, and no child process outliving its test."""

from __future__ import annotations

import subprocess
import time

import pytest

from .support import child_processes, communicate, kill_new_children, wait

# A shell that starts a grandchild in its own process group and waits for it.
PARENT_OF_A_SLEEPER = ["sh", "-c", "sleep 60 & wait"]


def gone(pid: int, within: float = 5) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


def sleeper_of(shell: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{shell.pid}/task/{shell.pid}/children") as f:
            pids = f.read().split()
        if pids:
            return int(pids[0])
        time.sleep(0.02)
    raise AssertionError("the shell started no sleeper")


def test_every_test_has_a_timeout(pytestconfig: pytest.Config) -> None:
    assert float(pytestconfig.getini("timeout")) > 0


def test_communicate_kills_a_child_that_overruns() -> None:
    process = subprocess.Popen(["sleep", "60"])

    with pytest.raises(subprocess.TimeoutExpired):
        communicate(process, timeout=0.1)

    assert process.poll() is not None


def test_communicate_kills_the_childs_process_group() -> None:
    shell = subprocess.Popen(PARENT_OF_A_SLEEPER, start_new_session=True)
    sleeper = sleeper_of(shell)

    with pytest.raises(subprocess.TimeoutExpired):
        communicate(shell, timeout=0.1)

    assert gone(sleeper)


def test_wait_kills_a_child_that_overruns() -> None:
    process = subprocess.Popen(["sleep", "60"])

    with pytest.raises(subprocess.TimeoutExpired):
        wait(process, 0.1)

    assert process.poll() is not None


def test_leftover_children_are_found_and_killed() -> None:
    before = child_processes()
    process = subprocess.Popen(["sleep", "60"])

    leaked = kill_new_children(before, grace=0)

    assert leaked == [process.pid]
    assert process.wait(5) == -9


def test_children_that_existed_before_are_left_alone() -> None:
    process = subprocess.Popen(["sleep", "60"])
    try:
        assert kill_new_children(child_processes(), grace=0) == []
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()
