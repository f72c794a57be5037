"""The interception rules as data, ``meshward proxy-init`` where it needs no root (dry run, bad
flags, no iptables), and what the transparent listeners do with a connection no rule
redirected. The rules applied for real, in network namespaces, are in test_transparent.py."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from meshward import errors
from meshward.demo import _iptables
from meshward.proxy import inbound, interception, networks, original_dst, outbound, transparent
from meshward.proxy import proxy_init as proxy_init_module

DEFAULT_RULES = [
    "-A PREROUTING -j MESHWARD_INBOUND",
    "-A OUTPUT -j MESHWARD_OUTBOUND",
    "-A MESHWARD_INBOUND -p tcp -m multiport --dports 4191 -j RETURN",
    "-A MESHWARD_INBOUND -p tcp -j REDIRECT --to-ports 4143",
    "-A MESHWARD_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
    "-A MESHWARD_OUTBOUND -o lo -j RETURN",
    "-A MESHWARD_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
]


def proxy_init(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshward", "proxy-init", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def appended(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("-A ")]


def test_the_default_rules_as_iptables_save_shows_them() -> None:
    text = interception.render(interception.Config())
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert ":MESHWARD_INBOUND - [0:0]" in lines and ":MESHWARD_OUTBOUND - [0:0]" in lines
    assert appended(text) == DEFAULT_RULES


def test_skipped_ports_are_exempt_in_their_direction_only() -> None:
    config = interception.Config(
        skip_inbound_ports=interception.parse_ports("22, 9000-9100", "--skip-inbound-ports"),
        skip_outbound_ports=interception.parse_ports("443,25", "--skip-outbound-ports"),
    )
    rules = [str(rule) for rule in interception.rules(config)]
    assert rules == [
        "-A MESHWARD_INBOUND -p tcp -m multiport --dports 22,4191,9000:9100 -j RETURN",
        "-A MESHWARD_INBOUND -p tcp -j REDIRECT --to-ports 4143",
        "-A MESHWARD_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
        "-A MESHWARD_OUTBOUND -o lo -j RETURN",
        "-A MESHWARD_OUTBOUND -p tcp -m multiport --dports 25,443 -j RETURN",
        "-A MESHWARD_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
    ]


def test_other_ports_and_uid_are_honoured() -> None:
    config = interception.Config(
        inbound_port=5143, outbound_port=5140, proxy_uid=999, admin_port=5191
    )
    text = interception.render(config)
    assert "--dports 5191 -j RETURN" in text
    assert "-j REDIRECT --to-ports 5143" in text
    assert "-j REDIRECT --to-ports 5140" in text
    assert "--uid-owner 999 -j RETURN" in text
    assert "4143" not in text and "4140" not in text and "2102" not in text


def test_many_skipped_ports_are_split_to_fit_multiport() -> None:
    singles = ",".join(str(port) for port in range(1000, 1040, 2))  # 20 ports
    ports = interception.parse_ports(f"{singles},2000-2100,3000-3100", "--skip-outbound-ports")
    config = interception.Config(skip_outbound_ports=ports)
    skips = [
        r
        for r in interception.rules(config)
        if r.chain == "MESHWARD_OUTBOUND" and "multiport" in r.spec
    ]
    listed = [rule.spec[rule.spec.index("--dports") + 1].split(",") for rule in skips]
    assert len(listed) == 2
    for entries in listed:
        assert sum(2 if ":" in entry else 1 for entry in entries) <= interception.MULTIPORT_MAX
    assert sorted(e for entries in listed for e in entries) == sorted(
        [str(port) for port in range(1000, 1040, 2)] + ["2000:2100", "3000:3100"]
    )


def test_port_lists_are_merged_and_sorted() -> None:
    parsed = interception.parse_ports("443, 80,81,82-90,85, ,100-100", "--skip-inbound-ports")
    assert [str(r) for r in parsed] == ["80:90", "100", "443"]
    assert interception.parse_ports("", "--skip-inbound-ports") == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("22,ssh", "'ssh', which is neither a port nor a FIRST-LAST range"),
        ("0", "0 is not a port number from 1 to 65535"),
        ("70000", "70000 is not a port number from 1 to 65535"),
        ("90-80", "ends before it starts: write it 80-90"),
        ("8080:8090", "neither a port nor a FIRST-LAST range"),
    ],
)
def test_bad_port_lists_say_what_is_wrong(text: str, expected: str) -> None:
    with pytest.raises(errors.ConfigError, match="--skip-inbound-ports") as caught:
        interception.parse_ports(text, "--skip-inbound-ports")
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"proxy_uid": 0}, "--proxy-uid 0 would exempt the traffic of every root process"),
        ({"proxy_uid": -5}, "--proxy-uid -5 is not a UID"),
        ({"outbound_port": 4143}, "--inbound-port and --outbound-port are both 4143"),
        ({"admin_port": 4140}, "--outbound-port and --admin-port are both 4140"),
        ({"inbound_port": 0}, "--inbound-port 0 is not a port number"),
        (
            {"skip_inbound_ports": (interception.PortRange(4000, 4200),)},
            "--skip-inbound-ports covers the inbound port 4143",
        ),
        (
            {"skip_outbound_ports": (interception.PortRange(4140, 4140),)},
            "--skip-outbound-ports covers the outbound port 4140",
        ),
    ],
)
def test_settings_that_would_bypass_or_loop_are_refused(
    fields: dict[str, object], expected: str
) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        interception.Config(**fields)  # type: ignore[arg-type]
    assert expected in str(caught.value)


def test_the_restore_input_declares_the_chains_then_fills_them_then_jumps_in() -> None:
    restore = interception.restore_input(interception.Config())
    lines = restore.text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT" and lines.count("COMMIT") == 1
    # With --noflush a declaration creates the chain or empties it: no rule is added twice.
    assert lines[1:3] == [":MESHWARD_INBOUND - [0:0]", ":MESHWARD_OUTBOUND - [0:0]"]
    # The chains are filled in order, and only then entered.
    assert lines[3:-1] == [*DEFAULT_RULES[2:], *DEFAULT_RULES[:2]]
    assert not any(
        line.startswith(("-F", "-X", "-D", "-I", ":PREROUTING", ":OUTPUT")) for line in lines
    )


def test_the_restore_input_ends_in_what_the_dry_run_shows() -> None:
    config = interception.Config(
        skip_inbound_ports=interception.parse_ports("22", "--skip-inbound-ports"),
        skip_outbound_ports=interception.parse_ports("25,443", "--skip-outbound-ports"),
    )
    restore = interception.restore_input(config)
    rendered = interception.render(config)
    assert sorted(appended(restore.text)) == sorted(appended(rendered))
    declared = [line for line in restore.text.splitlines() if line.startswith(":")]
    assert declared == [line for line in rendered.splitlines() if line.startswith(":")]


def test_a_jump_found_in_place_is_left_out() -> None:
    prerouting, output = interception.JUMPS
    for present, expected in (
        ([prerouting], ["-A OUTPUT -j MESHWARD_OUTBOUND"]),
        ([output], ["-A PREROUTING -j MESHWARD_INBOUND"]),
        ([prerouting, output], []),
    ):
        text = interception.restore_input(interception.Config(), present).text
        jumps = [line for line in appended(text) if not line.startswith("-A MESHWARD_")]
        assert jumps == expected
        assert appended(text)[: len(DEFAULT_RULES) - 2] == DEFAULT_RULES[2:]


def test_the_jump_checks_ask_for_those_very_jumps() -> None:
    assert [interception.jump_check(jump) for jump in interception.JUMPS] == [
        ("-t", "nat", "-C", "PREROUTING", "-j", "MESHWARD_INBOUND"),
        ("-t", "nat", "-C", "OUTPUT", "-j", "MESHWARD_OUTBOUND"),
    ]


def test_a_line_of_the_restore_input_is_told_as_the_rule_it_holds() -> None:
    restore = interception.restore_input(
        interception.Config(
            skip_outbound_ports=interception.parse_ports("443", "--skip-outbound-ports")
        )
    )
    lines = restore.text.splitlines()
    number = lines.index("-A MESHWARD_OUTBOUND -p tcp -m multiport --dports 443 -j RETURN") + 1
    assert restore.describe(number) == (
        f"line {number}, exempt skipped outbound ports (443): "
        "`-A MESHWARD_OUTBOUND -p tcp -m multiport --dports 443 -j RETURN`"
    )
    assert (
        restore.describe(2) == "line 2, create or empty chain MESHWARD_INBOUND: "
        "`:MESHWARD_INBOUND - [0:0]`"
    )
    assert restore.describe(len(lines)).startswith(f"line {len(lines)}, commit the nat table")
    assert restore.describe(99) == f"line 99 (the input has {len(lines)} lines)"


def test_dry_run_prints_the_rules_and_needs_no_iptables() -> None:
    proc = proxy_init(
        "--inbound-port",
        "4143",
        "--outbound-port",
        "4140",
        "--proxy-uid",
        "2102",
        "--skip-outbound-ports",
        "25,443",
        "--dry-run",
        "--iptables",
        "/nonexistent/iptables",
    )
    assert proc.returncode == 0, proc.stderr
    assert "*nat" in proc.stdout and "COMMIT" in proc.stdout
    assert appended(proc.stdout) == [
        *DEFAULT_RULES[:-1],
        "-A MESHWARD_OUTBOUND -p tcp -m multiport --dports 25,443 -j RETURN",
        DEFAULT_RULES[-1],
    ]


def test_without_iptables_it_says_how_to_name_one() -> None:
    proc = proxy_init("--iptables", "/nonexistent/iptables")
    assert proc.returncode == 1
    assert "--iptables='/nonexistent/iptables' does not exist" in proc.stderr
    proc = proxy_init(env={"PATH": "/nonexistent", "MESHWARD_IPTABLES": ""})
    assert proc.returncode == 1
    assert "iptables is not on PATH" in proc.stderr and "MESHWARD_IPTABLES" in proc.stderr
    assert "Traceback" not in proc.stderr


def real_iptables() -> pathlib.Path:
    """An iptables program of this machine (on PATH, or fetched for the namespace tests)."""
    on_path = shutil.which("iptables")
    if on_path is not None:
        return pathlib.Path(on_path).resolve()
    fetched = _iptables.cache_dir() / "root" / "usr" / "sbin" / "xtables-nft-multi"
    if not fetched.is_file():
        pytest.skip("no iptables here: install one, or run the transparent tests to fetch it")
    return fetched


def test_the_restore_programs_are_found_beside_iptables(tmp_path: pathlib.Path) -> None:
    real = real_iptables()
    (tmp_path / "iptables-nft").symlink_to(real)
    proc = proxy_init("--iptables", str(tmp_path / "iptables-nft"))
    assert proc.returncode == 1
    assert f"{tmp_path}/iptables-nft-restore does not exist" in proc.stderr
    assert "apt-get install iptables" in proc.stderr and "Traceback" not in proc.stderr

    (tmp_path / "iptables-nft-restore").symlink_to(real)
    (tmp_path / "ip6tables-nft").symlink_to(real)
    with pytest.raises(errors.ConfigError) as caught:
        proxy_init_module.families(str(tmp_path / "iptables-nft"), {}, ipv6=True)
    assert f"{tmp_path}/ip6tables-nft-restore does not exist" in str(caught.value)

    (tmp_path / "ip6tables-nft-restore").symlink_to(real)
    found = proxy_init_module.families(str(tmp_path / "iptables-nft"), {}, ipv6=True)
    assert [(f.name, f.iptables.name, f.restore.name) for f in found] == [
        ("IPv4", "iptables-nft", "iptables-nft-restore"),
        ("IPv6", "ip6tables-nft", "ip6tables-nft-restore"),
    ]
    only_v4 = proxy_init_module.families(str(tmp_path / "iptables-nft"), {}, ipv6=False)
    assert [f.name for f in only_v4] == ["IPv4"]


def test_a_bad_flag_is_named() -> None:
    proc = proxy_init("--proxy-uid", "0", "--dry-run")
    assert proc.returncode == 1
    assert "meshward: error: --proxy-uid 0" in proc.stderr
    proc = proxy_init("--skip-inbound-ports", "22,x", "--dry-run")
    assert proc.returncode == 1
    assert "--skip-inbound-ports has 'x'" in proc.stderr


# -- connections no rule redirected ----------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_a_connection_that_was_not_redirected_has_no_original_destination(
    family: socket.AddressFamily, host: str
) -> None:
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2]):
            accepted, _ = listener.accept()
            with accepted, pytest.raises(errors.NotRedirected, match="was not redirected"):
                original_dst.original_destination(accepted)


def test_mesh_networks() -> None:
    defaults = networks.parse_mesh_networks("")
    assert [str(n) for n in defaults] == networks.DEFAULT_MESH_NETWORKS.split(",")
    with pytest.raises(errors.ConfigError) as caught:
        networks.parse_mesh_networks("10.0.0.0/8,10.0.0.0/33", "MESH")
    assert "MESH has '10.0.0.0/33', which is not a network" in str(caught.value)
    side = transparent.Transparent(
        inbound_side=_inbound(),
        outbound_side=outbound.Outbound(client_context=lambda: None),
        mesh_networks=networks.parse_mesh_networks("10.77.0.128/25, fd00::/8"),
    )
    assert side.meshed("10.77.0.130") and side.meshed("fd00::1")
    assert not side.meshed("10.77.0.1") and not side.meshed("8.8.8.8") and not side.meshed("::1")


def _inbound() -> inbound.Inbound:
    return inbound.Inbound(policy=lambda: None, server_context=lambda _: None, pod=None, labels={})


@pytest.fixture
async def listeners() -> AsyncIterator[tuple[transparent.Transparent, int, int]]:
    side = transparent.Transparent(
        inbound_side=_inbound(), outbound_side=outbound.Outbound(client_context=lambda: None)
    )
    served = [
        await side.serve_inbound("127.0.0.1", 0),
        await side.serve_outbound("127.0.0.1", 0),
    ]
    try:
        yield side, served[0].port, served[1].port
    finally:
        for listener in served:
            listener.close()
        for listener in served:
            await listener.wait_closed()


async def _closed_without_answer(port: int) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_transparent_listeners_refuse_direct_connections(
    listeners: tuple[transparent.Transparent, int, int],
) -> None:
    side, inbound_port, outbound_port = listeners
    assert await _closed_without_answer(inbound_port)
    assert await _closed_without_answer(outbound_port)
    assert side.counters.inbound_refused == 1 and side.counters.inbound == 0
    assert side.counters.outbound_refused == 1
    assert side.counters.meshed == side.counters.passed_through == 0
