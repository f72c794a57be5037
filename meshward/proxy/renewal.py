"""When the proxy renews its certificate: pure timing, following Linkerd's proxy.

After a certificate is issued, the next renewal is due in :func:`refresh_in`:

* 70% (:data:`FRACTION`) of the validity that remains, so the certificate is replaced with 30%
  of its life still to go. A proxy that restarts, or an identity service that is down for a
  while, then has hours (for a 24-hour certificate, 7.2 h) to recover before anything lapses.
* clamped to [:data:`MIN_REFRESH`, :data:`MAX_REFRESH`]: at least 10 s, so a short-lived
  certificate does not turn renewal into a busy loop; at most 24 h, so a long-lived one is still
  renewed (and its trust re-checked) every day.
* shortened by up to :data:`JITTER` (10%) of that, but not below :data:`MIN_REFRESH`, so that
  proxies started together (a rollout, a node reboot) do not all renew at the same instant and
  hammer the identity service in lock-step. The caller passes the random draw (``jitter`` in
  [0, 1), e.g. ``random.random()``), which keeps this module deterministic.
* never past expiry: when the 10-second floor would land at or after ``not_after``, renewal is
  due in the time left (0 once expired). Linkerd keeps the floor there; we would rather try once
  more while the certificate is still good.

After a failed renewal the next attempt is due in :func:`retry_in`: exponential backoff from
1 s (1, 2, 4, 8 ... s, capped at :data:`MAX_BACKOFF`, 60 s) so an identity service that is
struggling is not piled on, but never later than 70% of what remains of the current certificate,
recomputed from ``now`` at each attempt as Linkerd recomputes its refresh, so retries speed up as
expiry nears instead of sleeping past it. Without a usable certificate (none yet, or expired) the
proxy can not serve mTLS at all, so it retries at least every :data:`EXPIRED_RETRY` (10 s).

Times are aware datetimes; naive ones are taken to be UTC, as in :mod:`meshward.identity.pki`.
"""

from __future__ import annotations

import datetime

FRACTION = 0.7
"""Renew when this fraction of the remaining validity has passed."""
MIN_REFRESH = datetime.timedelta(seconds=10)
MAX_REFRESH = datetime.timedelta(hours=24)
EXPIRED_RETRY = datetime.timedelta(seconds=10)
"""The longest wait between attempts while the proxy has no valid certificate."""
JITTER = 0.1
"""The largest fraction by which a scheduled renewal is brought forward."""
FIRST_BACKOFF = datetime.timedelta(seconds=1)
MAX_BACKOFF = datetime.timedelta(seconds=60)

_ZERO = datetime.timedelta(0)
# 2**6 s already exceeds MAX_BACKOFF; bounding the exponent keeps huge failure counts cheap.
_MAX_DOUBLINGS = 6


def refresh_in(
    now: datetime.datetime, not_after: datetime.datetime, jitter: float
) -> datetime.timedelta:
    """How long after ``now`` to renew a certificate that expires at ``not_after``.

    ``jitter`` is a draw from [0, 1) (``ValueError`` otherwise); 0 gives the unjittered time.
    """
    if not 0.0 <= jitter < 1.0:  # also refuses NaN
        raise ValueError(f"jitter must be in [0, 1), e.g. random.random(), got {jitter!r}")
    left = _utc(not_after) - _utc(now)
    refresh = min(max(left * FRACTION, MIN_REFRESH), MAX_REFRESH)
    if refresh >= left:
        # Only the MIN_REFRESH floor can reach expiry (70% of what is left never does).
        return max(left, _ZERO)
    return max(refresh * (1.0 - JITTER * jitter), MIN_REFRESH)


def retry_in(
    now: datetime.datetime, not_after: datetime.datetime | None, failures: int
) -> datetime.timedelta:
    """How long after ``now`` to try again after ``failures`` consecutive failed renewals.

    ``failures`` counts the attempt that just failed, so it is at least 1 (``ValueError``
    otherwise); ``not_after`` is the expiry of the certificate the proxy holds, or None if it
    has none yet.
    """
    if failures < 1:
        raise ValueError(
            f"failures counts the attempt that just failed: at least 1, got {failures}"
        )
    backoff = min(FIRST_BACKOFF * (1 << min(failures - 1, _MAX_DOUBLINGS)), MAX_BACKOFF)
    if not_after is None:
        return min(backoff, EXPIRED_RETRY)
    left = _utc(not_after) - _utc(now)
    if left <= _ZERO:
        return min(backoff, EXPIRED_RETRY)
    return min(backoff, left * FRACTION)


def _utc(at: datetime.datetime) -> datetime.datetime:
    """``at`` as an aware UTC datetime; naive values are taken to be UTC already."""
    if at.tzinfo is None:
        return at.replace(tzinfo=datetime.UTC)
    return at.astimezone(datetime.UTC)
