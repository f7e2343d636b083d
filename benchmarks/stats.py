"""Small statistics for noisy machines: medians of interleaved rounds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values (so a skipped variant prints as n/a)."""
    return statistics.median(values) if values else float("nan")


def micros(seconds: float) -> str:
    """Seconds as whole microseconds, ``n/a`` for NaN."""
    return "n/a" if seconds != seconds else f"{seconds * 1e6:.0f} µs"
