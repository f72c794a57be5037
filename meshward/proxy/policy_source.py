"""Where the proxy's policy comes from: here, a file holding the compiled document (the
``meshward-policy`` ConfigMap mounted into the pod, or a file written by hand for local runs).

Contract, shared with the streaming source to come: ``current()`` is the last valid policy, or
None before there was one (the inbound side denies everything then); a document that fails to
parse or to match its hash is refused and the last valid policy stays; a change on disk is seen
within ``interval`` seconds (default 0.5 s, inside the 1 s the proxy promises); ``on_update``,
when given, is called with each policy that takes effect, so the inbound side can close live
connections the new policy no longer allows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
from collections.abc import Callable

from meshward import errors
from meshward.policy import compiled, decision

logger = logging.getLogger(__name__)

INTERVAL = 0.5


class FileSource:
    def __init__(
        self,
        path: pathlib.Path,
        interval: float = INTERVAL,
        *,
        on_update: Callable[[decision.Policy], None] | None = None,
    ) -> None:
        self.path = path
        self.interval = interval
        self._on_update = on_update
        self._policy: decision.Policy | None = None
        self._document: compiled.PolicyDocument | None = None
        self._seen: tuple[int, int, int] | None = None
        self.updates = 0
        self.refused = 0

    def current(self) -> decision.Policy | None:
        return self._policy

    @property
    def document(self) -> compiled.PolicyDocument | None:
        return self._document

    def poll(self) -> bool:
        """Load the file if it changed; True when a new policy took effect."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # not there (yet): keep what we have
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            document = compiled.PolicyDocument.from_json(self.path.read_bytes())
        except (OSError, errors.PolicyError) as exc:
            self.refused += 1
            logger.error("policy in %s refused, keeping the last valid one: %s", self.path, exc)
            return False
        if self._document is not None and document.hash == self._document.hash:
            return False
        self._document = document
        self._policy = decision.Policy(document)
        self.updates += 1
        logger.info("policy %s from %s in effect", document.hash[:19], self.path)
        if self._on_update is not None:
            self._on_update(self._policy)
        return True

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            self.poll()
            await asyncio.sleep(self.interval)
