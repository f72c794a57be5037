"""Following one kind of Kubernetes object across all namespaces: list, then watch.

:class:`Follower` keeps a caller's picture of the cluster current and guarantees that:

- it starts from a full list, taken page by page, and watches from that list's
  resourceVersion;
- an ordinary end of a watch (the API server's timeout, a bookmark-only stretch) is resumed
  from the last version seen, so nothing is missed or applied twice;
- an expired version (410 Gone) is answered by listing everything again, since the events in
  between are lost;
- any failure (unreachable API server, a refused request, a broken-off stream, a response that
  is not JSON) is counted, logged once at warning level and then at debug level while it
  lasts, and followed by a fresh list after a capped, jittered exponential backoff. It never
  ends the follower: the caller keeps serving what it holds through an outage.

The caller supplies what to list (a client list method, an optional field selector, the page
size), what a page of the list and a watch event do to its picture, and what it holds (for the
log while the API server is away); optional hooks mark the start and end of a list and the
opening and closing of a watch, for bookkeeping such as staleness.

Requests and events are read as plain JSON, not through the client's models: an object may be
close to etcd's 1.5 MiB, more than the client's line-based watch reader accepts, and the
models would only be turned back into dicts.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import prometheus_client

from meshward import errors

WATCH_TIMEOUT = 300
"""Seconds the API server keeps one watch open; it is then resumed where it left off."""
CONNECT_TIMEOUT = 10.0
LIST_TIMEOUT = 60.0
MAX_EVENT_BYTES = 8 * 1024 * 1024
"""A 1 MiB ConfigMap (or any object etcd holds), JSON-escaped inside a watch event, with room
to spare."""
BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0


class Follower(abc.ABC):
    """Lists and watches the objects ``call`` returns, handing them to the subclass's hooks.

    ``call`` is a kubernetes_asyncio list-for-all-namespaces method (a watch with
    ``watch=True``); ``title`` names the objects in messages ("ConfigMaps"), ``rbac`` the
    resource a missing grant is for, ``subject`` what is followed as logs name it ("the
    meshward-policy ConfigMaps"). ``errors_counter`` counts failures; ``log`` is the caller's
    logger, so that its messages keep their origin."""

    def __init__(
        self,
        *,
        call: Callable[..., Awaitable[Any]],
        host: str,
        title: str,
        rbac: str,
        subject: str,
        page: int,
        errors_counter: prometheus_client.Counter,
        log: logging.Logger,
        field_selector: str | None = None,
    ) -> None:
        self._call = call
        self._host = host
        self._title = title
        self._rbac = rbac
        self._subject = subject
        self._page = page
        self._errors = errors_counter
        self._log = log
        self._selector = {"field_selector": field_selector} if field_selector else {}

    @abc.abstractmethod
    def take_page(self, items: list[Mapping[str, Any]]) -> None:
        """One page of a full list (its objects that are JSON objects)."""

    @abc.abstractmethod
    def commit_list(self) -> None:
        """The last page has been taken: the pages together are now the whole picture."""

    @abc.abstractmethod
    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        """One ADDED, MODIFIED or DELETED watch event."""

    @abc.abstractmethod
    def holding(self) -> str:
        """What is still served through a failure, to complete "can not follow ... (why); "."""

    def begin_list(self) -> None:  # noqa: B027 - optional hook, nothing by default
        """A full list starts."""

    def end_list(self) -> None:  # noqa: B027 - optional hook, nothing by default
        """A full list is over, committed or not (a failure, a cancellation)."""

    def watch_opened(self) -> None:  # noqa: B027 - optional hook, nothing by default
        """A watch request has been answered; events may follow."""

    def watch_closed(self) -> None:  # noqa: B027 - optional hook, nothing by default
        """The watch opened last has ended, however it ended."""

    async def run(self) -> None:
        """List and watch until cancelled."""
        failures = 0
        while True:
            try:
                version = await self._list()
                if failures:
                    self._log.info("reading %s again after %d failures", self._subject, failures)
                failures = 0
                await self._watch(version)
            except errors.ClusterUnreachable as exc:
                failures += 1
                self._errors.inc()
                delay = backoff(failures)
                log = self._log.warning if failures == 1 else self._log.debug
                log(
                    "can not follow %s (%s); %s, retrying in %.1f s",
                    self._subject,
                    exc,
                    self.holding(),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _list(self) -> str:
        """A full (paged) list through the hooks; the list's resourceVersion."""
        self.begin_list()
        token: str | None = None
        try:
            while True:
                page = await self._request(
                    "list",
                    **self._selector,
                    limit=self._page,
                    _continue=token,
                    _request_timeout=(CONNECT_TIMEOUT, LIST_TIMEOUT),
                )
                body = parse_json(await read_all(page, self._host), f"a list of {self._title}")
                items = body.get("items")
                self.take_page(
                    [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []
                )
                meta = _mapping(body.get("metadata"))
                token = meta.get("continue") or None
                if token is None:
                    self.commit_list()
                    return str(meta.get("resourceVersion") or "")
        finally:
            self.end_list()

    async def _watch(self, version: str) -> None:
        """Apply events until the version expires (410 Gone); resume after ordinary ends."""
        while True:
            response = await self._request(
                "watch",
                **self._selector,
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=version,
                timeout_seconds=WATCH_TIMEOUT,
                _request_timeout=(CONNECT_TIMEOUT, WATCH_TIMEOUT + 60),
            )
            self.watch_opened()
            try:
                async for event in events(response, self._host):
                    kind = event.get("type")
                    obj = _mapping(event.get("object"))
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            self._log.debug(
                                "%s watch version %s expired; listing again", self._title, version
                            )
                            return
                        raise errors.ClusterUnreachable(
                            f"the watch of {self._title} at {self._host} failed: "
                            f"HTTP {obj.get('code')} {obj.get('message')}"
                        )
                    version = str(_mapping(obj.get("metadata")).get("resourceVersion") or version)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.apply(str(kind), obj)
            finally:
                self.watch_closed()
                response.release()

    async def _request(self, what: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await request(self._call, self._host, what, self._title, self._rbac, **kwargs)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: capped, exponential, and
    jittered so that replicas do not retry in step."""
    return min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** (failures - 1)) * (0.5 + random.random() / 2)


async def request(
    call: Callable[..., Awaitable[Any]],
    host: str,
    what: str,
    kind: str,
    resource: str,
    **kwargs: Any,
) -> aiohttp.ClientResponse:
    """The raw response of ``call``, a kubernetes_asyncio list method (a watch with
    ``watch=True``) of ``kind`` objects (``resource`` as RBAC names it), to read as JSON.

    Raises ClusterUnreachable, naming the missing grant on HTTP 403, for any failure."""
    try:
        response: aiohttp.ClientResponse = await call(_preload_content=False, **kwargs)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise errors.ClusterUnreachable(
            f"the API server at {host} did not answer the {what}: {type(exc).__name__} {exc}"
        ) from exc
    if not 200 <= response.status <= 299:
        try:
            text = await response.text()
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            text = ""
        finally:
            response.release()
        message = status_message(text) or str(response.reason)
        hint = (
            f": grant list and watch on {resource} cluster-wide" if response.status == 403 else ""
        )
        raise errors.ClusterUnreachable(
            f"the {what} of {kind} failed at {host}: HTTP {response.status} {message}{hint}"
        )
    return response


async def read_all(response: aiohttp.ClientResponse, host: str) -> bytes:
    """A whole list response, released afterwards."""
    try:
        return await response.read()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise errors.ClusterUnreachable(
            f"the API server at {host} broke off a list: {type(exc).__name__} {exc}"
        ) from exc
    finally:
        response.release()


async def events(response: aiohttp.ClientResponse, host: str) -> AsyncIterator[dict[str, Any]]:
    """The watch's newline-delimited JSON events, of any size up to MAX_EVENT_BYTES."""
    buffer = bytearray()
    try:
        async for chunk in response.content.iter_any():
            scanned = len(buffer)
            buffer += chunk
            while (end := buffer.find(b"\n", scanned)) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                scanned = 0
                if line.strip():
                    yield parse_json(line, "a watch event")
            if len(buffer) > MAX_EVENT_BYTES:
                raise errors.ClusterUnreachable(
                    f"a watch event from {host} is over {MAX_EVENT_BYTES} bytes; no Kubernetes "
                    "object is that large (etcd stores at most 1.5 MiB)"
                )
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise errors.ClusterUnreachable(
            f"the watch at {host} broke off: {type(exc).__name__} {exc}"
        ) from exc


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """``data`` as the JSON object the API server must have sent; ClusterUnreachable if not."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise errors.ClusterUnreachable(f"the API server sent {what} that is not JSON") from exc
    if not isinstance(value, dict):
        raise errors.ClusterUnreachable(f"the API server sent {what} that is not a JSON object")
    return value


def status_message(text: str) -> str:
    """The message of a Kubernetes Status in ``text``; empty when there is none."""
    try:
        status = json.loads(text)
    except ValueError:
        return ""
    return str(status.get("message") or "") if isinstance(status, dict) else ""
