"""The iptables rules that steer a pod's TCP traffic through its proxy, as data (pure).

Linkerd's design, in the ``nat`` table of the pod's own network namespace:

    PREROUTING -> MESHWARD_INBOUND
        the proxy's admin port and the skip-inbound ports     RETURN (reach the pod unchanged)
        every other TCP port                                  REDIRECT to the inbound port
    OUTPUT -> MESHWARD_OUTBOUND
        traffic of the proxy's own UID                        RETURN (the proxy's own dials)
        traffic leaving through loopback                      RETURN (the pod talking to itself)
        the skip-outbound ports                               RETURN
        every other TCP connection                            REDIRECT to the outbound port

The proxy reads where a redirected connection was going from the connection itself
(:mod:`meshward.proxy.original_dst`), so applications keep dialing ordinary addresses.

The rules name no address, so the same set serves iptables and ip6tables. They are applied
in one ``iptables-restore --noflush`` per family (:func:`restore_input`), which the kernel
commits all at once: declaring our chains creates a missing one or empties an existing one
within that same commit, so a re-run replaces the rules without a moment in which traffic goes
past the proxy, and a failed run changes nothing. Every other chain of the table is left alone.
Each jump from a built-in chain is in the input only if that very jump is missing (the caller
checks with ``iptables -C``), so applying twice leaves one copy of everything. :func:`render`
shows the result as ``iptables-save`` prints it, for ``meshward proxy-init --dry-run``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection

from meshward.errors import ConfigError

TABLE = "nat"
INBOUND_CHAIN = "MESHWARD_INBOUND"
OUTBOUND_CHAIN = "MESHWARD_OUTBOUND"

INBOUND_PORT = 4143
OUTBOUND_PORT = 4140
PROXY_UID = 2102
ADMIN_PORT = 4191

MULTIPORT_MAX = 15
"""The multiport match takes at most 15 ports per rule, a range counting as two."""
MAX_UID = 2**32 - 2
"""(uid_t)-1 means "no user" to the kernel, so the largest real UID is one less."""

_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


@dataclasses.dataclass(frozen=True, order=True)
class PortRange:
    """Ports ``first`` to ``last``, both included (one port: ``first == last``)."""

    first: int
    last: int

    def __str__(self) -> str:
        """As iptables' multiport match writes it: ``25`` or ``9000:9100``."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"

    @property
    def weight(self) -> int:
        """What it counts towards :data:`MULTIPORT_MAX`."""
        return 1 if self.first == self.last else 2


def parse_ports(text: str, flag: str) -> tuple[PortRange, ...]:
    """``25,443,9000-9100`` as sorted, merged ranges; empty text is no ports.

    Raises :class:`ConfigError` naming ``flag`` and the entry that is not a port or range.
    """
    found: list[PortRange] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        match = _RANGE.fullmatch(entry)
        if match is None:
            raise ConfigError(
                f"{flag} has {entry!r}, which is neither a port nor a FIRST-LAST range: "
                "give ports and ranges separated by commas, e.g. 25,443,9000-9100"
            )
        first = int(match.group(1))
        last = int(match.group(2) or first)
        for port in (first, last):
            if not 1 <= port <= 65535:
                raise ConfigError(
                    f"{flag} has {entry!r}: {port} is not a port number from 1 to 65535"
                )
        if first > last:
            raise ConfigError(
                f"{flag} has range {entry!r}, which ends before it starts: write it {last}-{first}"
            )
        found.append(PortRange(first, last))
    return _merged(found)


def _merged(ranges: list[PortRange]) -> tuple[PortRange, ...]:
    merged: list[PortRange] = []
    for item in sorted(ranges):
        if merged and item.first <= merged[-1].last + 1:
            merged[-1] = PortRange(merged[-1].first, max(merged[-1].last, item.last))
        else:
            merged.append(item)
    return tuple(merged)


@dataclasses.dataclass(frozen=True)
class Config:
    """What ``meshward proxy-init`` installs: the proxy's ports and UID, and the exemptions.

    Checked on construction: a mistake here would silently bypass the proxy or loop traffic
    back into it, so a bad combination raises :class:`ConfigError` saying which flags clash.
    """

    inbound_port: int = INBOUND_PORT
    outbound_port: int = OUTBOUND_PORT
    proxy_uid: int = PROXY_UID
    admin_port: int = ADMIN_PORT
    skip_inbound_ports: tuple[PortRange, ...] = ()
    skip_outbound_ports: tuple[PortRange, ...] = ()

    def __post_init__(self) -> None:
        ports = {
            "--inbound-port": self.inbound_port,
            "--outbound-port": self.outbound_port,
            "--admin-port": self.admin_port,
        }
        for flag, port in ports.items():
            if not 1 <= port <= 65535:
                raise ConfigError(f"{flag} {port} is not a port number from 1 to 65535")
        seen: dict[int, str] = {}
        for flag, port in ports.items():
            if port in seen:
                raise ConfigError(
                    f"{seen[port]} and {flag} are both {port}: the proxy listens on each, "
                    "so give each its own port"
                )
            seen[port] = flag
        if self.proxy_uid == 0:
            raise ConfigError(
                "--proxy-uid 0 would exempt the traffic of every root process, the application "
                f"too, from interception: run the proxy under a UID of its own (e.g. {PROXY_UID})"
            )
        if not 0 < self.proxy_uid <= MAX_UID:
            raise ConfigError(f"--proxy-uid {self.proxy_uid} is not a UID from 1 to {MAX_UID}")
        if _covers(self.skip_inbound_ports, self.inbound_port):
            raise ConfigError(
                f"--skip-inbound-ports covers the inbound port {self.inbound_port}: leave it out"
            )
        if _covers(self.skip_outbound_ports, self.outbound_port):
            raise ConfigError(
                f"--skip-outbound-ports covers the outbound port {self.outbound_port}: leave it out"
            )


def _covers(ranges: tuple[PortRange, ...], port: int) -> bool:
    return any(r.first <= port <= r.last for r in ranges)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule: appended to ``chain``, matching and acting as ``spec`` says."""

    chain: str
    spec: tuple[str, ...]

    def __str__(self) -> str:
        """As ``iptables-save`` prints it."""
        return " ".join(("-A", self.chain, *self.spec))


def _skip(chain: str, ranges: tuple[PortRange, ...], why: str) -> list[tuple[Rule, str]]:
    """RETURN rules for ``ranges``, as few as multiport allows."""
    rules: list[tuple[Rule, str]] = []
    batch: list[PortRange] = []
    weight = 0
    for item in (*ranges, None):
        if item is None or weight + item.weight > MULTIPORT_MAX:
            if batch:
                ports = ",".join(str(r) for r in batch)
                spec = ("-p", "tcp", "-m", "multiport", "--dports", ports, "-j", "RETURN")
                rules.append((Rule(chain, spec), f"{why} ({ports.replace(':', '-')})"))
            batch, weight = [], 0
        if item is not None:
            batch.append(item)
            weight += item.weight
    return rules


def _described(config: Config) -> list[tuple[Rule, str]]:
    """Every rule of both chains, in order, each with what it is for."""
    admin = PortRange(config.admin_port, config.admin_port)
    inbound_skips = _merged([admin, *config.skip_inbound_ports])
    return [
        *_skip(INBOUND_CHAIN, inbound_skips, "let the admin port and skipped inbound ports in"),
        (
            Rule(
                INBOUND_CHAIN,
                ("-p", "tcp", "-j", "REDIRECT", "--to-ports", str(config.inbound_port)),
            ),
            f"redirect inbound TCP to the proxy's inbound port {config.inbound_port}",
        ),
        (
            Rule(
                OUTBOUND_CHAIN,
                ("-m", "owner", "--uid-owner", str(config.proxy_uid), "-j", "RETURN"),
            ),
            f"exempt the proxy's own traffic (UID {config.proxy_uid})",
        ),
        (Rule(OUTBOUND_CHAIN, ("-o", "lo", "-j", "RETURN")), "exempt traffic over loopback"),
        *_skip(OUTBOUND_CHAIN, config.skip_outbound_ports, "exempt skipped outbound ports"),
        (
            Rule(
                OUTBOUND_CHAIN,
                ("-p", "tcp", "-j", "REDIRECT", "--to-ports", str(config.outbound_port)),
            ),
            f"redirect outbound TCP to the proxy's outbound port {config.outbound_port}",
        ),
    ]


def rules(config: Config) -> tuple[Rule, ...]:
    """The rules of :data:`INBOUND_CHAIN` and :data:`OUTBOUND_CHAIN`, in order."""
    return tuple(rule for rule, _ in _described(config))


JUMPS = (
    Rule("PREROUTING", ("-j", INBOUND_CHAIN)),
    Rule("OUTPUT", ("-j", OUTBOUND_CHAIN)),
)
"""Where the chains are entered from: every packet the pod receives, and every one it sends."""


def jump_check(jump: Rule) -> tuple[str, ...]:
    """The iptables arguments that succeed only if ``jump`` is already in place."""
    return ("-t", TABLE, "-C", jump.chain, *jump.spec)


@dataclasses.dataclass(frozen=True)
class RestoreInput:
    """What ``iptables-restore --noflush`` reads on standard input, with what each line is for
    (so that an error at line N can be told as the rule it concerns)."""

    lines: tuple[tuple[str, str], ...]
    """Each line of the input (without its newline) and what it does."""

    @property
    def text(self) -> str:
        return "".join(f"{line}\n" for line, _ in self.lines)

    def describe(self, number: int) -> str:
        """Line ``number`` (counted from 1, as iptables-restore reports it) and its purpose."""
        if not 1 <= number <= len(self.lines):
            return f"line {number} (the input has {len(self.lines)} lines)"
        line, what = self.lines[number - 1]
        return f"line {number}, {what}: `{line}`"


def restore_input(config: Config, present: Collection[Rule] = ()) -> RestoreInput:
    """The ``nat`` table input that installs :func:`rules` and each of :data:`JUMPS` not in
    ``present`` (the jumps found in place), as one commit.

    With ``--noflush``, declaring a chain creates it if missing and empties it if not, and the
    rest of the table is kept; the jumps come after the chains they enter are declared.
    """
    lines: list[tuple[str, str]] = [(f"*{TABLE}", f"open the {TABLE} table")]
    for chain in (INBOUND_CHAIN, OUTBOUND_CHAIN):
        lines.append((f":{chain} - [0:0]", f"create or empty chain {chain}"))
    lines.extend((str(rule), what) for rule, what in _described(config))
    lines.extend(
        (str(jump), f"send {jump.chain} through {jump.spec[-1]}")
        for jump in JUMPS
        if jump not in present
    )
    lines.append(("COMMIT", f"commit the {TABLE} table"))
    return RestoreInput(tuple(lines))


def render(config: Config) -> str:
    """What the ``nat`` table holds of ours once applied, in ``iptables-save`` form."""
    lines = [
        f"*{TABLE}",
        f":{INBOUND_CHAIN} - [0:0]",
        f":{OUTBOUND_CHAIN} - [0:0]",
        *(str(jump) for jump in JUMPS),
        *(str(rule) for rule in rules(config)),
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"
