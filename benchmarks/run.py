"""Measure flask-koala side by side with the alternatives, and print each figure by its target.

Usage::

    python -m benchmarks.run            # full run, about three and a half minutes
    python -m benchmarks.run --quick    # fewer samples, about a minute and a half
    python -m benchmarks.run --smoke    # proves it runs; the figures mean nothing

Everything runs on 127.0.0.1: a loopback Koala (and a sink for Segment) in a process of
their own, one gunicorn per app variant (and a second bare one, the noise floor), and a
fresh process for each of figures 2 to 5.
The machine is assumed noisy: variants are interleaved in rounds and compared by medians
and ratios measured in the same run, never against absolute numbers. Benchmarks report;
the exit status is 0 whatever the figures (tests never assert on speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import latency
from .apps import CONTROL, VARIANTS
from .loopback import ROOT, ReceiverProcess, child_env
from .stats import micros

DRAIN_LATENCY = 0.05
OUTAGE_LATENCY = 0.02
OUTAGE_WINDOW = 8.0


@dataclass(frozen=True)
class Profile:
    """How many samples each figure takes."""

    rounds: int  # figure 1: rounds in which every server serves `block` logins
    block: int
    warmup: int
    servers: int  # figure 1: server processes per variant
    cpu_logins: int  # figure 2: logins per round
    cpu_rounds: int
    drain_calls: int  # figure 3
    backlog: int  # figure 4
    outage_calls: int = 300  # figure 5
    repeats: int = 3  # figures 3 to 5: fresh processes, for the spread
    request_calls: int = 1000  # figure 0: identifies per round
    request_rounds: int = 15
    page_requests: int = 300  # figure 0b: page views per app and round
    page_rounds: int = 40


PROFILES = {
    "full": Profile(
        rounds=40,
        block=10,
        warmup=200,
        servers=3,
        cpu_logins=200,
        cpu_rounds=40,
        drain_calls=600,
        backlog=10_000,
    ),
    "quick": Profile(
        rounds=10,
        block=10,
        warmup=50,
        servers=3,
        cpu_logins=200,
        cpu_rounds=12,
        drain_calls=200,
        backlog=10_000,
        repeats=2,
        request_rounds=7,
    ),
    "smoke": Profile(
        rounds=1,
        block=3,
        warmup=2,
        servers=2,
        cpu_logins=20,
        cpu_rounds=1,
        drain_calls=8,
        backlog=1_000,
        outage_calls=20,
        repeats=1,
        request_calls=50,
        request_rounds=2,
        page_requests=20,
        page_rounds=2,
    ),
}


@dataclass(frozen=True)
class Row:
    figure: str
    measured: str
    target: str
    passed: bool | None  # None: could not be judged

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "FAIL")


def _child(module: str, *args: object) -> dict[str, Any]:
    """Run ``python -m benchmarks.<module> args`` and return the JSON line it prints."""
    output = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *map(str, args)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=ROOT,
        timeout=300,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _say(text: str) -> None:
    print(text, flush=True)


def _spread(values: list[float], fmt: str = "{:.0f}", unit: str = "") -> str:
    """The lowest and highest of repeated measurements, as text."""
    if len(values) < 2:
        return "one round"
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}{unit}"


def figure_0(profile: Profile) -> Row:
    result = _child("request_path", profile.request_calls, profile.request_rounds)
    held = result["median"] * 1e6
    _say(
        f"  {result['rounds']} rounds of {result['calls']} identifies with four traits in one"
        f" request: {held:.1f} µs CPU each (rounds {result['min'] * 1e6:.1f}-"
        f"{result['max'] * 1e6:.1f})"
    )
    return Row(
        "0. identify() holds the request",
        f"{held:.1f} µs (rounds {result['min'] * 1e6:.1f}-{result['max'] * 1e6:.1f})",
        "≤ 8 µs",
        held <= 8,
    )


def figure_0b(profile: Profile) -> Row:
    result = _child("page_view", profile.page_requests, profile.page_rounds)
    koala, control = result["koala"], result["control"]
    measured = (
        f"{koala['median'] * 1e6:+.1f} µs (middle half {koala['q1'] * 1e6:+.1f} to"
        f" {koala['q3'] * 1e6:+.1f}); bare vs bare {control['median'] * 1e6:+.1f} µs"
    )
    _say(
        f"  {result['rounds']} rounds of {result['requests']} page views per app, through WSGI:"
        f" bare {result['bare'] * 1e6:.0f} µs CPU each; flask-koala adds {measured}"
    )
    return Row("0b. time added to a page view", measured, "(none)", None)


def figure_1(
    receiver: ReceiverProcess, profile: Profile, variants: tuple[str, ...], gap: float
) -> list[Row]:
    result = latency.measure(
        receiver,
        variants=variants,
        rounds=profile.rounds,
        block=profile.block,
        gap=gap,
        warmup=profile.warmup,
        servers=profile.servers,
    )
    bare = result.paced["bare"]
    _say(
        f"  {result.logins} paced and {result.saturated_logins} saturated timed logins per"
        f" variant, over {profile.servers} servers each; medians:"
    )
    for name in variants:
        paced, saturated = result.paced[name], result.saturated[name]
        added = (
            ""
            if name == "bare"
            else (
                f"  adds {micros(paced - bare)} paced ({(paced - bare) / bare:+.1%}),"
                f" {micros(result.added(name, 'saturated'))} saturated"
            )
        )
        _say(f"    {name:10} paced {micros(paced):>9}  saturated {micros(saturated):>9}{added}")
    koala = result.added("koala")
    low, high = result.spread("koala")
    share = koala / bare
    measured = f"{koala * 1e6:+.0f} µs (groups {_between(low, high)}) = {share:+.1%}"
    saturated = result.added("koala", "saturated")
    s_low, s_high = result.spread("koala", "saturated")
    measured_saturated = f"{saturated * 1e6:+.0f} µs (groups {_between(s_low, s_high)})"
    paced_ok = share <= 0.02
    saturated_ok: bool | None = None
    if "segment" in variants:
        segment = result.added("segment")
        segment_saturated = result.added("segment", "saturated")
        if segment > 0:
            measured += f"; {koala / segment:.2f}x Segment's {segment * 1e6:+.0f} µs"
            paced_ok = paced_ok and koala <= 0.2 * segment
        else:
            measured += "; Segment's lost in noise"
        measured_saturated += f"; Segment's {segment_saturated * 1e6:+.0f} µs"
        saturated_ok = saturated <= segment_saturated
    else:
        measured += "; Segment not installed"
    if CONTROL in variants:  # the noise floor: how far apart two identical servers are
        floor, floor_saturated = result.added(CONTROL), result.added(CONTROL, "saturated")
        measured += f"; bare vs bare {floor * 1e6:+.0f} µs"
        measured_saturated += f"; bare vs bare {floor_saturated * 1e6:+.0f} µs"
    return [
        Row("1. time added to a paced login", measured, "≤ 2% of bare, ≤ 0.2x Segment's", paced_ok),
        Row("1b. time added, saturated", measured_saturated, "≤ Segment's", saturated_ok),
    ]


def _between(low: float, high: float) -> str:
    """A spread of added times (seconds) in signed microseconds: "-108 to +65"."""
    return f"{low * 1e6:+.0f} to {high * 1e6:+.0f}"


def _rounds(spread: dict[str, float]) -> str:
    """The middle half of the rounds, and all of them."""
    q1, q3, low, high = (f"{spread[k]:.2f}" for k in ("q1", "q3", "min", "max"))
    return f"middle half {q1}-{q3}, all {low}-{high}"


def figure_2(receiver: ReceiverProcess, profile: Profile) -> list[Row]:
    result = _child("cpu", receiver.koala_url, profile.cpu_logins, profile.cpu_rounds)
    _say(
        f"  {result['rounds']} rounds of {result['calls'] // result['rounds']} logins per variant;"
        f" medians of the rounds: raw keep-alive http.client POST {micros(result['raw_per_call'])};"
        f" flask-koala's transport alone {micros(result['transport_per_call'])};"
        f" bare login {micros(result['bare_per_login'])}"
    )
    rows = []
    for name, label, figure, target in (
        ("koala", "delivered in flush()", "2. CPU per delivered identify", "≤ 1.5x raw POST"),
        ("woken", "woken after each login", "2b. the same, workers woken per login", "(none)"),
    ):
        part = result[name]
        ratio = part["ratio"]["median"]
        _say(
            f"    {label:23} {micros(part['per_call']['median']):>7} CPU per identify,"
            f" {ratio:.2f}x raw ({_rounds(part['ratio'])});"
            f" {part['left_for_flush']:.0%} of the round left for flush()"
        )
        passed = ratio <= 1.5 if name == "koala" else None
        measured = f"{ratio:.2f}x raw POST ({_rounds(part['ratio'])})"
        rows.append(Row(figure, measured, target, passed))
    return rows


def figure_3(receiver: ReceiverProcess, profile: Profile) -> Row:
    receiver.command(f"delay {DRAIN_LATENCY}")
    shares = []
    delivered = True
    try:
        for _ in range(profile.repeats):
            result = _child("drain", receiver.koala_url, profile.drain_calls)
            shares.append(result["rate"] / result["ideal"])
            delivered = delivered and bool(result["delivered"])
    finally:
        receiver.command("delay 0")
    share = sorted(shares)[len(shares) // 2]
    _say(
        f"  {result['calls']} people, MAX_WORKERS={result['workers']}, round trip"
        f" {result['round_trip'] * 1e3:.1f} ms: {share * result['ideal']:.1f} calls/s of an"
        f" ideal {result['ideal']:.1f} (median of {len(shares)} fresh processes)"
        + ("" if delivered else " (NOT all delivered)")
    )
    return Row(
        "3. drain rate at 50 ms latency",
        f"{share:.0%} of MAX_WORKERS/round trip ({_spread([x * 100 for x in shares], unit='%')})",
        "≥ 95%",
        share >= 0.95 and delivered,
    )


def figure_4(profile: Profile) -> Row:
    growths = []
    with ReceiverProcess(delay=3600) as hanging:
        for _ in range(profile.repeats):
            result = _child("memory", hanging.koala_url, profile.backlog)
            # Decimal megabytes (10**6 bytes): the stricter reading of the target's "10 MB".
            growths.append(result["growth"] / 1e6 * 10_000 / max(1, result["calls"]))
    scaled = sorted(growths)[len(growths) // 2]
    _say(
        f"  {result['accepted']} of {result['calls']} calls queued ({result['dropped']} dropped),"
        f" RSS {result['before'] / 1e6:.1f} MB before (MB = 10**6 bytes); growth per 10,000"
        f" calls, median of {len(growths)} fresh processes: +{scaled:.1f} MB"
    )
    return Row(
        f"4. RSS, backlog of {result['calls']:,}",
        f"+{scaled:.1f} MB per 10,000 ({_spread(growths, '{:.1f}', ' MB')})",
        "≤ 10 MB per 10,000",
        scaled <= 10,
    )


def figure_5(receiver: ReceiverProcess, profile: Profile) -> Row:
    calls = profile.outage_calls
    shares = []
    ended = True
    for _ in range(profile.repeats):
        receiver.command("reset")
        receiver.command(f"delay {OUTAGE_LATENCY}")
        receiver.command(f"flaky 0.5 {calls * 4}")
        result = _child("outage", receiver.koala_url, calls, OUTAGE_WINDOW)
        shares.append(result["in_window"] / result["calls"])
        ended = ended and result["sent"] + result["exhausted"] == calls and result["flushed"]
    receiver.command("reset")
    share = sorted(shares)[len(shares) // 2]
    _say(
        f"  {calls} people, MAX_WORKERS=4, {OUTAGE_LATENCY * 1e3:.0f} ms per answer, about half"
        f" 503; last of {len(shares)} fresh processes: {result['in_window']} delivered within"
        f" {OUTAGE_WINDOW:.0f} s ({result['retried']} retries); in the end {result['sent']}"
        f" sent, {result['exhausted']} retries_exhausted" + ("" if ended else " (NOT all ended)")
    )
    spread = _spread([x * 100 for x in shares], unit="%")
    return Row(
        "5. partial outage, half 503",
        f"{share:.0%} within {OUTAGE_WINDOW:.0f} s ({spread})",
        "≥ 85%",
        share >= 0.85 and ended,
    )


def _conditions() -> str:
    """The machine as the run found it: a figure means little without its load."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs, load average {load}; Python {platform.python_version()},"
        f" {platform.machine()}"
    )


def _table(rows: list[Row]) -> str:
    header = ("figure", "measured", "target", "")
    cells = [header] + [(r.figure, r.measured, r.target, r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(4)).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer samples (under two minutes)")
    mode.add_argument(
        "--smoke", action="store_true", help="prove it runs (seconds); figures meaningless"
    )
    parser.add_argument("-n", "--logins", type=int, help="figure 2: logins per round")
    parser.add_argument(
        "--rounds", type=int, help="figure 1: rounds in which every server serves 10 logins"
    )
    parser.add_argument("--servers", type=int, help="figure 1: server processes per variant")
    parser.add_argument(
        "--gap", type=float, default=10.0, help="figure 1: pause after each paced login, ms"
    )
    parser.add_argument(
        "--figures", default="012345", help="which figures to measure, e.g. 12 (default: all)"
    )
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    profile = PROFILES[name]
    if args.logins:
        profile = dataclasses.replace(profile, cpu_logins=args.logins)
    if args.rounds:
        profile = dataclasses.replace(profile, rounds=args.rounds)
    if args.servers:
        profile = dataclasses.replace(profile, servers=args.servers)

    variants = (*VARIANTS, CONTROL)
    if importlib.util.find_spec("segment") is None:
        variants = tuple(v for v in VARIANTS if v != "segment")
        _say("segment-analytics-python is not installed (pip install -e '.[bench]'): skipped")
    started = time.monotonic()
    _say(f"flask-koala benchmarks, {name} run, all traffic on 127.0.0.1")
    _say(_conditions())
    rows = []
    if "0" in args.figures:
        _say("0. what identify() holds the request (fresh process, CPU time)")
        rows.append(figure_0(profile))
        _say("0b. what flask-koala adds to a page view (fresh process, CPU time, through WSGI)")
        rows.append(figure_0b(profile))
    with ReceiverProcess() as receiver:
        if "1" in args.figures:
            _say("1. login time over HTTP (gunicorn gthread per variant, keep-alive client)")
            rows.extend(figure_1(receiver, profile, variants, args.gap / 1000))
            receiver.command("reset")
        if "2" in args.figures:
            _say("2. CPU per delivered identify (Flask test client, fresh process)")
            rows.extend(figure_2(receiver, profile))
            receiver.command("reset")
        if "3" in args.figures:
            _say(f"3. drain rate, receiver answering after {DRAIN_LATENCY * 1e3:.0f} ms")
            rows.append(figure_3(receiver, profile))
    if "4" in args.figures:
        _say("4. memory held by a full backlog (receiver never answers, fresh process)")
        rows.append(figure_4(profile))
    if "5" in args.figures:
        _say("5. partial outage: half of the answers 503 (fresh process)")
        with ReceiverProcess() as receiver:
            rows.append(figure_5(receiver, profile))
    _say("")
    if name == "smoke":
        _say("(smoke run: far too few samples for these figures to mean anything)")
    _say(_table(rows))
    _say(f"\n{name} run took {time.monotonic() - started:.0f} s; at the end: {_conditions()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
