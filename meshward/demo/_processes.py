"""Every process the demo starts, each in a process group of its own, so that all of them (and
whatever they start: ``ip netns exec`` and ``setpriv`` exec, but a child could fork) stop on every
path: success, mismatch, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import signal
from collections.abc import Mapping, Sequence

STOP_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Processes:
    """Starts processes with the working directory ``cwd`` (the demo's state directory, which
    is how a leftover would be found) and stops them all in :meth:`close`."""

    def __init__(self, cwd: pathlib.Path) -> None:
        self.cwd = cwd
        self._running: dict[str, asyncio.subprocess.Process] = {}
        self._oneshots: set[asyncio.subprocess.Process] = set()

    async def start(
        self, name: str, argv: Sequence[str], log: pathlib.Path, env: Mapping[str, str]
    ) -> asyncio.subprocess.Process:
        """Start ``argv`` in the background, its output appended to ``log``."""
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env),
                cwd=self.cwd,
                start_new_session=True,
            )
        self._running[name] = proc
        return proc

    def exited(self) -> dict[str, int]:
        """The background processes that have stopped, and their exit status."""
        return {
            name: proc.returncode
            for name, proc in self._running.items()
            if proc.returncode is not None
        }

    async def run(
        self, argv: Sequence[str], env: Mapping[str, str], timeout: float = 60.0
    ) -> Result:
        """Run ``argv`` to completion; killed (with its group) on timeout or cancellation."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=self.cwd,
            start_new_session=True,
        )
        self._oneshots.add(proc)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:
            await _stop(proc, signal.SIGKILL)
            raise
        finally:
            self._oneshots.discard(proc)
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    async def close(self) -> None:
        """Stop everything, latest first: SIGTERM to each group, SIGKILL to what outlives it."""
        procs = [*self._oneshots, *reversed(self._running.values())]
        self._oneshots.clear()
        self._running.clear()
        await asyncio.gather(*(_stop(proc, signal.SIGTERM) for proc in procs))


async def _stop(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    # The leader is gone; anything it forked into its group goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
