"""``meshward demo``: the namespace-jail lockdown, from an empty machine to a verdict table.

Steps, each printed with its time: the control plane, the CRDs, the operator, the trust anchor
and identity service, the policy server, namespaces ``emojivoto`` and ``outsider``, the meshed
workloads; then every call once (everything allowed), the sample applied with kubectl, the
proxies observed holding the new policy, every call again. Exit status 0 only when every call
did what the table expects; 1 on a mismatch or an error; 128+N on signal N. Whatever happens,
every process, network namespace and file the demo made is gone when it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import parser

from meshward import devcluster, errors
from meshward.demo import _apps, _local, _mesh, _processes, _table, _transparent, _workloads
from meshward.policy import compiled

T = TypeVar("T")
Verdict = _table.Verdict

SAMPLE = "namespace-jail-server-authorization.yaml"
SERVERS = {"web": "web-http", "emoji": "emoji-grpc", "voting": "voting-grpc"}
"""The sample's Server for each serving workload."""
_AUTHZ = (
    ("inbound_tcp_authz_allow_total", "allow"),
    ("inbound_tcp_authz_deny_total", "deny"),
    ("inbound_http_authz_allow_total", "allow"),
    ("inbound_http_authz_deny_total", "deny"),
)


def sample_path() -> pathlib.Path:
    """The sample, from the checkout meshward runs from (samples/ is not in the wheel)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "samples" / SAMPLE
    if not path.is_file():
        raise errors.ControlPlaneError(
            "find the sample",
            f"{path} does not exist: run the demo from a meshward checkout (make demo)",
        )
    return path


class Clock:
    """Prints each step with the time since the start and how long the step took."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {text}", flush=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        began = time.monotonic()
        yield
        self.say(f"{text} ({time.monotonic() - began:.1f}s)")


@dataclasses.dataclass(frozen=True)
class Call:
    """One row of the table: ``source`` calls ``target``; after the lockdown ``after``."""

    name: str
    after: Verdict


CALLS = (
    Call("vote-bot -> web", Verdict.ALLOW),
    Call("web -> emoji", Verdict.ALLOW),
    Call("web -> voting", Verdict.ALLOW),
    Call("outsider -> web", Verdict.DENY),
    Call("outsider -> emoji", Verdict.DENY),
    Call("plaintext -> web", Verdict.DENY),
)


class Demo:
    """One run: the mesh, the workloads of the chosen mode, the calls between them."""

    def __init__(self, state: pathlib.Path, mode: str, clock: Clock) -> None:
        self.state = state
        self.mode = mode
        self.clock = clock
        self.processes = _processes.Processes(state)
        self.mesh = _mesh.Mesh(state, self.processes)
        self.network: _transparent.Network | None = None
        self.workloads: dict[str, _workloads.Workload] = {}
        self.plaintext_route = ""

    async def set_up(self) -> None:
        say = self.clock.step
        host = "127.0.0.1"
        if self.mode == "transparent":
            with say("pod network: a bridge and a network namespace per pod; iptables at hand"):
                self.network = await _transparent.Network.create(self.processes)
            host = self.network.gateway
        with say("control plane up (etcd, kube-apiserver, kube-controller-manager)"):
            await self.mesh.control_plane()
        with say("CRDs applied and established"):
            await self.mesh.crds()
        with say("trust anchor and issuer made (meshward identity init); identity service up"):
            await self.mesh.identity(host)
        with say("policy server up"):
            await self.mesh.policy_server(host)
        operator_env = (
            _transparent.operator_env(self.mesh.identity_addr, self.mesh.policy_addr)
            if self.network is not None
            else _local.operator_env()
        )
        with say("operator running (policy compiler, validating and injecting webhooks)"):
            await self.mesh.operator(operator_env)
        with say("namespaces emojivoto and outsider, their ServiceAccounts and Pods"):
            await self._namespaces()
        with say("workloads running: web, emoji, voting, vote-bot, outsider (app + proxy each)"):
            await self._start_workloads()
        with say("every proxy certified and holding its namespace's policy"):
            await self._until_policy(self._everyone_placed, "the first policy documents")

    async def _namespaces(self) -> None:
        inject = self.mode == "transparent"
        annotations = {"meshward.io/inject": "enabled"} if inject else {}
        objects: list[dict[str, Any]] = [
            _mesh.namespace(ns, annotations) for ns in (_workloads.EMOJIVOTO, _workloads.OUTSIDER)
        ]
        objects += [
            _mesh.service_account(spec.namespace, spec.name) for spec in _workloads.SPECS.values()
        ]
        objects += [
            _mesh.trust_roots(ns, self.mesh.anchors)
            for ns in (_workloads.EMOJIVOTO, _workloads.OUTSIDER)
        ]
        await self.mesh.apply(objects)
        if self.network is not None:
            await _transparent.until_injecting(self.mesh, _workloads.EMOJIVOTO)
            await self.mesh.apply(_transparent.pods(self.network))
        else:
            await self.mesh.apply(_local.pods())

    async def _start_workloads(self) -> None:
        if self.network is not None:
            self.workloads, self.plaintext_route = await _transparent.start(
                self.mesh, self.processes, self.network
            )
        else:
            self.workloads, self.plaintext_route = await _local.start(self.mesh, self.processes)
        for workload in self.workloads.values():
            await _mesh.wait_for(
                f"the proxy of {workload.spec.name}",
                lambda w=workload: _mesh.http_status(f"http://{w.admin}/ready"),  # type: ignore[misc]
                30,
                workload.proxy_log,
            )
        for name in _workloads.SERVING:
            log = self.mesh.logs / f"{name}-app.log"
            await _mesh.wait_for(
                f"the {name} application",
                lambda log=log: _serving(log),  # type: ignore[misc]
                30,
                log,
            )

    # -- policy ------------------------------------------------------------------------------

    @staticmethod
    def _everyone_placed(doc: compiled.PolicyDocument) -> bool:
        return all(
            spec.pod in doc.pods
            for spec in _workloads.SPECS.values()
            if spec.namespace == doc.namespace
        )

    @staticmethod
    def _locked(doc: compiled.PolicyDocument) -> bool:
        if doc.namespace != _workloads.EMOJIVOTO:
            return True
        rules = {server.name: len(server.rules) for server in doc.servers}
        return all(rules.get(server) == 1 for server in SERVERS.values())

    async def _until_policy(
        self, ready: Callable[[compiled.PolicyDocument], bool], what: str
    ) -> None:
        """Until the operator's document of each namespace passes ``ready`` and every proxy
        says that very document (by its hash) is in effect: observed, not waited out."""

        async def held() -> bool:
            for ns in (_workloads.EMOJIVOTO, _workloads.OUTSIDER):
                doc = await self.mesh.document(ns)
                if doc is None or not ready(doc):
                    return False
                for workload in self.workloads.values():
                    if workload.spec.namespace == ns and not _holds(workload, doc):
                        return False
            return True

        await _mesh.wait_for(what, held, 30, self.mesh.logs / "operator.log")

    async def lock_down(self) -> None:
        with self.clock.step(f"kubectl apply -f samples/{SAMPLE}"):
            await self.mesh.kubectl("apply", "-f", str(sample_path()))
        with self.clock.step("the proxies hold the new policy (document hash seen in effect)"):
            await self._until_policy(self._locked, "the lockdown to reach every proxy")

    # -- calls -------------------------------------------------------------------------------

    async def round(self) -> dict[str, _table.Observation]:
        """Every call once, in order; what each did, and the rule its serving proxy counted."""
        seen: dict[str, _table.Observation] = {}
        bot, outsider = self.workloads["vote-bot"], self.workloads[_workloads.OUTSIDER]

        async def through(
            watched: dict[str, str], action: Callable[[], Awaitable[dict[str, Any]]]
        ) -> tuple[dict[str, Any], dict[str, str | None]]:
            """Run ``action``; for each (row -> serving workload) in ``watched``, the rule the
            serving proxy counted meanwhile."""
            before = {row: await self._counts(target) for row, target in watched.items()}
            answer = await action()
            rules = {
                row: _rule(before[row], await self._counts(target))
                for row, target in watched.items()
            }
            return answer, rules

        answer, rules = await through(
            {"vote-bot -> web": "web", "web -> emoji": "emoji"},
            lambda: self._get(bot, "web", "/api/list"),
        )
        seen["vote-bot -> web"] = _http(answer, rules["vote-bot -> web"])
        seen["web -> emoji"] = _downstream(answer, rules["web -> emoji"])
        answer, rules = await through(
            {"web -> voting": "voting"}, lambda: self._get(bot, "web", "/api/vote?choice=:joy:")
        )
        seen["web -> voting"] = _downstream(answer, rules["web -> voting"])
        answer, rules = await through(
            {"outsider -> web": "web"}, lambda: self._get(outsider, "web", "/")
        )
        seen["outsider -> web"] = _http(answer, rules["outsider -> web"])
        answer, rules = await through(
            {"outsider -> emoji": "emoji"},
            lambda: self._client(outsider.prefix, "grpc", outsider.routes["emoji"], _apps.LIST_ALL),
        )
        seen["outsider -> emoji"] = _grpc(answer, rules["outsider -> emoji"])
        answer, rules = await through(
            {"plaintext -> web": "web"},
            lambda: self._client((), "get", f"http://{self.plaintext_route}/"),
        )
        seen["plaintext -> web"] = _http(answer, rules["plaintext -> web"])
        return seen

    async def _get(self, source: _workloads.Workload, target: str, path: str) -> dict[str, Any]:
        return await self._client(source.prefix, "get", f"http://{source.routes[target]}{path}")

    async def _client(self, prefix: tuple[str, ...], *argv: str) -> dict[str, Any]:
        """A one-shot client process (in ``prefix``'s workload); its JSON answer."""
        done = await self.processes.run(
            [*prefix, *_mesh.python(), "-m", "meshward.demo._apps", *argv], dict(os.environ)
        )
        try:
            answer: dict[str, Any] = json.loads(done.stdout)
        except ValueError:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"client failed: {last}"}
        return answer

    async def _counts(self, name: str) -> dict[tuple[str, ...], float]:
        """The serving proxy's authorization counters, by verdict and rule labels."""
        answer = await _apps.http_get(f"http://{self.workloads[name].admin}/metrics")
        counts: dict[tuple[str, ...], float] = {}
        for family in parser.text_string_to_metric_families(str(answer.get("body", ""))):
            for sample in family.samples:
                verdict = dict(_AUTHZ).get(sample.name)
                if verdict is None:
                    continue
                labels = sample.labels
                key = (
                    verdict,
                    labels.get("srv_kind", ""),
                    labels.get("srv_name", ""),
                    labels.get("authz_kind", ""),
                    labels.get("authz_name", ""),
                )
                counts[key] = counts.get(key, 0.0) + sample.value
        return counts

    def check_alive(self) -> None:
        """A component that died is an error in its own right, named with its log."""
        for name, status in self.processes.exited().items():
            raise errors.ControlPlaneError(
                name, f"exited with status {status}{_mesh.tail(self.mesh.logs / f'{name}.log')}"
            )

    async def close(self, keep_logs: pathlib.Path | None) -> None:
        """Stop and remove everything; a step that fails does not keep the later ones (the
        control plane last of all) from running."""
        try:
            try:
                await self.processes.close()
            finally:
                try:
                    if self.network is not None:
                        await self.network.close()
                finally:
                    await self.mesh.close()
                    if keep_logs is not None and self.mesh.logs.is_dir():
                        shutil.copytree(self.mesh.logs, keep_logs, dirs_exist_ok=True)
        finally:
            devcluster.down(self.mesh.cluster_dir)


def _serving(log: pathlib.Path) -> Awaitable[bool]:
    async def probe() -> bool:
        return log.exists() and "serving on" in log.read_text(errors="replace")

    return probe()


def _holds(workload: _workloads.Workload, doc: compiled.PolicyDocument) -> bool:
    """Whether the proxy said ``doc`` is in effect (its log names the document's hash)."""
    if not workload.proxy_log.exists():
        return False
    return f"policy {doc.hash[:19]} from" in workload.proxy_log.read_text(errors="replace")


def _rule(before: dict[tuple[str, ...], float], after: dict[tuple[str, ...], float]) -> str | None:
    """The rule(s) the proxy counted between two snapshots, as a person reads them."""
    counted = [key for key, value in after.items() if value > before.get(key, 0.0)]
    if not counted:
        return None
    names = []
    for _verdict, srv_kind, srv_name, authz_kind, authz_name in sorted(counted):
        if srv_kind == "default":
            names.append(f"default policy {srv_name}")
        elif authz_kind == "default":
            names.append(f"{srv_kind} {srv_name}: accessPolicy {authz_name}")
        else:
            names.append(f"{srv_kind} {srv_name}: {authz_kind} {authz_name}")
    return "; ".join(names)


_REFUSED = ("connection closed", "ConnectionResetError", "IncompleteReadError", "BrokenPipeError")


def _http(answer: dict[str, Any], rule: str | None) -> _table.Observation:
    status = answer.get("status")
    if status == 200:
        return _table.Observation(Verdict.ALLOW, "200", rule)
    if status == 403:
        why = ", told why" if answer.get("proxy_error") else ""
        return _table.Observation(Verdict.DENY, f"403{why}", rule)
    error = str(answer.get("error", f"HTTP {status}"))
    if any(word in error for word in _REFUSED):
        return _table.Observation(Verdict.DENY, "refused: connection closed", rule)
    return _table.Observation(None, error, rule)


def _grpc(answer: dict[str, Any], rule: str | None) -> _table.Observation:
    code = str(answer.get("code", answer.get("error", "no answer")))
    if code == "OK":
        return _table.Observation(Verdict.ALLOW, "gRPC OK", rule)
    if code == "PERMISSION_DENIED":
        return _table.Observation(Verdict.DENY, "gRPC PERMISSION_DENIED", rule)
    return _table.Observation(None, f"gRPC {code} {answer.get('detail', '')}".strip(), rule)


def _downstream(answer: dict[str, Any], rule: str | None) -> _table.Observation:
    """What web reported of its own gRPC call, inside its answer to the vote bot."""
    if answer.get("status") != 200:
        return _table.Observation(None, "not reached: vote-bot -> web failed", rule)
    try:
        reported = json.loads(str(answer.get("body", "")))
    except ValueError:
        return _table.Observation(None, "web's answer is not JSON", rule)
    return _grpc(reported, rule)


def choose_mode(requested: str) -> tuple[str, str]:
    """The mode to run and why, in words for the mode line."""
    if requested == "local":
        return "local", "asked for with --mode local"
    problem = _transparent.problem()
    if problem is None:
        why = "running as root with network namespaces and iptables"
        return "transparent", why if requested == "auto" else f"asked for; {why}"
    if requested == "transparent":
        raise errors.InterceptionError(f"transparent mode can not run here: {problem}")
    return "local", f"transparent mode can not run here: {problem}"


async def _demo(args: argparse.Namespace, clock: Clock, state: pathlib.Path) -> int:
    mode, why = choose_mode(args.mode)
    print(f"mode: {mode} ({why})", flush=True)
    print(f"state: {state}", flush=True)
    demo = Demo(state, mode, clock)
    try:
        await demo.set_up()
        demo.check_alive()
        before = await demo.round()
        clock.say("calls before the lockdown done")
        await demo.lock_down()
        after = await demo.round()
        clock.say("calls after the lockdown done")
        demo.check_alive()
        rows = [
            _table.Row(call.name, Verdict.ALLOW, before[call.name], call.after, after[call.name])
            for call in CALLS
        ]
        print()
        print(_table.render(rows))
        print()
        for line in _table.mismatches(rows):
            print(line)
        status = _table.exit_status(rows)
        print("every call did what was expected" if status == 0 else "the demo FAILED")
        return status
    finally:
        began = time.monotonic()
        await demo.close(args.keep_logs)
        took = time.monotonic() - began
        clock.say(f"cleaned up: processes, network namespaces, control plane ({took:.1f}s)")


async def _main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def interrupted(signum: int) -> None:
        if not received:  # the first signal starts the clean-up; later ones wait for it
            received.append(signum)
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupted, signum)
    clock = Clock()
    state = pathlib.Path(tempfile.mkdtemp(prefix="meshward-demo-"))
    state.chmod(0o755)  # the proxies' own UID reads its token and writes its key below
    try:
        status = await _demo(args, clock, state)
    except asyncio.CancelledError:
        if not received:
            raise
        print(f"interrupted by {signal.Signals(received[0]).name}: cleaned up", file=sys.stderr)
        return 128 + received[0]
    finally:
        shutil.rmtree(state, ignore_errors=True)
    clock.say(f"total {time.monotonic() - clock.start:.1f}s")
    return status


def run(args: argparse.Namespace) -> int:
    """The ``meshward demo`` command."""
    return asyncio.run(_main(args))
