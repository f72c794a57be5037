"""The proxy's side of an anchor rotation, end to end: proxies in their own processes, certified
by the real identity service, following a trust-roots ConfigMap volume that the test rewrites as
the kubelet does, while traffic flows through them over real mTLS on loopback.

The phases are issue 6's: add the new anchor (proxies reload and report it), switch the identity
service to an issuer of the new anchor, ask for early renewal (``renew-leaves-before``), remove
the old anchor. A client holding a leaf from the new anchor's issuer shows when a proxy starts
trusting it; one from the old issuer, when it stops.
"""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import ssl
import time
from collections.abc import Callable, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client

from meshward import trustbundle
from meshward.identity import pki
from tests import kubetest
from tests.test_bundle import ConfigMapVolume
from tests.test_identity_service import (
    TD,
    IdentityService,
    init_trust,
    make_csr,
    name,
    swap,
    token_for,
)
from tests.test_proxy_run import Proxy, mount_policy, ping, server_and_authorization, until_placed

pytestmark = pytest.mark.cluster

RELOAD_WITHIN = 5.0
"""Seconds within which a rewritten bundle must show on /identity (the proxy polls every 2 s)."""


class CA:
    """An anchor and an issuer under it, as ``meshward identity init`` or a rotation makes."""

    def __init__(self, anchor: x509.Certificate, issuer: pki.Issuer) -> None:
        self.anchor, self.issuer = anchor, issuer

    @classmethod
    def new(cls) -> CA:
        anchor, anchor_key = pki.new_trust_anchor(TD, datetime.timedelta(days=365))
        cert, key = pki.new_issuer(anchor, anchor_key, TD, datetime.timedelta(days=30))
        return cls(anchor, pki.Issuer(certificate=cert, key=key))

    @classmethod
    def of(cls, trust: pathlib.Path) -> CA:
        """The CA ``meshward identity init`` wrote to ``trust``."""
        issuer = pki.Issuer.from_pem(
            (trust / "tls.crt").read_bytes(), (trust / "tls.key").read_bytes()
        )
        (anchor,) = pki.load_certificates((trust / "ca-bundle.crt").read_bytes())
        return cls(anchor, issuer)

    @property
    def pem(self) -> bytes:
        return pki.to_pem(self.anchor)

    @property
    def issuer_fingerprint(self) -> str:
        return trustbundle.certificate_fingerprint(self.issuer.certificate)

    def client(self, directory: pathlib.Path, sa: str, ns: str, trusts: bytes) -> ssl.SSLContext:
        """A mesh client for ``sa`` with a leaf from this CA's issuer, trusting ``trusts``."""
        directory.mkdir(parents=True)
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = pki.sign_leaf(self.issuer, key.public_key(), pki.Identity(ns, sa, TD))
        (directory / "chain.pem").write_bytes(pki.to_pem(leaf, self.issuer.certificate))
        (directory / "key.pem").write_bytes(pki.key_to_pem(key))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=trusts.decode())
        ctx.load_cert_chain(directory / "chain.pem", directory / "key.pem")
        return ctx


def fingerprint(*cas: CA) -> str:
    return trustbundle.fingerprint(ca.anchor for ca in cas)


def reported(proxy: Proxy) -> tuple[str, str]:
    """(trust bundle fingerprint, leaf issuer fingerprint) from the proxy's /identity."""
    found = proxy.identity()
    trust, issuer = found["trust_bundle"], found["issuer"]
    assert isinstance(trust, dict) and isinstance(issuer, dict)
    return str(trust["fingerprint"]), str(issuer["fingerprint"])


async def eventually(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Poll ``check`` until true; how long it took. Fails with ``what`` after ``timeout``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.1)
    return time.monotonic() - start


async def present(port: int, ctx: ssl.SSLContext) -> bytes:
    """Connect with mTLS straight to a proxy's inbound port, send "ping" and return the echo
    (b"" when the proxy refused the certificate or the connection)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5
        )
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(b"ping")
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(4), 5)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return b""
    finally:
        writer.close()


class Rotation:
    """The identity service, the mounted trust roots, and proxies web (serving the echo app)
    and client (whose outbound port leads to web), all following the mount."""

    def __init__(self, trust: pathlib.Path, service: IdentityService, roots: ConfigMapVolume):
        self.trust, self.service, self.roots = trust, service, roots
        self.old = CA.of(trust)
        self.proxies: dict[str, Proxy] = {}

    @property
    def web(self) -> Proxy:
        return self.proxies["web"]

    @property
    def client(self) -> Proxy:
        return self.proxies["client"]

    def publish(self, *cas: CA, renew_before: datetime.datetime | None = None) -> None:
        """The trust-roots ConfigMap now holds ``cas``' anchors (and the renewal request): the
        identity service's copy and the proxies' mounted copy both change."""
        bundle = b"".join(ca.pem for ca in cas)
        swap(self.trust, {"ca-bundle.crt": bundle})
        data = {"ca-bundle.crt": bundle.decode()}
        if renew_before is not None:
            data["renew-leaves-before"] = trustbundle.format_renew_before(renew_before)
        self.roots.write(data)

    def sign_with(self, ca: CA, core: client.CoreV1Api, namespace: str) -> None:
        """Switch the identity service to ``ca``'s issuer and wait until it signs with it."""
        swap(
            self.trust,
            {
                "tls.key": pki.key_to_pem(ca.issuer.key),
                "tls.crt": pki.to_pem(ca.issuer.certificate),
            },
        )
        token = token_for(core, namespace, "web")
        csr, _ = make_csr()

        def signs() -> bool:
            response = self.service.certify(name("web", namespace), token, csr)
            got = x509.load_der_x509_certificate(response.intermediate_certificates[0])
            return got == ca.issuer.certificate

        kubetest.wait_for("the identity service to sign with the new issuer", signs, 15)

    async def until_reported(self, bundle: str | None = None, issuer: str | None = None) -> float:
        def both() -> bool:
            for proxy in self.proxies.values():
                found_bundle, found_issuer = reported(proxy)
                if bundle is not None and found_bundle != bundle:
                    return False
                if issuer is not None and found_issuer != issuer:
                    return False
            return True

        return await eventually(
            f"both proxies report bundle {bundle} and issuer {issuer}\n{self.web.log_tail()}",
            both,
            RELOAD_WITHIN + 5,
        )


@pytest.fixture
def rotation(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    kubeconfig: pathlib.Path,
    namespace: str,
    echo: int,
    tmp_path: pathlib.Path,
) -> Iterator[Rotation]:
    trust = init_trust(tmp_path / "trust")
    # An hour-long leaf: nothing renews on schedule during the test, only when asked.
    service = IdentityService(
        kubeconfig, trust, tmp_path / "identity.log", extra=("--lifetime", "1h")
    )
    roots = ConfigMapVolume(tmp_path / "trust-roots")
    roots.write({"ca-bundle.crt": (trust / "ca-bundle.crt").read_text()})
    kubectl.apply(kubetest.pod_manifest(namespace, "web-0", "web"))
    kubectl.apply(server_and_authorization(namespace, echo, "client"))
    policy_file = tmp_path / "policy.json"
    mount_policy(core, namespace, policy_file, 1)
    found = Rotation(trust, service, roots)
    common = {
        "policy_file": policy_file,
        "trust_roots": roots.directory,
        "env": {"MESHWARD_PROXY_IDENTITY_RENEW_JITTER": "1"},
    }
    web = name("web", namespace)
    found.proxies["web"] = Proxy(
        tmp_path / "web",
        service,
        token_for(core, namespace, "web"),
        web,
        app_port=echo,
        pod="web-0",
        **common,  # type: ignore[arg-type]
    )
    found.proxies["client"] = Proxy(
        tmp_path / "client",
        service,
        token_for(core, namespace, "client"),
        name("client", namespace),
        peer=(found.web.inbound_port, web),
        pod="client-0",
        **common,  # type: ignore[arg-type]
    )
    service.start()
    try:
        for proxy in found.proxies.values():
            proxy.start()
        yield found
    finally:
        for proxy in found.proxies.values():
            proxy.stop()
        service.stop()


async def test_an_anchor_rotation_reaches_running_proxies(
    rotation: Rotation, core: client.CoreV1Api, namespace: str, tmp_path: pathlib.Path
) -> None:
    web, client_proxy, old = rotation.web, rotation.client, rotation.old
    new = CA.new()
    both = old.pem + new.pem
    new_client = new.client(tmp_path / "new-client", "client", namespace, trusts=both)
    old_client = old.client(tmp_path / "old-client", "client", namespace, trusts=both)
    await until_placed(web)
    assert await ping(client_proxy.outbound_port) == b"ping"
    reader, writer = await asyncio.open_connection("127.0.0.1", client_proxy.outbound_port)
    try:

        async def live() -> bytes:
            writer.write(b"still-up")
            await writer.drain()
            return await asyncio.wait_for(reader.readexactly(8), 5)

        assert await live() == b"still-up"
        assert reported(web) == (fingerprint(old), old.issuer_fingerprint)
        assert reported(client_proxy) == (fingerprint(old), old.issuer_fingerprint)
        assert await present(web.inbound_port, new_client) == b""  # B is not trusted yet
        assert await present(web.inbound_port, old_client) == b"ping"

        # A broken bundle is refused, counted once, and the proxy keeps the one it had.
        rotation.roots.write({"ca-bundle.crt": "not a bundle"})
        await eventually(
            "the broken bundle to be counted",
            lambda: web.metric("identity_trust_bundle_reloads_total", result="invalid") == 1,
            RELOAD_WITHIN,
        )
        assert reported(web)[0] == fingerprint(old)
        assert "trust-roots/ca-bundle.crt refused" in web.log_tail()
        assert await ping(client_proxy.outbound_port) == b"ping"

        # Phase 1: the new anchor joins the bundle; no restart, nothing dropped.
        rotation.publish(old, new)
        took = await rotation.until_reported(bundle=fingerprint(old, new))
        assert took < RELOAD_WITHIN
        assert await live() == b"still-up"
        assert await ping(client_proxy.outbound_port) == b"ping"
        assert await present(web.inbound_port, new_client) == b"ping"  # B is trusted now
        assert await present(web.inbound_port, old_client) == b"ping"
        for proxy in rotation.proxies.values():
            assert proxy.metric("identity_trust_bundle_reloads_total", result="ok") == 1
            assert proxy.metric("identity_trust_bundle_info", fingerprint=fingerprint(old, new))
            assert not proxy.metric("identity_trust_bundle_info", fingerprint=fingerprint(old))
            assert proxy.metric("identity_cert_refresh_total") == 1  # the leaf still chains

        # Phase 3: the identity service signs with the new issuer; proxies keep their leaves.
        rotation.sign_with(new, core, namespace)
        assert reported(web)[1] == old.issuer_fingerprint

        # Phase 4: asked to renew early, they do, once each, within the jitter and a poll.
        asked = datetime.datetime.now(datetime.UTC)
        rotation.publish(old, new, renew_before=asked)
        took = await rotation.until_reported(issuer=new.issuer_fingerprint)
        assert took < RELOAD_WITHIN + 1  # poll (2 s) + jitter (at most 1 s) + the call
        assert await live() == b"still-up"
        assert await ping(client_proxy.outbound_port) == b"ping"
        await asyncio.sleep(3)  # the renewed leaf starts before the request (backdated): no loop
        for proxy in rotation.proxies.values():
            assert proxy.metric("identity_cert_refresh_total") == 2, proxy.log_tail()
            assert proxy.metric("identity_trust_bundle_reloads_total", result="ok") == 1

        # Phase 5: the old anchor goes; nothing needs renewing, the old issuer's leaves fail.
        rotation.publish(new, renew_before=asked)
        await rotation.until_reported(bundle=fingerprint(new), issuer=new.issuer_fingerprint)
        assert await live() == b"still-up"
        assert await ping(client_proxy.outbound_port) == b"ping"
        assert await present(web.inbound_port, new_client) == b"ping"
        assert await present(web.inbound_port, old_client) == b""
        await asyncio.sleep(3)
        for proxy in rotation.proxies.values():
            assert proxy.metric("identity_cert_refresh_total") == 2  # every leaf chains to B
            assert proxy.metric("identity_trust_bundle_reloads_total", result="ok") == 2
    finally:
        writer.close()


async def test_a_leaf_the_new_bundle_does_not_trust_is_renewed_at_once(
    rotation: Rotation, core: client.CoreV1Api, namespace: str
) -> None:
    """Straight from {A} to {B}, no renewal asked for: the leaf from A's issuer would be refused
    by every peer holding {B}, so the proxy renews at once, over a channel that trusts {B}."""
    web, client_proxy, old = rotation.web, rotation.client, rotation.old
    new = CA.new()
    await until_placed(web)
    swap(rotation.trust, {"ca-bundle.crt": old.pem + new.pem})  # the service's own copy only
    rotation.sign_with(new, core, namespace)
    rotation.roots.write({"ca-bundle.crt": new.pem.decode()})
    took = await rotation.until_reported(bundle=fingerprint(new), issuer=new.issuer_fingerprint)
    assert took < RELOAD_WITHIN
    assert await ping(client_proxy.outbound_port) == b"ping"
    for proxy in rotation.proxies.values():
        assert proxy.metric("identity_cert_refresh_total") == 2
    assert "does not chain to the new trust bundle" in web.log_tail()
