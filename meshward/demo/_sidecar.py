"""The local-mode proxy of a demo workload: ``meshward proxy``, with inbound ports decided as the
port the application has in its pod.

In a pod, web, emoji and voting each listen on 8080, and the namespace-jail sample's Servers say
so. On one host in local mode they can not all bind 127.0.0.1:8080, so each application gets a
free port, and its proxy must still decide connections as ones to 8080. ``meshward proxy``'s
``MESHWARD_PROXY_LOCAL_INBOUND`` entries (``LISTEN_PORT=APP_PORT``) decide as the application's
actual port; the proxy's inbound side can decide as another port
(:meth:`meshward.proxy.inbound.Inbound.serve`'s ``policy_port``), and this runner uses that.

Everything else is the proxy as ``meshward proxy`` runs it (:func:`meshward.proxy.run.start`):
identity, policy stream, outbound entries, admin server, metrics. The settings are the usual
``MESHWARD_PROXY_*`` variables, plus :data:`POD_PORT`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys

from meshward import errors
from meshward.proxy import run, settings

POD_PORT = "MESHWARD_DEMO_POD_PORT"
"""The port the local inbound entries are decided as (the application's port in its pod)."""

logger = logging.getLogger("meshward.demo.sidecar")


@dataclasses.dataclass(frozen=True)
class _LocalSettings(settings.ProxySettings):
    """The proxy's settings minus the inbound entries this runner binds itself: still local
    mode, never transparent."""

    @property
    def transparent(self) -> bool:
        return False


async def _run(config: settings.ProxySettings, pod_port: int) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields["local_inbound"] = ()
    running = await run.start(_LocalSettings(**fields))
    bound = []
    try:
        for entry in config.local_inbound:
            try:
                listening = await running.inbound.serve(
                    entry.listen.host, entry.listen.port, entry.app_port, policy_port=pod_port
                )
            except OSError as exc:
                raise errors.ConfigError(
                    f"can not listen for inbound {entry.listen}: {exc.strerror}"
                ) from exc
            bound.append(listening)
            logger.info(
                "inbound %s -> application port %d, decided as port %d",
                entry.listen,
                entry.app_port,
                pod_port,
            )
        await stopping.wait()
    finally:
        for listening in bound:
            listening.close()
            await listening.wait_closed()
        await running.stop()


def main() -> int:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("meshward").setLevel(logging.INFO)
    try:
        config = settings.from_env()
        raw = os.environ.get(POD_PORT, "")
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise errors.ConfigError(f"{POD_PORT}={raw!r}: set it to a port number, e.g. 8080")
        asyncio.run(_run(config, int(raw)))
    except errors.MeshwardError as exc:
        print(f"meshward demo sidecar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
