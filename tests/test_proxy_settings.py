"""The proxy's environment (meshward.proxy.settings): every variable missing or malformed, the
problems reported together, defaults, IPv6 addresses, and the token never echoed."""

from __future__ import annotations

import datetime
import os
import pathlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.errors import ConfigError
from meshward.identity import pki
from meshward.proxy import settings
from meshward.proxy.settings import Address
from tests import test_bundle

LOCAL_NAME = "web.emojivoto.serviceaccount.identity.meshward.cluster.local"
SVC_NAME = "meshward-identity.meshward.serviceaccount.identity.meshward.cluster.local"
SECRET = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ3ZWIifQ.c2VjcmV0LXNpZ25hdHVyZQ"
REQUIRED = [
    settings.IDENTITY_DIR,
    settings.TRUST_ANCHORS,
    settings.TOKEN_FILE,
    settings.LOCAL_NAME,
    settings.IDENTITY_SVC_ADDR,
    settings.IDENTITY_SVC_NAME,
    settings.POD_NAME,
]
MISSING = {settings.TRUST_ANCHORS: settings.TRUST_ANCHORS_FILE}
"""Required variables whose absence is reported under another name: with neither trust anchor
variable set, the message asks for the file (what injected pods use) and names the PEM too."""
LISTENERS = {
    settings.INBOUND_LISTEN_ADDR: "inbound",
    settings.OUTBOUND_LISTEN_ADDR: "outbound",
    settings.ADMIN_LISTEN_ADDR: "admin",
}


@pytest.fixture(scope="module")
def anchors() -> bytes:
    first, _ = pki.new_trust_anchor("cluster.local", datetime.timedelta(days=365))
    second, _ = pki.new_trust_anchor("cluster.local", datetime.timedelta(days=365))
    return pki.to_pem(first, second)


@pytest.fixture
def env(tmp_path: pathlib.Path, anchors: bytes) -> dict[str, str]:
    """A complete, valid environment; the token file holds SECRET."""
    identity = tmp_path / "identity"
    identity.mkdir()
    token = tmp_path / "token"
    token.write_text(SECRET)
    return {
        settings.IDENTITY_DIR: str(identity),
        settings.TRUST_ANCHORS: anchors.decode(),
        settings.TOKEN_FILE: str(token),
        settings.LOCAL_NAME: LOCAL_NAME,
        settings.IDENTITY_SVC_ADDR: "meshward-identity.meshward.svc:8080",
        settings.IDENTITY_SVC_NAME: SVC_NAME,
        settings.POLICY_FILE: str(tmp_path / "policy.json"),
        settings.POD_NAME: "web-0",
    }


def problem(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        settings.from_env(env)
    message = str(caught.value)
    assert SECRET not in message
    return message


# -- valid environments ----------------------------------------------------------------------


def test_a_complete_environment(env: dict[str, str], anchors: bytes) -> None:
    found = settings.from_env(env)
    assert found.identity_dir == pathlib.Path(env[settings.IDENTITY_DIR])
    assert found.trust_anchors == anchors
    assert len(pki.load_certificates(found.trust_anchors)) == 2
    assert found.token_file == pathlib.Path(env[settings.TOKEN_FILE])
    assert found.local_name == LOCAL_NAME
    assert found.trust_domain == "cluster.local"
    assert found.identity_svc_addr == Address("meshward-identity.meshward.svc", 8080)
    assert found.identity_svc_name == SVC_NAME
    assert SECRET not in repr(found)


def test_listener_defaults(env: dict[str, str]) -> None:
    found = settings.from_env(env)
    assert found.inbound == Address("0.0.0.0", 4143)
    assert found.outbound == Address("127.0.0.1", 4140)
    assert found.admin == Address("0.0.0.0", 4191)


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_listener_means_its_default(env: dict[str, str], blank: str) -> None:
    env |= dict.fromkeys(LISTENERS, blank)
    found = settings.from_env(env)
    assert (found.inbound, found.outbound, found.admin) == (
        settings.ProxySettings.inbound,
        settings.ProxySettings.outbound,
        settings.ProxySettings.admin,
    )


def test_listeners_as_set(env: dict[str, str]) -> None:
    env[settings.INBOUND_LISTEN_ADDR] = "10.0.0.7:5143"
    env[settings.OUTBOUND_LISTEN_ADDR] = "localhost:5140"
    env[settings.ADMIN_LISTEN_ADDR] = ":5191"
    found = settings.from_env(env)
    assert found.inbound == Address("10.0.0.7", 5143)
    assert found.outbound == Address("localhost", 5140)
    assert found.admin == Address("0.0.0.0", 5191)


def test_ipv6_addresses(env: dict[str, str]) -> None:
    env[settings.INBOUND_LISTEN_ADDR] = "[::]:4143"
    env[settings.OUTBOUND_LISTEN_ADDR] = "[::1]:4140"
    env[settings.ADMIN_LISTEN_ADDR] = "[fe80::1%eth0]:4191"
    env[settings.IDENTITY_SVC_ADDR] = "[fd00:10:96::a]:8080"
    found = settings.from_env(env)
    assert found.inbound == Address("::", 4143)
    assert found.outbound == Address("::1", 4140)
    assert found.admin == Address("fe80::1%eth0", 4191)
    assert found.identity_svc_addr == Address("fd00:10:96::a", 8080)
    assert str(found.outbound) == "[::1]:4140"


@pytest.mark.parametrize(
    ("local_name", "trust_domain"),
    [
        (LOCAL_NAME, "cluster.local"),
        ("default.default.serviceaccount.identity.meshward.example.org", "example.org"),
        ("a-b.c-1.serviceaccount.identity.meshward.mesh", "mesh"),
    ],
)
def test_trust_domain_comes_from_the_local_name(
    env: dict[str, str], local_name: str, trust_domain: str
) -> None:
    env[settings.LOCAL_NAME] = local_name
    found = settings.from_env(env)
    assert (found.local_name, found.trust_domain) == (local_name, trust_domain)


def test_reads_the_process_environment_by_default(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    for var in LISTENERS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(settings.ADMIN_LISTEN_ADDR, "127.0.0.1:9999")
    found = settings.from_env()
    assert found.admin == Address("127.0.0.1", 9999)
    assert found.local_name == LOCAL_NAME


def test_a_symlinked_token_file_is_a_file(env: dict[str, str], tmp_path: pathlib.Path) -> None:
    # kubelet projects tokens as symlinks into a ..data directory.
    link = tmp_path / "token-link"
    link.symlink_to(env[settings.TOKEN_FILE])
    env[settings.TOKEN_FILE] = str(link)
    assert settings.from_env(env).token_file == link


# -- missing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("var", REQUIRED)
@pytest.mark.parametrize("how", ["unset", "empty", "blank"])
def test_each_required_variable_missing(env: dict[str, str], var: str, how: str) -> None:
    if how == "unset":
        del env[var]
    else:
        env[var] = "" if how == "empty" else " \n"
    message = problem(env)
    named = MISSING.get(var, var)
    assert f"{named} is not set" in message
    assert f"e.g. {settings.EXAMPLES[named]}" in message
    assert "problems" not in message  # exactly one
    for other in REQUIRED:
        if other != var:
            assert other not in message


def test_everything_missing_names_every_variable() -> None:
    message = problem({})
    assert message.startswith("proxy configuration has 8 problems:")
    for var in REQUIRED:
        assert f"{MISSING.get(var, var)} is not set" in message
    assert f"no policy source: set {settings.POLICY_FILE}" in message
    for var in LISTENERS:
        assert var not in message  # optional


# -- malformed -------------------------------------------------------------------------------

# (variable, value, or a function of the valid env and tmp_path giving it, what the message says)
Value = str | Callable[[dict[str, str], pathlib.Path], str]
CORRUPT_PEM = (
    "-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHBfpegPjMCMA0GCSqGSIb3\n-----END CERTIFICATE-----\n"
)
KEY_PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
    "-----END PRIVATE KEY-----\n"
)


def _leaf_pem() -> str:
    anchor, anchor_key = pki.new_trust_anchor("cluster.local", datetime.timedelta(days=1))
    cert, key = pki.new_issuer(anchor, anchor_key, "cluster.local", datetime.timedelta(hours=1))
    issuer = pki.Issuer(certificate=cert, key=key)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = pki.sign_leaf(
        issuer, leaf_key.public_key(), pki.Identity("apps", "web", "cluster.local")
    )
    return pki.to_pem(leaf).decode()


def _expired_pem() -> str:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    anchor, _ = pki.new_trust_anchor("cluster.local", datetime.timedelta(days=1), now=long_ago)
    return pki.to_pem(anchor).decode()


LEAF_PEM, EXPIRED_PEM = _leaf_pem(), _expired_pem()


def _file(env: dict[str, str], tmp_path: pathlib.Path) -> str:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return str(path)


def _dir(env: dict[str, str], tmp_path: pathlib.Path) -> str:
    path = tmp_path / "a-dir"
    path.mkdir()
    return str(path)


def _missing(env: dict[str, str], tmp_path: pathlib.Path) -> str:
    return str(tmp_path / "nope")


MALFORMED: list[tuple[str, Value, str]] = [
    (settings.IDENTITY_DIR, _missing, "does not exist"),
    (settings.IDENTITY_DIR, _file, "is not a directory"),
    (settings.TOKEN_FILE, _missing, "does not exist"),
    (settings.TOKEN_FILE, _dir, "is not a file"),
    (settings.TRUST_ANCHORS, "garbage", "holds no '-----BEGIN CERTIFICATE-----' block"),
    (settings.TRUST_ANCHORS, CORRUPT_PEM, "holds a certificate that does not parse"),
    (settings.TRUST_ANCHORS, KEY_PEM, "holds no '-----BEGIN CERTIFICATE-----' block"),
    (settings.TRUST_ANCHORS, "/var/run/meshward/anchors.pem", "looks like a path"),
    (settings.TRUST_ANCHORS, lambda env, _: env[settings.TRUST_ANCHORS][:300], "does not parse"),
    (settings.TRUST_ANCHORS, lambda _, __: LEAF_PEM, "which is not a CA"),
    (settings.TRUST_ANCHORS, lambda _, __: EXPIRED_PEM, "every anchor has expired"),
    (settings.RENEW_JITTER, "soon", "is not a number of seconds"),
    (settings.RENEW_JITTER, "-1", "is not between 0 and 300 seconds"),
    (settings.RENEW_JITTER, "301", "is not between 0 and 300 seconds"),
    (settings.RENEW_JITTER, "nan", "is not between 0 and 300 seconds"),
    (settings.LOCAL_NAME, "web.emojivoto", "is not of the form <sa>.<ns>.serviceaccount"),
    (settings.LOCAL_NAME, "web.emojivoto.svc.cluster.local", "is not of the form"),
    (settings.LOCAL_NAME, "spiffe://cluster.local/ns/emojivoto/sa/web", "is not of the form"),
    (settings.LOCAL_NAME, LOCAL_NAME.replace("cluster.local", ""), "is not of the form"),
    (settings.LOCAL_NAME, LOCAL_NAME.replace("service", "SERVICE"), "is not of the form"),
    (settings.LOCAL_NAME, LOCAL_NAME.replace("web", "Web"), "starts with 'Web.emojivoto'"),
    (settings.LOCAL_NAME, LOCAL_NAME.replace("web", "web_1"), "not <sa>.<ns>"),
    (settings.LOCAL_NAME, "a." + LOCAL_NAME, "starts with 'a.web.emojivoto'"),
    (settings.LOCAL_NAME, LOCAL_NAME.replace("web.", ""), "starts with 'emojivoto'"),
    (settings.LOCAL_NAME, LOCAL_NAME.replace("web", ""), "not <sa>.<ns>"),
    (settings.LOCAL_NAME, LOCAL_NAME.replace("cluster", "Cluster"), "trust domain 'Cluster"),
    (settings.LOCAL_NAME, LOCAL_NAME + ".", "trust domain 'cluster.local.'"),
    (settings.LOCAL_NAME, LOCAL_NAME.replace("web", "w" * 64), "not <sa>.<ns>"),
    (settings.IDENTITY_SVC_ADDR, "x", "is not host:port (no ':port')"),
    (settings.IDENTITY_SVC_ADDR, "meshward-identity:", "port '' is not a number"),
    (settings.IDENTITY_SVC_ADDR, ":8080", "(no host)"),
    (settings.IDENTITY_SVC_ADDR, "meshward-identity:0", "port '0' is not a number from 1"),
    (settings.IDENTITY_SVC_ADDR, "meshward-identity:65536", "port '65536'"),
    (settings.IDENTITY_SVC_ADDR, "meshward-identity:http", "port 'http'"),
    (settings.IDENTITY_SVC_ADDR, "meshward-identity:-1", "port '-1'"),
    (settings.IDENTITY_SVC_ADDR, "meshward-identity: 8080", "port ' 8080'"),
    (settings.IDENTITY_SVC_ADDR, "::1:8080", "goes in brackets"),
    (settings.IDENTITY_SVC_ADDR, "[::1]", "no ':port' after the bracketed"),
    (settings.IDENTITY_SVC_ADDR, "[::1]8080", "no ':port' after the bracketed"),
    (settings.IDENTITY_SVC_ADDR, "[::g]:8080", "[::g] is not an IPv6 address"),
    (settings.IDENTITY_SVC_ADDR, "[10.0.0.1]:8080", "is not an IPv6 address"),
    (settings.IDENTITY_SVC_ADDR, "256.0.0.1:8080", "'256.0.0.1' is not an IPv4 address"),
    (settings.IDENTITY_SVC_ADDR, "meshward_identity:8080", "neither an IP address nor a host"),
    (settings.IDENTITY_SVC_ADDR, "-identity:8080", "neither an IP address nor a host"),
    (settings.IDENTITY_SVC_ADDR, "a..b:8080", "neither an IP address nor a host"),
    (settings.IDENTITY_SVC_NAME, "Meshward-Identity.meshward", "is not a lowercase DNS name"),
    (settings.IDENTITY_SVC_NAME, "meshward-identity.", "is not a lowercase DNS name"),
    (settings.IDENTITY_SVC_NAME, "a..b", "is not a lowercase DNS name"),
    (settings.IDENTITY_SVC_NAME, "meshward identity", "is not a lowercase DNS name"),
    (settings.IDENTITY_SVC_NAME, "a." * 127 + "b", "is not a lowercase DNS name"),
    (settings.INBOUND_LISTEN_ADDR, "0.0.0.0:0", "port '0'"),
    (settings.INBOUND_LISTEN_ADDR, "4143", "no ':port'"),
    (settings.OUTBOUND_LISTEN_ADDR, ":65536", "port '65536'"),
    (settings.OUTBOUND_LISTEN_ADDR, "::1:4140", "goes in brackets"),
    (settings.ADMIN_LISTEN_ADDR, "[::1:4191", "no ':port' after the bracketed"),
    (settings.ADMIN_LISTEN_ADDR, "1.2.3:4191", "'1.2.3' is not an IPv4 address"),
]


@pytest.mark.parametrize(
    ("var", "value", "says"),
    MALFORMED,
    ids=[f"{var.removeprefix('MESHWARD_PROXY_')}-{i}" for i, (var, _, _) in enumerate(MALFORMED)],
)
def test_each_malformed_variable(
    env: dict[str, str], tmp_path: pathlib.Path, var: str, value: Value, says: str
) -> None:
    env[var] = value if isinstance(value, str) else value(env, tmp_path)
    message = problem(env)
    assert message.startswith(f"proxy configuration: {var}")  # exactly one problem, this one
    assert says in message
    assert f"e.g. {settings.EXAMPLES[var]}" in message


def test_a_message_quotes_the_bad_value(env: dict[str, str]) -> None:
    env[settings.IDENTITY_SVC_ADDR] = "x"
    assert (
        "MESHWARD_PROXY_IDENTITY_SVC_ADDR='x' is not host:port (no ':port'): set it to the "
        "identity service's host:port, e.g. meshward-identity.meshward.svc:8080"
    ) in problem(env)


def test_long_pem_is_summarised_not_quoted(env: dict[str, str]) -> None:
    env[settings.TRUST_ANCHORS] = CORRUPT_PEM * 3
    message = problem(env)
    assert f"{settings.TRUST_ANCHORS} ({len(CORRUPT_PEM) * 3} characters)" in message
    assert "MIIBkTCB" not in message


def test_unwritable_identity_dir_and_unreadable_token(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, which may write anywhere; ask os.access for the answer a proxy gets.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    message = problem(env)
    assert "2 problems" in message
    assert f"{settings.IDENTITY_DIR}='{env[settings.IDENTITY_DIR]}' is a directory the " in message
    assert f"{settings.TOKEN_FILE}='{env[settings.TOKEN_FILE]}' is a file the proxy can" in message


# -- several at once -------------------------------------------------------------------------


def test_several_problems_are_named_together(env: dict[str, str], tmp_path: pathlib.Path) -> None:
    del env[settings.IDENTITY_SVC_NAME]
    env[settings.IDENTITY_DIR] = str(tmp_path / "nope")
    env[settings.TRUST_ANCHORS] = "garbage"
    env[settings.LOCAL_NAME] = LOCAL_NAME.upper()
    env[settings.IDENTITY_SVC_ADDR] = "identity:0"
    env[settings.ADMIN_LISTEN_ADDR] = "[::1]:99999"
    message = problem(env)
    lines = message.splitlines()
    assert lines[0] == "proxy configuration has 6 problems:"
    assert len(lines) == 7
    for var in (
        settings.IDENTITY_DIR,
        settings.TRUST_ANCHORS,
        settings.LOCAL_NAME,
        settings.IDENTITY_SVC_ADDR,
        settings.IDENTITY_SVC_NAME,
        settings.ADMIN_LISTEN_ADDR,
    ):
        assert sum(line.startswith(f"  - {var}") for line in lines) == 1, var
    assert settings.TOKEN_FILE not in message
    assert settings.INBOUND_LISTEN_ADDR not in message


@pytest.mark.parametrize(
    ("listeners", "clash"),
    [
        ({settings.INBOUND_LISTEN_ADDR: ":4191"}, (settings.INBOUND_LISTEN_ADDR, "admin")),
        ({settings.OUTBOUND_LISTEN_ADDR: "127.0.0.1:4143"}, (settings.INBOUND_LISTEN_ADDR, "out")),
        (
            {settings.OUTBOUND_LISTEN_ADDR: "[::]:4191", settings.ADMIN_LISTEN_ADDR: "[::1]:4191"},
            (settings.OUTBOUND_LISTEN_ADDR, "admin"),
        ),
    ],
)
def test_listeners_on_the_same_port_clash(
    env: dict[str, str], listeners: dict[str, str], clash: tuple[str, str]
) -> None:
    env |= listeners
    message = problem(env)
    first, second = clash
    second_var = next(var for var, name in LISTENERS.items() if name.startswith(second))
    assert f"proxy configuration: {first} (" in message
    assert f"and {second_var} (" in message
    assert "would listen on the same port" in message


def test_listeners_on_one_port_but_distinct_hosts_do_not_clash(env: dict[str, str]) -> None:
    env[settings.INBOUND_LISTEN_ADDR] = "10.0.0.7:4140"  # outbound is 127.0.0.1:4140
    assert settings.from_env(env).inbound.port == settings.from_env(env).outbound.port


# -- the token stays secret ------------------------------------------------------------------


def test_a_token_given_instead_of_a_path_is_not_echoed(env: dict[str, str]) -> None:
    env[settings.TOKEN_FILE] = SECRET + "\n"
    message = problem(env)  # asserts SECRET is absent
    assert f"{settings.TOKEN_FILE} holds what looks like a token itself" in message
    assert SECRET[:20] not in message


@pytest.mark.parametrize(
    "pasted",
    [
        "Bearer " + SECRET,
        f'"{SECRET}"',
        SECRET + "A" * 300,  # too long for a file name: the OS error would quote it
        "/var/run/" + SECRET + "x" * 300,
    ],
    ids=["bearer", "quoted", "over-255", "path-around-token"],
)
def test_a_mangled_token_in_place_of_its_path_never_reaches_the_message(
    env: dict[str, str], pasted: str
) -> None:
    env[settings.TOKEN_FILE] = pasted
    message = problem(env)
    assert settings.TOKEN_FILE in message
    for fragment in (SECRET[:24], SECRET[-16:], "eyJ"):
        assert fragment not in message


# -- Address ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("meshward-identity.meshward.svc:8080", "meshward-identity.meshward.svc", 8080),
        ("meshward-identity.meshward.svc.cluster.local.:8080", None, 8080),
        ("LOCALHOST:1", "LOCALHOST", 1),
        ("10.96.0.10:65535", "10.96.0.10", 65535),
        (":4143", "0.0.0.0", 4143),
        ("[::1]:4140", "::1", 4140),
        ("[::]:4143", "::", 4143),
        ("[2001:db8::ff00:42:8329]:80", "2001:db8::ff00:42:8329", 80),
        ("[::ffff:10.0.0.1]:80", "::ffff:10.0.0.1", 80),
    ],
)
def test_address_parse(text: str, host: str | None, port: int) -> None:
    parsed = Address.parse(text)
    assert parsed == Address(host or text.rpartition(":")[0], port)
    assert Address.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text", ["", "x", "x:0", "x:65536", "::1", "[::1]", "host:port", "a b:1", "1.2.3.4.5:1"]
)
def test_address_parse_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^address .* is not host:port \("):
        Address.parse(text)


def test_only_a_listener_may_leave_out_the_host() -> None:
    assert Address.parse(":80", listen=True) == Address("0.0.0.0", 80)
    with pytest.raises(ConfigError, match="no host"):
        Address.parse(":80", listen=False)


def test_address_renders_as_written() -> None:
    assert str(Address("0.0.0.0", 4143)) == "0.0.0.0:4143"
    assert str(Address("fe80::1%eth0", 4191)) == "[fe80::1%eth0]:4191"


def test_module_docstring_lists_every_variable() -> None:
    doc = settings.__doc__ or ""
    optional = [
        settings.TRUST_ANCHORS_FILE,
        settings.RENEW_JITTER,
        settings.POLICY_FILE,
        settings.POLICY_SVC_ADDR,
        settings.POLICY_SVC_NAME,
        settings.LOCAL_INBOUND,
        settings.LOCAL_OUTBOUND,
    ]
    for var in [*REQUIRED, *LISTENERS, *optional]:
        assert sum(line.split()[:1] == [var] for line in doc.splitlines()) == 1, var


# -- policy source, pod name, local mode -------------------------------------------------------


def test_the_policy_file(env: dict[str, str], tmp_path: pathlib.Path) -> None:
    found = settings.from_env(env)
    assert found.policy_file == tmp_path / "policy.json"  # need not exist yet: no policy, deny
    assert (found.policy_svc_addr, found.policy_svc_name) == (None, None)


def test_the_policy_service(env: dict[str, str]) -> None:
    del env[settings.POLICY_FILE]
    env[settings.POLICY_SVC_ADDR] = "meshward-policy.meshward.svc:8090"
    env[settings.POLICY_SVC_NAME] = settings.EXAMPLES[settings.POLICY_SVC_NAME]
    found = settings.from_env(env)
    assert found.policy_file is None
    assert found.policy_svc_addr == Address("meshward-policy.meshward.svc", 8090)
    assert found.policy_svc_name == settings.EXAMPLES[settings.POLICY_SVC_NAME]


def test_no_policy_source_says_how_to_set_one(env: dict[str, str]) -> None:
    del env[settings.POLICY_FILE]
    message = problem(env)
    assert settings.POLICY_FILE in message and settings.POLICY_SVC_ADDR in message


def test_two_policy_sources_are_refused(env: dict[str, str]) -> None:
    env[settings.POLICY_SVC_ADDR] = "meshward-policy.meshward.svc:8090"
    assert "choose one policy source" in problem(env)


def test_the_policy_service_needs_its_name(env: dict[str, str]) -> None:
    del env[settings.POLICY_FILE]
    env[settings.POLICY_SVC_ADDR] = "meshward-policy.meshward.svc:8090"
    assert f"{settings.POLICY_SVC_NAME} is not set" in problem(env)


def test_a_policy_file_in_a_missing_directory(env: dict[str, str], tmp_path: pathlib.Path) -> None:
    env[settings.POLICY_FILE] = str(tmp_path / "nowhere" / "policy.json")
    assert "which is not a directory" in problem(env)
    env[settings.POLICY_FILE] = str(tmp_path)
    assert "is a directory" in problem(env)


def test_the_pod_name(env: dict[str, str]) -> None:
    assert settings.from_env(env).pod_name == "web-0"
    env[settings.POD_NAME] = "web-5d8f7c9b4-x2x7q"
    assert settings.from_env(env).pod_name == "web-5d8f7c9b4-x2x7q"
    env[settings.POD_NAME] = "Web_1"
    assert f"{settings.POD_NAME}='Web_1' is not a pod name" in problem(env)


def test_local_mode_ports(env: dict[str, str]) -> None:
    env[settings.INBOUND_LISTEN_ADDR] = "127.0.0.1:4143"
    env[settings.LOCAL_INBOUND] = "4143=8080, 4144=9090, 4145=18080@8080"
    env[settings.LOCAL_OUTBOUND] = f"4140={LOCAL_NAME}@127.0.0.1:5143,4141=10.0.0.9:4143"
    found = settings.from_env(env)
    assert found.local_inbound == (
        settings.LocalInbound(Address("127.0.0.1", 4143), 8080),
        settings.LocalInbound(Address("127.0.0.1", 4144), 9090),
        settings.LocalInbound(Address("127.0.0.1", 4145), 18080, pod_port=8080),
    )
    assert [entry.policy_port for entry in found.local_inbound] == [8080, 9090, 8080]
    assert found.local_outbound == (
        settings.LocalOutbound(Address("127.0.0.1", 4140), Address("127.0.0.1", 5143), LOCAL_NAME),
        settings.LocalOutbound(Address("127.0.0.1", 4141), Address("10.0.0.9", 4143), None),
    )
    assert found.namespace == "emojivoto"


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        (settings.LOCAL_INBOUND, "4143", "'4143', which is not LISTEN_PORT=..."),
        (settings.LOCAL_INBOUND, "4143=http", "application port 'http'"),
        (settings.LOCAL_INBOUND, "0=8080", "listen port '0'"),
        (settings.LOCAL_INBOUND, "4143=18080@", "pod port ''"),
        (settings.LOCAL_INBOUND, "4143=18080@http", "pod port 'http'"),
        (settings.LOCAL_OUTBOUND, "4140=127.0.0.1", "which is not host:port"),
        (settings.LOCAL_OUTBOUND, "4140=web@127.0.0.1:4143", "names peer identity 'web'"),
    ],
)
def test_malformed_local_mode(env: dict[str, str], var: str, value: str, says: str) -> None:
    env[var] = value
    message = problem(env)
    assert var in message and says in message


def test_local_listeners_clash_with_each_other_and_the_admin(env: dict[str, str]) -> None:
    env[settings.LOCAL_INBOUND] = "4143=8080,4143=9090"
    assert "would listen on the same port" in problem(env)
    env[settings.LOCAL_INBOUND] = "4191=8080"
    message = problem(env)
    assert settings.ADMIN_LISTEN_ADDR in message and "would listen on the same port" in message


# -- the trust bundle from a mounted file, and the renewal jitter ------------------------------


@pytest.fixture
def mounted(env: dict[str, str], tmp_path: pathlib.Path, anchors: bytes) -> pathlib.Path:
    """The environment switched to the trust bundle file, mounted as the kubelet mounts it."""
    volume = test_bundle.ConfigMapVolume(tmp_path / "trust-roots")
    volume.write({"ca-bundle.crt": anchors.decode()})
    del env[settings.TRUST_ANCHORS]
    env[settings.TRUST_ANCHORS_FILE] = str(volume.directory / "ca-bundle.crt")
    return volume.directory / "ca-bundle.crt"


def test_the_trust_bundle_from_a_mounted_file(
    env: dict[str, str], mounted: pathlib.Path, anchors: bytes
) -> None:
    found = settings.from_env(env)
    assert found.trust_anchors_file == mounted
    assert found.trust_anchors == anchors  # as read at start; the proxy follows the file


def test_the_trust_bundle_from_the_environment_is_fixed(env: dict[str, str]) -> None:
    assert settings.from_env(env).trust_anchors_file is None


def test_both_trust_anchor_variables_are_refused(
    env: dict[str, str], mounted: pathlib.Path, anchors: bytes
) -> None:
    env[settings.TRUST_ANCHORS] = anchors.decode()
    message = problem(env)
    assert message.startswith(
        f"proxy configuration: {settings.TRUST_ANCHORS} and {settings.TRUST_ANCHORS_FILE} are "
        "both set: unset one"
    )


def _write(content: str) -> Callable[[pathlib.Path], str]:
    def write(tmp_path: pathlib.Path) -> str:
        path = tmp_path / "bundle.crt"
        path.write_text(content)
        return str(path)

    return write


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (lambda tmp: str(tmp / "nope" / "ca-bundle.crt"), "does not exist"),
        (lambda tmp: str(tmp), "is a directory: name the ca-bundle.crt file inside it"),
        (lambda _: EXPIRED_PEM, "holds PEM text, not a path (PEM text goes in"),
        (_write(""), "is not a usable trust bundle (the file is empty"),
        (_write("garbage"), "is not a usable trust bundle (the file is not a PEM certificate"),
        (_write(LEAF_PEM), "which is not a CA (basicConstraints CA=false)"),
        (_write(EXPIRED_PEM), "every anchor has expired"),
    ],
    ids=["missing", "directory", "pem-text", "empty", "garbage", "leaf", "expired"],
)
def test_an_unusable_trust_bundle_file(
    env: dict[str, str],
    mounted: pathlib.Path,
    tmp_path: pathlib.Path,
    value: Callable[[pathlib.Path], str],
    says: str,
) -> None:
    env[settings.TRUST_ANCHORS_FILE] = value(tmp_path)
    message = problem(env)
    assert message.startswith(f"proxy configuration: {settings.TRUST_ANCHORS_FILE}")
    assert says in message
    assert f"e.g. {settings.EXAMPLES[settings.TRUST_ANCHORS_FILE]}" in message


def test_an_expired_anchor_beside_a_current_one_is_fine(
    env: dict[str, str], anchors: bytes
) -> None:
    env[settings.TRUST_ANCHORS] = EXPIRED_PEM + anchors.decode()
    assert len(pki.load_certificates(settings.from_env(env).trust_anchors)) == 3


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 5.0), ("0", 0.0), ("2.5", 2.5), ("30s", 30.0)]
)
def test_the_renewal_jitter(env: dict[str, str], value: str | None, seconds: float) -> None:
    if value is not None:
        env[settings.RENEW_JITTER] = value
    assert settings.from_env(env).renew_jitter == seconds
