"""A loopback Koala, and a sink for Segment, in a process of their own.

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
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flask_koala._receiver import KoalaReceiver


class _SinkHandler(BaseHTTPRequestHandler):
    """Answers every POST ``200 {}`` after reading its body, with keep-alive."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent."""


def _sink() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SinkHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="segment-sink", daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=0.0, help="Koala answer delay, seconds")
    args = parser.parse_args()
    sink = _sink()
    with KoalaReceiver() as koala:
        koala.delay(args.delay)
        urls = {"koala": koala.url, "segment": f"http://127.0.0.1:{sink.server_address[1]}"}
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
    sink.shutdown()


if __name__ == "__main__":
    main()
