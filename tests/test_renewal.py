"""Certificate renewal timing (meshward.proxy.renewal): when to renew, when to retry."""

from __future__ import annotations

import datetime
import math

import pytest

from meshward.proxy import renewal

NOW = datetime.datetime(2024, 6, 1, 12, 0, tzinfo=datetime.UTC)
S = datetime.timedelta(seconds=1)
H = datetime.timedelta(hours=1)
ZERO = datetime.timedelta(0)


# -- refresh_in ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "expected"),
    [
        pytest.param(24 * H, 16.8 * H, id="fresh 24h cert: 70%"),
        pytest.param(12 * H, 8.4 * H, id="half-used 24h cert: 70% of what is left"),
        pytest.param(60 * S, 42 * S, id="1 min left: 42 s"),
        pytest.param(20 * S, 14 * S, id="20 s left: 14 s"),
        pytest.param(14 * S, 10 * S, id="14 s left: floor of 10 s, still before expiry"),
        pytest.param(10 * S, 10 * S, id="10 s left: the floor is expiry itself"),
        pytest.param(5 * S, 5 * S, id="5 s left: floor would be past expiry, so 5 s"),
        pytest.param(
            datetime.timedelta(milliseconds=1), datetime.timedelta(milliseconds=1), id="1 ms left"
        ),
        pytest.param(ZERO, ZERO, id="expires now: renew now"),
        pytest.param(-S, ZERO, id="expired 1 s ago: renew now"),
        pytest.param(-100 * H, ZERO, id="long expired: renew now"),
        pytest.param(48 * H, 24 * H, id="48h cert: 24 h cap"),
        pytest.param(365 * 24 * H, 24 * H, id="one-year cert: 24 h cap"),
        pytest.param(datetime.timedelta(days=3650), 24 * H, id="ten-year cert: 24 h cap"),
    ],
)
def test_refresh_in_without_jitter(left: datetime.timedelta, expected: datetime.timedelta) -> None:
    assert renewal.refresh_in(NOW, NOW + left, 0.0) == expected


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.9, 0.999999])
@pytest.mark.parametrize("left", [24 * H, 12 * H, 72 * H, 60 * S])
def test_jitter_shortens_by_at_most_ten_percent(jitter: float, left: datetime.timedelta) -> None:
    plain = renewal.refresh_in(NOW, NOW + left, 0.0)
    jittered = renewal.refresh_in(NOW, NOW + left, jitter)
    assert plain * (1 - renewal.JITTER) <= jittered <= plain
    # exact: the draw scales the shortening linearly
    assert abs(jittered - plain * (1 - renewal.JITTER * jitter)) <= datetime.timedelta(
        microseconds=1
    )


def test_jitter_spreads_proxies_started_together() -> None:
    draws = [i / 10 for i in range(10)]
    times = [renewal.refresh_in(NOW, NOW + 24 * H, j) for j in draws]
    assert times == sorted(times, reverse=True)
    assert len(set(times)) == len(times)
    assert times[0] == 16.8 * H
    assert times[-1] == 16.8 * H * (1 - 0.09)


@pytest.mark.parametrize("left", [15 * S, 14 * S, 11 * S])
def test_jitter_never_goes_below_the_floor(left: datetime.timedelta) -> None:
    # 70% of these is at or just above 10 s; jitter would take it under.
    assert renewal.refresh_in(NOW, NOW + left, 0.999) == renewal.MIN_REFRESH


def test_jitter_never_lengthens_a_renewal_at_expiry() -> None:
    assert renewal.refresh_in(NOW, NOW + 5 * S, 0.999) == 5 * S
    assert renewal.refresh_in(NOW, NOW - 5 * S, 0.5) == ZERO


@pytest.mark.parametrize("jitter", [0.0, 0.3, 0.999])
def test_refresh_is_never_past_expiry(jitter: float) -> None:
    for millis in [*range(-2000, 30_000, 250), 86_400_000, 200_000_000]:
        left = datetime.timedelta(milliseconds=millis)
        refresh = renewal.refresh_in(NOW, NOW + left, jitter)
        assert ZERO <= refresh <= max(left, ZERO), left
        assert refresh <= renewal.MAX_REFRESH, left
        if left > renewal.MIN_REFRESH:
            assert refresh >= renewal.MIN_REFRESH, left


@pytest.mark.parametrize("jitter", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_refresh_in_refuses_a_jitter_outside_0_1(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        renewal.refresh_in(NOW, NOW + H, jitter)


def test_naive_and_other_zones_mean_the_same_instant() -> None:
    naive_now = NOW.replace(tzinfo=None)
    paris = datetime.timezone(datetime.timedelta(hours=2))
    expected = renewal.refresh_in(NOW, NOW + H, 0.0)
    assert expected == 0.7 * H
    assert renewal.refresh_in(naive_now, NOW + H, 0.0) == expected
    assert renewal.refresh_in(NOW.astimezone(paris), (NOW + H).replace(tzinfo=None), 0.0) == (
        expected
    )
    assert renewal.retry_in(naive_now, (NOW + 10 * S).astimezone(paris), 6) == 7 * S


# -- retry_in --------------------------------------------------------------------------------


def test_retry_backs_off_exponentially_up_to_a_minute() -> None:
    far = NOW + 24 * H
    delays = [renewal.retry_in(NOW, far, n).total_seconds() for n in range(1, 11)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]


@pytest.mark.parametrize("failures", [7, 100, 10_000, 10**12])
def test_retry_cap_holds_for_any_number_of_failures(failures: int) -> None:
    assert renewal.retry_in(NOW, NOW + 24 * H, failures) == renewal.MAX_BACKOFF == 60 * S


@pytest.mark.parametrize(
    ("left", "failures", "expected"),
    [
        pytest.param(10 * S, 1, 1 * S, id="backoff shorter than 70% of left"),
        pytest.param(10 * S, 3, 4 * S, id="4 s backoff fits in 7 s"),
        pytest.param(10 * S, 4, 7 * S, id="8 s backoff cut to 70% of 10 s"),
        pytest.param(10 * S, 50, 7 * S, id="capped backoff cut too"),
        pytest.param(60 * S, 7, 42 * S, id="60 s cap cut to 42 s"),
        pytest.param(100 * S, 7, 60 * S, id="70% of 100 s is 70 s: cap applies"),
        pytest.param(2 * S, 2, 1.4 * S, id="2 s left"),
        pytest.param(
            datetime.timedelta(milliseconds=10), 1, datetime.timedelta(milliseconds=7), id="10 ms"
        ),
    ],
)
def test_retry_is_never_later_than_70_percent_of_what_is_left(
    left: datetime.timedelta, failures: int, expected: datetime.timedelta
) -> None:
    assert renewal.retry_in(NOW, NOW + left, failures) == expected


def test_retry_recomputes_from_now_as_expiry_nears() -> None:
    not_after = NOW + 100 * S
    now, waits = NOW, []
    for failures in range(1, 30):
        wait = renewal.retry_in(now, not_after, failures)
        assert now + wait < not_after
        waits.append(wait)
        now += wait
        if wait < S:
            break
    # 1, 2, 4, 8, 16, 32 s of backoff (63 s in all), then 70% of what each attempt finds left.
    assert waits[:7] == [1 * S, 2 * S, 4 * S, 8 * S, 16 * S, 32 * S, 25.9 * S]
    assert waits[-1] < S


@pytest.mark.parametrize(
    "not_after",
    [None, NOW, NOW - S, NOW - 24 * H],
    ids=["no certificate", "expires now", "expired 1 s ago", "expired a day ago"],
)
def test_without_a_valid_certificate_retry_at_least_every_10_s(
    not_after: datetime.datetime | None,
) -> None:
    delays = [renewal.retry_in(NOW, not_after, n).total_seconds() for n in range(1, 9)]
    assert delays == [1, 2, 4, 8, 10, 10, 10, 10]
    assert renewal.retry_in(NOW, not_after, 10**9) == renewal.EXPIRED_RETRY


@pytest.mark.parametrize("failures", [0, -1])
def test_retry_counts_the_failure_that_just_happened(failures: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        renewal.retry_in(NOW, NOW + H, failures)


def test_constants_are_linkerds() -> None:
    assert renewal.FRACTION == 0.7
    assert renewal.MIN_REFRESH == 10 * S
    assert renewal.MAX_REFRESH == 24 * H
    assert renewal.EXPIRED_RETRY == 10 * S
    assert renewal.JITTER == 0.1
