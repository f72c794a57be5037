"""``meshward proxy-init``: install the interception rules in the pod's network namespace.

The injector runs it as an init container (with NET_ADMIN and NET_RAW), before the application
and the proxy start. The rules themselves are :mod:`meshward.proxy.interception`; this module
finds iptables, runs the steps one by one, and on the first failure stops with a message naming
the rule, iptables' own reason and what to do (exit status 1). ``--dry-run`` prints the rules
as ``iptables-save`` would and changes nothing.

Which iptables: ``--iptables PATH``, else ``$MESHWARD_IPTABLES``, else ``iptables`` on PATH. The
same rules go to IPv6 through the ip6tables beside it (``ip6tables``, ``ip6tables-nft``...,
named after the iptables given) whenever the namespace has IPv6, since a family left without
rules would let clients reach the application around the proxy; no ip6tables there is then an
error, not a warning.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from meshward import errors
from meshward.proxy import interception

ENV = "MESHWARD_IPTABLES"
TIMEOUT = 30.0
WAIT_FOR_LOCK = "10"
"""Seconds iptables waits for the xtables lock another process holds (legacy backend)."""
IPV6_SWITCH = pathlib.Path("/proc/sys/net/ipv6/conf/all/disable_ipv6")

_PORT_LIST = "LIST"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inbound-port",
        type=int,
        default=interception.INBOUND_PORT,
        help="the proxy's inbound port: inbound TCP is redirected to it (default %(default)s)",
    )
    parser.add_argument(
        "--outbound-port",
        type=int,
        default=interception.OUTBOUND_PORT,
        help="the proxy's outbound port: outbound TCP is redirected to it (default %(default)s)",
    )
    parser.add_argument(
        "--proxy-uid",
        type=int,
        default=interception.PROXY_UID,
        help="the UID the proxy runs as: its own traffic is not redirected (default %(default)s)",
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        default=interception.ADMIN_PORT,
        help="the proxy's admin port: reached directly, for probes and metrics "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--skip-inbound-ports",
        default="",
        metavar=_PORT_LIST,
        help="inbound ports that reach the pod without the proxy: ports and FIRST-LAST ranges "
        "separated by commas, e.g. 22,9000-9100",
    )
    parser.add_argument(
        "--skip-outbound-ports",
        default="",
        metavar=_PORT_LIST,
        help="outbound ports the pod dials without the proxy, e.g. 25,443",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the rules as iptables-save would show them and change nothing",
    )
    parser.add_argument(
        "--iptables",
        metavar="PATH",
        help=f"the iptables program to run (default: ${ENV}, else iptables on PATH)",
    )


def config_from(args: argparse.Namespace) -> interception.Config:
    return interception.Config(
        inbound_port=args.inbound_port,
        outbound_port=args.outbound_port,
        proxy_uid=args.proxy_uid,
        admin_port=args.admin_port,
        skip_inbound_ports=interception.parse_ports(
            args.skip_inbound_ports, "--skip-inbound-ports"
        ),
        skip_outbound_ports=interception.parse_ports(
            args.skip_outbound_ports, "--skip-outbound-ports"
        ),
    )


def main(args: argparse.Namespace) -> int:
    """The command: 0 once every rule is in place (or printed, with ``--dry-run``)."""
    config = config_from(args)
    if args.dry_run:
        print("# meshward proxy-init --dry-run: the nat rules, for iptables and ip6tables alike")
        print(interception.render(config), end="")
        return 0
    programs = [find_iptables(args.iptables, os.environ)]
    if ipv6_enabled():
        programs.append(ip6tables_beside(programs[0]))
    steps = interception.plan(config)
    for program in programs:
        ran = apply(program, steps, os.environ)
        print(
            f"meshward proxy-init: {program}: rules in place ({ran} of {len(steps)} steps run, "
            "the others found in place)"
        )
    exempt = [f"UID {config.proxy_uid}", "loopback", f"admin port {config.admin_port}"]
    for direction, ranges in (
        ("inbound", config.skip_inbound_ports),
        ("outbound", config.skip_outbound_ports),
    ):
        if ranges:
            listed = ",".join(str(r).replace(":", "-") for r in ranges)
            exempt.append(f"{direction} ports {listed}")
    print(
        f"inbound TCP goes to port {config.inbound_port}, outbound TCP to port "
        f"{config.outbound_port}; exempt: {', '.join(exempt)}"
    )
    return 0


def find_iptables(explicit: str | None, env: Mapping[str, str]) -> pathlib.Path:
    """The iptables to run; raises :class:`~meshward.errors.ConfigError` saying where it
    looked and how to name one."""
    given = explicit or env.get(ENV, "").strip()
    where = "--iptables" if explicit else ENV
    if given:
        found = shutil.which(given)
        if found is None:
            reason = _why_unusable(pathlib.Path(given))
            raise errors.ConfigError(
                f"{where}={given!r} {reason}: name an iptables program, e.g. /usr/sbin/iptables"
            )
        return pathlib.Path(found)
    found = shutil.which("iptables")
    if found is None:
        raise errors.ConfigError(
            "iptables is not on PATH: install it (Debian: apt-get install iptables), or name "
            f"it with --iptables PATH or {ENV}=PATH"
        )
    return pathlib.Path(found)


def ip6tables_beside(iptables: pathlib.Path) -> pathlib.Path:
    """The ip6tables that goes with ``iptables`` (same directory, same backend suffix)."""
    name = iptables.name
    sibling = name.replace("iptables", "ip6tables", 1) if "iptables" in name else "ip6tables"
    path = iptables.parent / sibling
    if shutil.which(path) is not None:
        return path
    raise errors.ConfigError(
        f"this network namespace has IPv6 but {path} {_why_unusable(path)}: IPv6 traffic "
        f"would bypass the proxy. Install ip6tables beside {iptables}, or disable IPv6 in the "
        "pod (sysctl net.ipv6.conf.all.disable_ipv6=1)"
    )


def _why_unusable(path: pathlib.Path) -> str:
    try:
        return "is not executable" if path.is_file() else "does not exist"
    except OSError as exc:
        return f"can not be reached ({exc.strerror})"


def ipv6_enabled() -> bool:
    try:
        return IPV6_SWITCH.read_text().strip() == "0"
    except OSError:
        return False  # a kernel without IPv6


def apply(program: pathlib.Path, steps: Sequence[interception.Step], env: Mapping[str, str]) -> int:
    """Run ``steps`` with ``program``; return how many ran (a check that finds its chain or
    jump in place skips a step). Raises
    :class:`~meshward.errors.InterceptionError` at the first step that fails."""
    ran = 0
    for number, step in enumerate(steps, 1):
        if step.unless is not None and _run(program, step.unless, env).returncode == 0:
            continue
        proc = _run(program, step.args, env)
        if proc.returncode != 0:
            command = " ".join((program.name, *step.args))
            reason = _reason(proc.stderr) or f"exit status {proc.returncode}"
            raise errors.InterceptionError(
                f"step {number} of {len(steps)} ({step.what}) failed: `{command}`: {reason}"
                f"{_advice(proc.stderr)}"
            )
        ran += 1
    return ran


def _run(
    program: pathlib.Path, args: Sequence[str], env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    argv = [str(program), "-w", WAIT_FOR_LOCK, *args]
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, env=dict(env), timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise errors.InterceptionError(
            f"`{' '.join(argv)}` did not finish in {TIMEOUT:.0f} s: is another process holding "
            "the xtables lock?"
        ) from exc
    except OSError as exc:
        raise errors.InterceptionError(
            f"could not run {program}: {exc.strerror}: name a working iptables with --iptables"
        ) from exc


def _reason(stderr: str) -> str:
    """iptables' own complaint, without its usage hints."""
    lines = [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not line.lower().startswith(("try `", "try '", "perhaps"))
    ]
    return "; ".join(lines)[:300]


def _advice(stderr: str) -> str:
    text = stderr.lower()
    if "permission denied" in text or "operation not permitted" in text:
        return (
            ". Run proxy-init as root with CAP_NET_ADMIN (an init container needs the "
            "NET_ADMIN and NET_RAW capabilities)"
        )
    if any(
        hint in text
        for hint in ("can't initialize", "table does not exist", "no chain/target/match", "module")
    ):
        return (
            ". The kernel may lack the nat table or a match it needs (REDIRECT, owner, "
            "multiport): load those modules, or try the other backend (iptables-legacy or "
            "iptables-nft)"
        )
    return ""
