"""Small statistics for noisy machines: medians of interleaved rounds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values (so a skipped variant prints as n/a)."""
    return statistics.median(values) if values else float("nan")


def rounds_spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes of a figure's rounds (all the one value for one round)."""
    if len(values) < 2:
        return dict.fromkeys(("median", "q1", "q3", "min", "max"), values[0])
    q1, _, q3 = statistics.quantiles(values, n=4)
    return {"median": median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def micros(seconds: float) -> str:
    """Seconds as whole microseconds, ``n/a`` for NaN."""
    return "n/a" if seconds != seconds else f"{seconds * 1e6:.0f} µs"
