"""Measure flask-koala side by side with the alternatives, and print each figure by its target.

Usage::

    python -m benchmarks.run            # full run, under two minutes
    python -m benchmarks.run --quick    # fewer samples, under forty seconds
    python -m benchmarks.run --smoke    # proves it runs; the figures mean nothing

Everything runs on 127.0.0.1: a loopback Koala (and a sink for Segment) in a process of
their own, one gunicorn per app variant, and a fresh process for each of figures 2 to 4.
The machine is assumed noisy: variants are interleaved in rounds and compared by medians
and ratios measured in the same run, never against absolute numbers. Benchmarks report;
the exit status is 0 whatever the figures (tests never assert on speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import latency
from .apps import VARIANTS
from .loopback import ROOT, ReceiverProcess, child_env
from .stats import micros

DRAIN_LATENCY = 0.05
OUTAGE_LATENCY = 0.02
OUTAGE_WINDOW = 8.0


@dataclass(frozen=True)
class Profile:
    """How many samples each figure takes."""

    rounds: int  # figure 1: rounds of `block` logins per variant
    block: int
    warmup: int
    cpu_logins: int  # figure 2: logins per round
    cpu_rounds: int
    drain_calls: int  # figure 3
    backlog: int  # figure 4
    outage_calls: int = 300  # figure 5


PROFILES = {
    "full": Profile(
        rounds=120,
        block=10,
        warmup=200,
        cpu_logins=1000,
        cpu_rounds=9,
        drain_calls=600,
        backlog=10_000,
    ),
    "quick": Profile(
        rounds=30,
        block=10,
        warmup=50,
        cpu_logins=400,
        cpu_rounds=5,
        drain_calls=200,
        backlog=10_000,
    ),
    "smoke": Profile(
        rounds=1,
        block=3,
        warmup=2,
        cpu_logins=20,
        cpu_rounds=1,
        drain_calls=8,
        backlog=1_000,
        outage_calls=20,
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


def figure_1(
    receiver: ReceiverProcess, profile: Profile, variants: tuple[str, ...], gap: float
) -> Row:
    result = latency.measure(
        receiver,
        variants=variants,
        rounds=profile.rounds,
        block=profile.block,
        gap=gap,
        warmup=profile.warmup,
    )
    bare = result.paced["bare"]
    _say(f"  {result.logins} timed logins per variant and regime; medians:")
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
        _say(f"    {name:9} paced {micros(paced):>9}  saturated {micros(saturated):>9}{added}")
    koala = result.added("koala")
    share = koala / bare
    segment = result.added("segment") if "segment" in variants else math.nan
    if segment > 0:
        versus = koala / segment
        measured = f"+{koala * 1e6:.0f} µs = {share:.1%} of bare; {versus:.2f}x Segment's"
        passed: bool | None = share <= 0.05 and versus <= 1 / 3
    elif "segment" in variants:
        measured = f"+{koala * 1e6:.0f} µs = {share:.1%} of bare; Segment's lost in noise"
        passed = None
    else:
        measured = f"+{koala * 1e6:.0f} µs = {share:.1%} of bare; Segment not installed"
        passed = share <= 0.05
    return Row("1. time added to a login", measured, "≤ 5% of bare, ≤ 0.33x Segment's", passed)


def figure_2(receiver: ReceiverProcess, profile: Profile) -> Row:
    result = _child("cpu", receiver.koala_url, profile.cpu_logins, profile.cpu_rounds)
    koala, raw = result["koala_per_call"], result["raw_per_call"]
    _say(
        f"  {result['calls']} identifies delivered: {micros(koala)} CPU each; raw keep-alive"
        f" http.client POST {micros(raw)}; flask-koala's transport alone"
        f" {micros(result['transport_per_call'])}; bare login {micros(result['bare_per_login'])}"
    )
    ratio = result["ratio_median"]
    spread = f"{result['ratio_min']:.2f}-{result['ratio_max']:.2f}"
    return Row(
        "2. CPU per delivered identify",
        f"{ratio:.2f}x raw POST (rounds {spread})",
        "≤ 1.5x raw POST",
        ratio <= 1.5,
    )


def figure_3(receiver: ReceiverProcess, profile: Profile) -> Row:
    receiver.command(f"delay {DRAIN_LATENCY}")
    try:
        result = _child("drain", receiver.koala_url, profile.drain_calls)
    finally:
        receiver.command("delay 0")
    share = result["rate"] / result["ideal"]
    _say(
        f"  {result['calls']} people, MAX_WORKERS={result['workers']}, round trip"
        f" {result['round_trip'] * 1e3:.1f} ms: {result['rate']:.1f} calls/s of an ideal"
        f" {result['ideal']:.1f}" + ("" if result["delivered"] else " (NOT all delivered)")
    )
    return Row(
        "3. drain rate at 50 ms latency",
        f"{share:.0%} of MAX_WORKERS/round trip",
        "≥ 80%",
        share >= 0.8 and bool(result["delivered"]),
    )


def figure_4(profile: Profile) -> Row:
    with ReceiverProcess(delay=3600) as hanging:
        result = _child("memory", hanging.koala_url, profile.backlog)
    growth_mb = result["growth"] / 2**20
    _say(
        f"  {result['accepted']} of {result['calls']} calls queued ({result['dropped']} dropped),"
        f" RSS {result['before'] / 2**20:.1f} MB -> +{growth_mb:.1f} MB"
    )
    scaled = growth_mb * 10_000 / max(1, result["calls"])
    measured = f"+{growth_mb:.1f} MB"
    if result["calls"] != 10_000:
        measured += f" ({scaled:.1f} MB per 10,000)"
    return Row(
        f"4. RSS, backlog of {result['calls']:,}", measured, "≤ 30 MB per 10,000", scaled <= 30
    )


def figure_5(receiver: ReceiverProcess, profile: Profile) -> Row:
    calls = profile.outage_calls
    receiver.command(f"delay {OUTAGE_LATENCY}")
    receiver.command(f"flaky 0.5 {calls * 4}")
    try:
        result = _child("outage", receiver.koala_url, calls, OUTAGE_WINDOW)
    finally:
        receiver.command("reset")
    share = result["in_window"] / result["calls"]
    ended = result["sent"] + result["exhausted"] == result["calls"] and result["flushed"]
    _say(
        f"  {result['calls']} people, MAX_WORKERS=4, {OUTAGE_LATENCY * 1e3:.0f} ms per answer,"
        f" about half 503: {result['in_window']} delivered within {OUTAGE_WINDOW:.0f} s"
        f" ({result['retried']} retries); in the end {result['sent']} sent,"
        f" {result['exhausted']} retries_exhausted" + ("" if ended else " (NOT all ended)")
    )
    return Row(
        "5. partial outage, half 503",
        f"{share:.0%} delivered within {OUTAGE_WINDOW:.0f} s",
        "≥ 85%",
        share >= 0.85 and bool(ended),
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
    mode.add_argument("--quick", action="store_true", help="fewer samples (under 40 s)")
    mode.add_argument(
        "--smoke", action="store_true", help="prove it runs (seconds); figures meaningless"
    )
    parser.add_argument("-n", "--logins", type=int, help="figure 2: logins per round")
    parser.add_argument("--rounds", type=int, help="figure 1: rounds of 10 logins per variant")
    parser.add_argument(
        "--gap", type=float, default=10.0, help="figure 1: pause after each paced login, ms"
    )
    parser.add_argument(
        "--figures", default="12345", help="which figures to measure, e.g. 12 (default: all)"
    )
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    profile = PROFILES[name]
    if args.logins:
        profile = dataclasses.replace(profile, cpu_logins=args.logins)
    if args.rounds:
        profile = dataclasses.replace(profile, rounds=args.rounds)

    variants = VARIANTS
    if importlib.util.find_spec("segment") is None:
        variants = tuple(v for v in VARIANTS if v != "segment")
        _say("segment-analytics-python is not installed (pip install -e '.[bench]'): skipped")
    started = time.monotonic()
    _say(f"flask-koala benchmarks, {name} run, all traffic on 127.0.0.1")
    rows = []
    with ReceiverProcess() as receiver:
        if "1" in args.figures:
            _say("1. login time over HTTP (gunicorn gthread per variant, keep-alive client)")
            rows.append(figure_1(receiver, profile, variants, args.gap / 1000))
            receiver.command("reset")
        if "2" in args.figures:
            _say("2. CPU per delivered identify (Flask test client, fresh process)")
            rows.append(figure_2(receiver, profile))
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
    _say(f"\n{name} run took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
