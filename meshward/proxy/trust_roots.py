"""The mounted trust roots, followed while the proxy runs: a new trust bundle takes effect for new
handshakes without a restart, and a ``renew-leaves-before`` request reaches the renewal loop.

The ``meshward-identity-trust-roots`` ConfigMap is mounted as a volume; the kubelet rewrites it by
writing a new directory and swapping the ``..data`` symlink, so the file's path never changes
while what it resolves to does. Every :data:`POLL_INTERVAL` seconds this module stats the bundle
file (following the links) and, only when that changed, reads it and compares a hash of the
content: a swap that leaves the bundle as it was (only ``renew-leaves-before`` changed, say) is
not a reload. Polling is cheap for two small files and sees every swap, which inotify on a
symlinked mount does not reliably do. Nothing here runs per connection.

A changed bundle must pass :func:`meshward.trustbundle.load`; one that does not is refused with
an error naming the file and the reason, counted once (``result="invalid"``), and the bundle in
force stays. A ``renew-leaves-before`` that does not parse is logged and ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import logging
import os
import pathlib
from collections.abc import Callable

from meshward import errors, trustbundle
from meshward.proxy import metrics as proxy_metrics

logger = logging.getLogger(__name__)

POLL_INTERVAL = 2.0


@dataclasses.dataclass(frozen=True)
class _Seen:
    """What a file looked like at the last poll: its stat, and a hash of what it held."""

    stat: tuple[int, int, int, int] | None
    """(device, inode, size, mtime in ns) of the file the path resolves to; None: missing."""
    digest: bytes | None
    """sha256 of the content; None: missing or unreadable."""


_UNSEEN = _Seen(stat=None, digest=None)


class TrustRoots:
    """Holds the trust bundle in force and follows the file it came from.

    ``on_bundle`` is called with each new valid bundle, before it is reported as in force; if
    it raises (OSError, ValueError or a MeshwardError), the bundle is refused as invalid and
    the one in force stays. ``on_renew_before`` is called with each new
    ``renew-leaves-before`` time (also the one present at start). Without a file (anchors from
    the environment) the bundle is fixed and :meth:`run` returns at once.
    """

    def __init__(
        self,
        bundle: trustbundle.Bundle,
        file: pathlib.Path | None,
        *,
        on_bundle: Callable[[trustbundle.Bundle], None],
        on_renew_before: Callable[[datetime.datetime], None],
        metrics: proxy_metrics.Metrics,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.current = bundle
        self.file = file
        self.renew_before: datetime.datetime | None = None
        """The last valid ``renew-leaves-before`` read, if any."""
        self._on_bundle = on_bundle
        self._on_renew_before = on_renew_before
        self._metrics = metrics
        self._interval = interval
        # The first poll reads both files: compared by content with what settings loaded, the
        # bundle reloads only if it changed since.
        self._bundle_seen = _Seen(stat=None, digest=hashlib.sha256(bundle.pem).digest())
        self._renew_seen = _UNSEEN
        metrics.trust_bundle(bundle.fingerprint)

    @property
    def renew_file(self) -> pathlib.Path | None:
        return None if self.file is None else self.file.parent / trustbundle.RENEW_BEFORE_KEY

    async def run(self) -> None:
        """Poll until cancelled (returns at once when there is no file to follow)."""
        if self.file is None:
            return
        while True:
            self.poll()
            await asyncio.sleep(self._interval)

    def poll(self) -> None:
        """Look at both files once and act on what changed."""
        if self.file is None:
            return
        self._poll_bundle(self.file)
        renew_file = self.renew_file
        assert renew_file is not None
        self._poll_renew_before(renew_file)

    def _poll_bundle(self, file: pathlib.Path) -> None:
        seen, content, problem = _look(file, self._bundle_seen)
        if seen == self._bundle_seen:
            return
        changed = seen.digest != self._bundle_seen.digest
        self._bundle_seen = seen
        if not changed:
            return
        if content is None:
            self._refuse(file, problem or "it is missing")
            return
        try:
            bundle = trustbundle.load(content, f"trust bundle {file}")
        except errors.InvalidTrustBundle as exc:
            self._refuse(file, str(exc))
            return
        if bundle.fingerprint == self.current.fingerprint:
            return  # the same anchors, written differently: nothing to reload
        try:
            self._on_bundle(bundle)
        except (OSError, ValueError, errors.MeshwardError) as exc:
            # Reported only once in force: the operator removes an old anchor when every
            # proxy reports the new bundle, so a report must never run ahead of the TLS state.
            self._refuse(file, f"it could not be put into effect ({exc})")
            return
        previous, self.current = self.current, bundle
        self._metrics.trust_bundle(bundle.fingerprint)
        self._metrics.bundle_reloaded("ok")
        logger.info(
            "trust bundle %s reloaded: %s (%d anchor(s): %s), was %s",
            file,
            bundle.fingerprint,
            len(bundle.anchors),
            "; ".join(f"{a.subject} until {a.not_after.isoformat()}" for a in bundle.describe()),
            previous.fingerprint,
        )

    def _refuse(self, file: pathlib.Path, why: str) -> None:
        self._metrics.bundle_reloaded("invalid")
        logger.error("trust bundle %s refused, keeping %s: %s", file, self.current.fingerprint, why)

    def _poll_renew_before(self, file: pathlib.Path) -> None:
        seen, content, problem = _look(file, self._renew_seen)
        if seen == self._renew_seen or seen.digest == self._renew_seen.digest:
            self._renew_seen = seen
            return
        self._renew_seen = seen
        if content is None:
            if problem is not None:
                logger.warning("%s can not be read, ignored: %s", file, problem)
            self.renew_before = None
            return
        try:
            at = trustbundle.parse_renew_before(content.decode("utf-8", "replace"))
        except errors.InvalidTrustBundle as exc:
            logger.warning("%s ignored: %s", file, exc)
            return
        self.renew_before = at
        logger.info("%s asks for leaves issued before %s to be renewed", file, at.isoformat())
        try:
            self._on_renew_before(at)
        except Exception:
            logger.exception("acting on %s failed", file)


def _look(file: pathlib.Path, last: _Seen) -> tuple[_Seen, bytes | None, str | None]:
    """The file's state now, its content when it was read, and why it could not be.

    The content is read only when the stat differs from ``last``; otherwise ``last`` is
    returned as is and the content is None.
    """
    try:
        st = os.stat(file)
    except FileNotFoundError:
        return _UNSEEN, None, None
    except OSError as exc:
        return _UNSEEN, None, f"it can not be read ({exc.strerror})"
    stat = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if stat == last.stat:
        return last, None, None
    try:
        content = file.read_bytes()
    except FileNotFoundError:
        return _UNSEEN, None, None
    except OSError as exc:
        return _Seen(stat=stat, digest=None), None, f"it can not be read ({exc.strerror})"
    return _Seen(stat=stat, digest=hashlib.sha256(content).digest()), content, None
