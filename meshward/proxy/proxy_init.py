"""``meshward proxy-init``: install the interception rules in the pod's network namespace.

The injector runs it as an init container (with NET_ADMIN and NET_RAW), before the application
and the proxy start. The rules themselves are :mod:`meshward.proxy.interception`; this module
finds iptables and applies them with one ``iptables-restore --noflush`` per address family,
which the kernel commits all at once: a re-run (an init container restarted) never leaves a
moment in which a connection gets past the proxy, and a failed run changes nothing in that
family. Before it, ``iptables -C`` checks which jumps into our chains are already in place, so
that none is added twice. On failure it stops with a message naming the family, the rule,
iptables' own reason and what to do (exit status 1). ``--dry-run`` prints the rules as
``iptables-save`` would and changes nothing.

Which iptables: ``--iptables PATH``, else ``$MESHWARD_IPTABLES``, else ``iptables`` on PATH; its
restore program is the one beside it with ``-restore`` appended to its name
(``iptables-nft-restore`` for ``iptables-nft``...). The same rules go to IPv6 through the
ip6tables beside it (``ip6tables``, ``ip6tables-nft``..., named after the iptables given) and
its restore program whenever the namespace has IPv6, since a family left without rules would
let clients reach the application around the proxy; a missing program is then an error, not a
warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from meshward import errors
from meshward.proxy import interception

ENV = "MESHWARD_IPTABLES"
TIMEOUT = 30.0
WAIT_FOR_LOCK = "10"
"""Seconds iptables and iptables-restore wait for the xtables lock another process holds
(legacy backend; the nft backend accepts and ignores it)."""
IPV6_SWITCH = pathlib.Path("/proc/sys/net/ipv6/conf/all/disable_ipv6")

_PORT_LIST = "LIST"
_ERROR_LINE = re.compile(r"error occurred at line:?\s*([0-9]+)", re.IGNORECASE)
_JUMP_MISSING = (1, 2)
"""``iptables -C`` exit statuses that mean "not there": 1, no such rule; 2, its target chain
does not exist yet. Any other failure (permission, lock) means the check could not look."""


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


@dataclasses.dataclass(frozen=True)
class Family:
    """One address family and its programs: ``iptables`` checks for jumps, ``restore`` applies."""

    name: str
    iptables: pathlib.Path
    restore: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Applied:
    """What one restore put in place: ``rules`` in our chains, ``jumps_added`` into them (the
    others were found in place and left out)."""

    rules: int
    jumps_added: int


def main(args: argparse.Namespace) -> int:
    """The command: 0 once every rule is in place (or printed, with ``--dry-run``)."""
    config = config_from(args)
    if args.dry_run:
        print(
            "# meshward proxy-init --dry-run: the nat rules, for iptables and ip6tables alike, "
            "applied in one commit per family with iptables-restore --noflush"
        )
        print(interception.render(config), end="")
        return 0
    done: list[str] = []
    for family in families(args.iptables, os.environ, ipv6_enabled()):
        try:
            applied = apply(family, config, os.environ)
        except errors.InterceptionError as exc:
            if not done:
                raise
            raise errors.InterceptionError(
                f"{exc} (the {' and '.join(done)} rules are in place: run proxy-init again "
                "once this is fixed)"
            ) from exc
        done.append(family.name)
        print(
            f"meshward proxy-init: {family.name}: {applied.rules} rules applied in one commit by "
            f"{family.restore}; jumps into them: {applied.jumps_added} added, "
            f"{len(interception.JUMPS) - applied.jumps_added} already in place"
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


def families(explicit: str | None, env: Mapping[str, str], ipv6: bool) -> list[Family]:
    """IPv4's programs, and IPv6's when ``ipv6``; every one found before anything is applied,
    so that a missing one changes nothing. Raises :class:`~meshward.errors.ConfigError`."""
    iptables = find_iptables(explicit, env)
    found = [Family("IPv4", iptables, restore_beside(iptables))]
    if ipv6:
        ip6tables = ip6tables_beside(iptables)
        found.append(Family("IPv6", ip6tables, restore_beside(ip6tables)))
    return found


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


def restore_beside(program: pathlib.Path) -> pathlib.Path:
    """The restore program that goes with ``program`` (``iptables-nft`` ->
    ``iptables-nft-restore``, same directory), so both use the same backend."""
    path = program.with_name(f"{program.name}-restore")
    if shutil.which(path) is not None:
        return path
    raise errors.ConfigError(
        f"{path} {_why_unusable(path)}: proxy-init applies the rules in one commit with the "
        f"restore program beside {program}. Install the whole iptables package there (Debian: "
        "apt-get install iptables), or name an iptables that has its -restore beside it with "
        f"--iptables PATH or {ENV}=PATH"
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


def apply(family: Family, config: interception.Config, env: Mapping[str, str]) -> Applied:
    """Install ``config``'s rules in ``family`` in one ``--noflush`` restore, adding only the
    jumps not found in place. Raises :class:`~meshward.errors.InterceptionError` naming the
    family, the line that failed and why; nothing of that family has changed then."""
    present = [jump for jump in interception.JUMPS if _jump_present(family, jump, env)]
    restore = interception.restore_input(config, present)
    argv = [str(family.restore), "-w", WAIT_FOR_LOCK, "--noflush"]
    proc = _run(argv, env, restore.text)
    if proc.returncode != 0:
        where = _ERROR_LINE.search(proc.stderr)
        what = restore.describe(int(where.group(1))) + ": " if where else ""
        kept = "\n".join(line for line in proc.stderr.splitlines() if not _ERROR_LINE.search(line))
        reason = _reason(kept) or f"exit status {proc.returncode}"
        raise errors.InterceptionError(
            f"{family.name}: `{' '.join((family.restore.name, *argv[1:]))}` failed, so none "
            f"of the {family.name} rules changed: {what}{reason}{_advice(proc.stderr)}"
        )
    return Applied(
        rules=len(interception.rules(config)),
        jumps_added=len(interception.JUMPS) - len(present),
    )


def _jump_present(family: Family, jump: interception.Rule, env: Mapping[str, str]) -> bool:
    """Whether ``jump`` is in place; raises when iptables could not look, as that is no answer."""
    args = interception.jump_check(jump)
    argv = [str(family.iptables), "-w", WAIT_FOR_LOCK, *args]
    proc = _run(argv, env)
    if proc.returncode == 0:
        return True
    if proc.returncode in _JUMP_MISSING:
        return False
    reason = _reason(proc.stderr) or f"exit status {proc.returncode}"
    raise errors.InterceptionError(
        f"{family.name}: could not check whether {jump.chain} already jumps to "
        f"{jump.spec[-1]}, so no {family.name} rule was changed: "
        f"`{' '.join((family.iptables.name, *argv[1:]))}`: {reason}{_advice(proc.stderr)}"
    )


def _run(
    argv: Sequence[str], env: Mapping[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            env=dict(env),
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise errors.InterceptionError(
            f"`{' '.join(argv)}` did not finish in {TIMEOUT:.0f} s: is another process holding "
            "the xtables lock?"
        ) from exc
    except OSError as exc:
        raise errors.InterceptionError(
            f"could not run {argv[0]}: {exc.strerror}: name a working iptables with --iptables"
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
    if "unable to initialize table" in text:  # iptables-legacy-restore says no more than that
        return (
            ". Either proxy-init lacks CAP_NET_ADMIN (an init container needs the NET_ADMIN and "
            "NET_RAW capabilities) or the kernel lacks the nat table (load iptable_nat, or try "
            "the other backend: iptables-legacy or iptables-nft)"
        )
    if "couldn't load" in text:
        return (
            ". iptables lacks that extension: install it (libxt_*.so in iptables' extension "
            "directory, $XTABLES_LIBDIR if set), or name a complete iptables with --iptables"
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
