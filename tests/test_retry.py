"""The retry policy: what is retried, how long to wait."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from flask_koala._retry import RETRY_AFTER_MAX, RetryPolicy, is_retryable, parse_retry_after


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_retryable_statuses(status: int) -> None:
    assert is_retryable(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_final_statuses(status: int) -> None:
    assert not is_retryable(status)


def test_retry_after_seconds() -> None:
    assert parse_retry_after("1") == 1.0


def test_retry_after_http_date() -> None:
    now = 1_000_000.0
    header = formatdate(now + 5, usegmt=True)
    assert parse_retry_after(header, now=lambda: now) == pytest.approx(5.0)


def test_retry_after_in_the_past_is_zero() -> None:
    now = 1_000_000.0
    assert parse_retry_after(formatdate(now - 60, usegmt=True), now=lambda: now) == 0.0


def test_retry_after_is_clamped() -> None:
    assert parse_retry_after("86400") == RETRY_AFTER_MAX


@pytest.mark.parametrize("value", [None, "", "soon", "nan"])
def test_unusable_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value) is None


def test_backoff_is_capped_exponential_times_jitter() -> None:
    policy = RetryPolicy(wait_initial=0.5, wait_max=4.0, rng=lambda: 1.0)
    assert [policy.backoff(n) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_backoff_full_jitter_can_be_zero() -> None:
    policy = RetryPolicy(rng=lambda: 0.0)
    assert policy.backoff(3) == 0.0


def test_attempts_count_the_first_try() -> None:
    # stamina's vocabulary: KOALA_MAX_RETRIES = 6 means 7 tries in all.
    assert RetryPolicy.from_retries(6).attempts == 7
    assert RetryPolicy().attempts == RetryPolicy.from_retries(6).attempts
