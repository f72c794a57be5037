"""The demo's applications: an emojivoto-like trio, and the one-shot clients that call it.

    web      HTTP/1: ``GET /`` answers itself; ``GET /api/list`` asks emoji, ``GET /api/vote``
             asks voting (gRPC, through web's own proxy) and reports that call's outcome
    emoji    gRPC ``emojivoto.v1.EmojiService/ListAll``
    voting   gRPC ``emojivoto.v1.VotingService/Vote``
    get      one HTTP GET (the vote bot, the outsider, a plaintext caller), printed as JSON
    grpc     one gRPC call (the outsider), printed as JSON

Run as ``python -m meshward.demo._apps ROLE ...``. The gRPC messages are JSON bytes with grpcio's
generic handlers, so the demo needs no generated code. Every call opens its own connection, so
each one is decided by the serving proxy and counted in its metrics on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

import grpc

EMOJI = "emojivoto.v1.EmojiService"
VOTING = "emojivoto.v1.VotingService"
LIST_ALL = f"/{EMOJI}/ListAll"
VOTE = f"/{VOTING}/Vote"
PROXY_ERROR = "meshward-proxy-error"
"""The header a meshward proxy puts on the 403 it answers a meshed client with."""
TIMEOUT = 10.0
MAX_RESPONSE = 1 << 20

_EMOJI = (":doughnut:", ":joy:", ":sunglasses:", ":ghost:", ":unicorn:")


# -- clients ---------------------------------------------------------------------------------


async def http_get(url: str) -> dict[str, Any]:
    """GET ``url`` on a new connection: ``{"status", "proxy_error", "body"}``, or ``{"error"}``
    naming what went wrong (a refused or closed connection is how a proxy refuses TCP)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
    except (OSError, TimeoutError) as exc:
        return {"error": f"connect: {type(exc).__name__}"}
    try:
        request = f"GET {target or '/'} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode("ascii"))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(MAX_RESPONSE), TIMEOUT)
        while chunk := await asyncio.wait_for(reader.read(MAX_RESPONSE), TIMEOUT):
            raw += chunk
    except (OSError, TimeoutError) as exc:
        return {"error": type(exc).__name__}
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not raw:
        return {"error": "connection closed without an answer"}
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        return {"error": f"not an HTTP answer: {lines[0][:60]!r}"}
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return {
        "status": status,
        "proxy_error": headers.get(PROXY_ERROR),
        "body": body.decode("utf-8", "replace"),
    }


async def grpc_call(address: str, method: str, message: dict[str, Any]) -> dict[str, Any]:
    """Call ``method`` at ``address`` on a channel of its own: ``{"code", "detail", "reply"}``."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        try:
            reply = await call(json.dumps(message).encode(), timeout=TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            return {"code": exc.code().name, "detail": exc.details() or ""}
    return {"code": "OK", "detail": "", "reply": json.loads(reply)}


# -- servers ---------------------------------------------------------------------------------


async def _serve_grpc(address: str, service: str, methods: dict[str, Any]) -> None:
    server = grpc.aio.server()
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(handler) for name, handler in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    if not server.add_insecure_port(address):
        raise OSError(f"can not listen on {address}")
    await server.start()
    print(f"{service} serving on {address}", flush=True)
    try:
        await _until_stopped()
    finally:
        await server.stop(1)


async def emoji(address: str) -> None:
    async def list_all(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return json.dumps({"emoji": list(_EMOJI)}).encode()

    await _serve_grpc(address, EMOJI, {"ListAll": list_all})


async def voting(address: str) -> None:
    votes: dict[str, int] = {}

    async def vote(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        choice = str(json.loads(request or b"{}").get("choice", ""))
        if choice not in _EMOJI:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no such emoji: {choice}")
        votes[choice] = votes.get(choice, 0) + 1
        return json.dumps({"choice": choice, "votes": votes[choice]}).encode()

    await _serve_grpc(address, VOTING, {"Vote": vote})


async def web(host: str, port: int, emoji_address: str, voting_address: str) -> None:
    """The front end: answers ``/`` itself, and reports its own gRPC calls on ``/api/*``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            target = head.split(b" ", 2)[1].decode("ascii", "replace")
            url = urllib.parse.urlsplit(target)
            if url.path == "/api/list":
                status, body = 200, await grpc_call(emoji_address, LIST_ALL, {})
            elif url.path == "/api/vote":
                choice = urllib.parse.parse_qs(url.query).get("choice", [_EMOJI[0]])[0]
                status, body = 200, await grpc_call(voting_address, VOTE, {"choice": choice})
            elif url.path == "/":
                status, body = 200, {"app": "web", "emoji": list(_EMOJI)}
            else:
                status, body = 404, {"error": f"no page {url.path}"}
            data = json.dumps(body).encode()
            writer.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s"
                % (status, b"OK" if status == 200 else b"Not Found", len(data), data)
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, host, port)
    print(f"web serving on {host}:{port}", flush=True)
    try:
        await _until_stopped()
    finally:
        server.close()
        await server.wait_closed()


async def _until_stopped() -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshward.demo._apps")
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("emoji", "voting"):
        sub.add_parser(role).add_argument("--listen", required=True, help="host:port")
    w = sub.add_parser("web")
    w.add_argument("--host", required=True)
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--emoji", required=True, help="host:port web dials to reach emoji")
    w.add_argument("--voting", required=True, help="host:port web dials to reach voting")
    sub.add_parser("get").add_argument("url")
    g = sub.add_parser("grpc")
    g.add_argument("address")
    g.add_argument("method")
    args = parser.parse_args(argv)
    if args.role == "get":
        print(json.dumps(asyncio.run(http_get(args.url))))
    elif args.role == "grpc":
        print(json.dumps(asyncio.run(grpc_call(args.address, args.method, {}))))
    elif args.role == "web":
        asyncio.run(web(args.host, args.port, args.emoji, args.voting))
    else:
        asyncio.run(emoji(args.listen) if args.role == "emoji" else voting(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
