"""A loopback Koala and a sink (:mod:`benchmarks.sink`), in a process of their own.

The benchmarks start this as a subprocess so that the receiver's CPU and memory never blur
the figures of the process being measured. It prints one JSON line with the two base URLs,
then takes one command per line on stdin and answers each with one line:

- ``delay <seconds>``: hold every Koala answer that long (``KoalaReceiver.delay``).
- ``flaky <fraction> <count>``: answer the next ``count`` requests 503 with probability
  ``fraction`` each, 200 otherwise (seeded, so every run sees the same sequence).
- ``count``: the number of Koala requests answered 2xx so far.
- ``reset``: forget everything and lift the delay.

End of input stops it. Usage::

    python -m benchmarks.receiver [--delay SECONDS]
"""

from __future__ import annotations

import argparse
import json
import random
import sys

from flask_koala._receiver import KoalaReceiver

from .sink import Sink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=0.0, help="Koala answer delay, seconds")
    args = parser.parse_args()
    sink = Sink()
    with KoalaReceiver() as koala:
        koala.delay(args.delay)
        urls = {"koala": koala.url, "sink": sink.url}
        print(json.dumps(urls), flush=True)
        for line in sys.stdin:
            command, _, value = line.strip().partition(" ")
            if command == "delay":
                koala.delay(float(value))
                answer = "ok"
            elif command == "flaky":
                fraction, count = value.split()
                rng = random.Random(11)
                koala.respond_with(
                    *[503 if rng.random() < float(fraction) else 200 for _ in range(int(count))]
                )
                answer = "ok"
            elif command == "count":
                answer = str(len(koala.bodies))
            elif command == "reset":
                koala.reset()
                answer = "ok"
            else:
                answer = f"unknown command {command!r}"
            print(answer, flush=True)
    sink.close()


if __name__ == "__main__":
    main()
