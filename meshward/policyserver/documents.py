"""The latest valid compiled policy of each namespace, and the watchers waiting for the next one.

The ConfigMap watch feeds :meth:`Documents.put`; each Watch call follows one namespace with
:meth:`Documents.follow`. A follower only ever gets the newest document: if several changes land
while it is still sending, it skips to the last one (a slow proxy can not make the server queue
documents for it), and it never gets the same hash twice in a row.

A document is refused, and the namespace keeps its last valid one, when it does not parse, its
hash does not match its content, or it names another namespace than the ConfigMap it came from.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterable

from meshward import errors
from meshward.policy import compiled


@dataclasses.dataclass(frozen=True)
class Entry:
    """A checked document and the exact bytes it was read from (what proxies are sent)."""

    document: compiled.PolicyDocument
    raw: bytes

    @property
    def hash(self) -> str:
        return self.document.hash


class _Slot:
    """One namespace: its entry, its followers, and an event set (then replaced) on change."""

    def __init__(self) -> None:
        self.entry: Entry | None = None
        self.followers = 0
        self.changed = asyncio.Event()

    def wake(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class Documents:
    """Create and use it inside one event loop."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._closed = False

    def get(self, namespace: str) -> Entry | None:
        slot = self._slots.get(namespace)
        return slot.entry if slot else None

    def namespaces(self) -> list[str]:
        """Namespaces that hold a document."""
        return [ns for ns, slot in self._slots.items() if slot.entry is not None]

    def put(self, namespace: str, raw: bytes) -> bool:
        """Make ``raw`` (the ConfigMap's document) ``namespace``'s current document; True when
        it differs from the one held. Raises PolicyError, keeping the held one, if it is bad."""
        document = compiled.PolicyDocument.from_json(raw)
        if document.namespace != namespace:
            raise errors.PolicyError(
                f"the document is for namespace {document.namespace!r}: a namespace's "
                "meshward-policy ConfigMap must hold its own; delete it so the operator rebuilds it"
            )
        slot = self._slots.get(namespace)
        if slot is None:
            slot = self._slots[namespace] = _Slot()
        elif slot.entry is not None and slot.entry.hash == document.hash:
            return False
        slot.entry = Entry(document=document, raw=raw)
        slot.wake()
        return True

    def remove(self, namespace: str) -> bool:
        """The ConfigMap is gone: new followers get nothing until one reappears; connected
        ones keep what they hold (a deleted ConfigMap is no reason to change anyone's access).
        True if there was a document."""
        slot = self._slots.get(namespace)
        if slot is None or slot.entry is None:
            return False
        slot.entry = None
        if slot.followers == 0:
            del self._slots[namespace]
        return True

    def retain(self, namespaces: Iterable[str]) -> list[str]:
        """After a full list: forget the documents of namespaces missing from it; returns them."""
        keep = set(namespaces)
        gone = [ns for ns in self.namespaces() if ns not in keep]
        for namespace in gone:
            self.remove(namespace)
        return gone

    async def follow(self, namespace: str) -> AsyncIterator[Entry]:
        """The current entry (if any), then each new one; ends when the store is closed."""
        slot = self._slots.get(namespace)
        if slot is None:
            slot = self._slots[namespace] = _Slot()
        slot.followers += 1
        sent: str | None = None
        try:
            while not self._closed:
                entry, changed = slot.entry, slot.changed
                if entry is not None and entry.hash != sent:
                    sent = entry.hash
                    yield entry
                else:
                    await changed.wait()
        finally:
            slot.followers -= 1
            if slot.followers == 0 and slot.entry is None and self._slots.get(namespace) is slot:
                del self._slots[namespace]

    def close(self) -> None:
        """End every follower (the server is stopping)."""
        self._closed = True
        for slot in self._slots.values():
            slot.wake()
