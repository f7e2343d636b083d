"""Figure 1: the time each variant adds to a login, seen by an HTTP client.

Each variant of :mod:`benchmarks.apps` is served by gunicorn (threaded worker, one process,
four threads; flask-koala's delivery threads live in that process, as in production, so
they compete with the request threads for the GIL), in several servers of its own: a
server process carries an offset of its own, tens of microseconds that no number of logins
averages out (two servers of the same app differ by that much), so each variant's logins
are spread over :data:`SERVERS` processes. This process is the client: one keep-alive
connection per server, logins one after another, each timed from sending the request to
reading the whole response. Every server takes its turn in a short block each round, in a
shuffled order, so drift on a noisy machine hits all of them alike; the figure is the
median of every login of a variant, all its servers together. Its spread: the rounds are
cut into :data:`GROUPS` consecutive groups, the time added is measured in each group alone,
and the lowest and highest of those are printed beside the figure.

Two regimes are measured:

- *paced*: a pause after each login, so the server is idle between logins as a login
  server normally is. Background work can then run between logins, but whatever it does
  while a login is in flight (the GIL it takes) counts against that login. This is the
  figure held against the targets.
- *saturated*: logins back to back, so every login also pays for the background work of
  the one before. This is the throughput cost, reported beside it and measured as CPU in
  figure 2.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import time
import uuid
from dataclasses import dataclass

from .apps import VARIANTS
from .loopback import ReceiverProcess, child_env, gunicorn
from .stats import median

#: How many consecutive groups of rounds the spread of a figure is measured over.
GROUPS = 6
#: How many server processes each variant's logins are spread over.
SERVERS = 3


@dataclass
class Latency:
    """Median login times per variant, in seconds, for both regimes, and per group."""

    paced: dict[str, float]
    saturated: dict[str, float]
    logins: int  # timed paced logins per variant
    saturated_logins: int
    paced_groups: dict[str, list[float]]
    saturated_groups: dict[str, list[float]]

    def added(self, variant: str, regime: str = "paced") -> float:
        times = self.paced if regime == "paced" else self.saturated
        return times[variant] - times["bare"]

    def spread(self, variant: str, regime: str = "paced") -> tuple[float, float]:
        """The lowest and highest time added, group by group."""
        groups = self.paced_groups if regime == "paced" else self.saturated_groups
        added = [v - b for v, b in zip(groups[variant], groups["bare"])]
        return min(added), max(added)


def _login(connection: http.client.HTTPConnection) -> None:
    # A fresh visitor id each time: every identify is about a new person, none merged.
    headers = {"Cookie": f"ko_id={uuid.uuid4()}", "Content-Length": "0"}
    connection.request("POST", "/login", headers=headers)
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"login answered {response.status}")


def _timed(
    connections: dict[tuple[str, int], http.client.HTTPConnection],
    rounds: int,
    block: int,
    gap: float,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median login time per variant (its servers together), and per group of rounds."""
    samples: dict[str, list[float]] = {name: [] for name, _ in connections}
    order = list(connections)
    clock = time.perf_counter
    for _ in range(rounds):
        random.shuffle(order)
        for server in order:
            connection, times = connections[server], samples[server[0]]
            for _ in range(block):
                start = clock()
                _login(connection)
                times.append(clock() - start)
                if gap:
                    time.sleep(gap)
    groups = min(GROUPS, rounds)
    per_group = {
        name: [
            median(values[len(values) * g // groups : len(values) * (g + 1) // groups])
            for g in range(groups)
        ]
        for name, values in samples.items()
    }
    return {name: median(values) for name, values in samples.items()}, per_group


def measure(
    receiver: ReceiverProcess,
    *,
    variants: tuple[str, ...] = VARIANTS,
    rounds: int,
    block: int = 10,
    gap: float = 0.002,
    warmup: int = 30,
    servers: int = SERVERS,
) -> Latency:
    """Serve every variant ``servers`` times, warm each up, then time paced and saturated
    logins: each round, every server serves a block of ``block`` logins."""
    # Every variant sends to the sink: what the receiving end does with a request would
    # otherwise take CPU from the logins timed here, which a remote API never does.
    env = child_env(BENCH_KOALA_URL=receiver.sink_url, BENCH_SEGMENT_URL=receiver.sink_url)
    with contextlib.ExitStack() as stack:
        connections = {}
        # Started copy by copy, the variants interleaved: started variant by variant, the
        # bare app's servers were always the first to boot, and two sets of bare servers
        # then read 40 to 55 µs apart in most runs, the first set the slower.
        for copy in range(servers):
            for name in variants:
                app = f"benchmarks.apps:create({name!r})"
                host, port = stack.enter_context(gunicorn(app, env))
                connection = http.client.HTTPConnection(host, port, timeout=30)
                stack.callback(connection.close)
                connections[name, copy] = connection
        for connection in connections.values():
            for _ in range(warmup):  # the first waits for gunicorn to boot
                _login(connection)
        paced, paced_groups = _timed(connections, rounds, block, gap)
        saturated_rounds = max(1, rounds // 2)
        saturated, saturated_groups = _timed(connections, saturated_rounds, block, 0.0)
    per_round = block * servers
    return Latency(
        paced,
        saturated,
        rounds * per_round,
        saturated_rounds * per_round,
        paced_groups,
        saturated_groups,
    )
