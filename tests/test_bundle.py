"""The trust bundle: its fingerprint, what makes one usable, the ``renew-leaves-before`` time, and
the proxy following the mounted ConfigMap (meshward.trustbundle, meshward.proxy.trust_roots)
through real kubelet-style symlink swaps on disk."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import parser

from meshward import errors, trustbundle
from meshward.identity import pki
from meshward.proxy import metrics, trust_roots

TD = "cluster.local"
DAY = datetime.timedelta(days=1)


class ConfigMapVolume:
    """A ConfigMap volume as the kubelet keeps it up to date: each version of the data in a
    directory of its own, ``..data`` linking to the current one (swapped with a rename), and one
    link per key through ``..data``, so a reader of ``<dir>/<key>`` sees one version or the next,
    never a mix."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._versions = 0

    def write(self, data: dict[str, str]) -> None:
        self._versions += 1
        stamped = self.directory / f"..2026_11_24_10_00_00.{self._versions:09d}"
        stamped.mkdir()
        for key, value in data.items():
            (stamped / key).write_text(value)
        for key in data:
            if not (self.directory / key).is_symlink():
                (self.directory / key).symlink_to(f"..data/{key}")
        staged = self.directory / "..data_tmp"
        staged.symlink_to(stamped.name)
        os.replace(staged, self.directory / "..data")
        for entry in self.directory.iterdir():
            if entry.name.startswith(".."):
                if entry.is_dir() and not entry.is_symlink() and entry != stamped:
                    shutil.rmtree(entry)
            elif entry.name not in data:
                entry.unlink()


def anchor(lifetime: datetime.timedelta = DAY, ago: datetime.timedelta | None = None) -> bytes:
    now = datetime.datetime.now(datetime.UTC) - ago if ago else None
    cert, _ = pki.new_trust_anchor(TD, lifetime, now=now)
    return pki.to_pem(cert)


def der_sha256(*pems: bytes, tmp_path: pathlib.Path) -> str:
    """sha256 of the sorted DER encodings, the DER as openssl writes it."""
    ders = []
    for i, pem in enumerate(pems):
        path = tmp_path / f"{i}.pem"
        path.write_bytes(pem)
        ders.append(
            subprocess.run(
                ["openssl", "x509", "-in", str(path), "-outform", "DER"],
                check=True,
                capture_output=True,
            ).stdout
        )
    return "sha256:" + hashlib.sha256(b"".join(sorted(ders))).hexdigest()


# -- the fingerprint ---------------------------------------------------------------------------


def test_the_fingerprint_of_one_anchor_is_its_der_sha256(tmp_path: pathlib.Path) -> None:
    a = anchor()
    path = tmp_path / "a.pem"
    path.write_bytes(a)
    der = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-outform", "DER"], check=True, capture_output=True
    ).stdout
    expected = subprocess.run(
        ["openssl", "dgst", "-sha256", "-r"], input=der, check=True, capture_output=True
    ).stdout.split()[0]
    assert trustbundle.fingerprint(pki.load_certificates(a)) == f"sha256:{expected.decode()}"


def test_the_fingerprint_is_of_the_set_of_anchors(tmp_path: pathlib.Path) -> None:
    a, b = anchor(), anchor()
    ab = trustbundle.fingerprint(pki.load_certificates(a + b))
    assert ab == der_sha256(a, b, tmp_path=tmp_path)
    assert trustbundle.fingerprint(pki.load_certificates(b + a)) == ab  # order does not matter
    assert trustbundle.fingerprint(pki.load_certificates(a + b + a)) == ab  # nor a duplicate
    assert trustbundle.fingerprint(pki.load_certificates(a)) != ab
    assert trustbundle.load(b + a, "test").fingerprint == ab


def test_a_certificate_fingerprint_is_its_der_sha256(tmp_path: pathlib.Path) -> None:
    a = anchor()
    (cert,) = pki.load_certificates(a)
    assert trustbundle.certificate_fingerprint(cert) == der_sha256(a, tmp_path=tmp_path)


# -- what a usable bundle is -------------------------------------------------------------------


def leaf_pem() -> bytes:
    root, root_key = pki.new_trust_anchor(TD, DAY)
    cert, key = pki.new_issuer(root, root_key, TD, DAY)
    issuer = pki.Issuer(certificate=cert, key=key)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    return pki.to_pem(pki.sign_leaf(issuer, leaf_key.public_key(), pki.Identity("apps", "web", TD)))


def test_a_usable_bundle_describes_its_anchors() -> None:
    a, b = anchor(), anchor(lifetime=2 * DAY)
    bundle = trustbundle.load(a + b, "test")
    assert bundle.pem == a + b
    described = bundle.describe()
    assert [d.subject for d in described] == ["CN=root.identity.meshward.cluster.local"] * 2
    certs = pki.load_certificates(a + b)
    assert [d.not_after for d in described] == [c.not_valid_after_utc for c in certs]
    assert described[0].fingerprint != described[1].fingerprint


def test_an_expired_anchor_beside_a_current_one_is_usable() -> None:
    expired = anchor(ago=datetime.timedelta(days=10))
    assert len(trustbundle.load(expired + anchor(), "test").anchors) == 2


@pytest.mark.parametrize(
    ("pem", "says"),
    [
        (b"", "the bundle is empty: it must hold the trust anchors as PEM 'CERTIFICATE' blocks"),
        (b" \n", "the bundle is empty"),
        (b"garbage", "the bundle is not a PEM certificate bundle"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "is not a PEM"),
        (None, "which is not a CA (basicConstraints CA=false): a trust bundle holds only CA"),
        (b"expired", "every anchor has expired"),
    ],
    ids=["empty", "blank", "garbage", "corrupt", "leaf", "expired"],
)
def test_an_unusable_bundle_says_why(pem: bytes | None, says: str) -> None:
    if pem is None:
        pem = anchor() + leaf_pem()  # one leaf spoils the bundle: it would be trusted as a root
    elif pem == b"expired":
        pem = anchor(ago=datetime.timedelta(days=10)) + anchor(ago=datetime.timedelta(days=5))
    with pytest.raises(errors.InvalidTrustBundle) as caught:
        trustbundle.load(pem, "the bundle")
    assert says in str(caught.value)


# -- renew-leaves-before -----------------------------------------------------------------------

UTC = datetime.UTC


@pytest.mark.parametrize(
    ("text", "at"),
    [
        ("2026-11-24T10:00:00Z", datetime.datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24t10:00:00z\n", datetime.datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24 10:00:00+00:00", datetime.datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24T12:30:00+02:30", datetime.datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24T05:00:00-05:00", datetime.datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24T10:00:00.5Z", datetime.datetime(2026, 11, 24, 10, 0, 0, 500000, tzinfo=UTC)),
        ("2026-11-24T10:00:00.123456789Z", datetime.datetime(2026, 11, 24, 10, 0, 0, 123456, UTC)),
        ("2016-12-31T23:59:60Z", datetime.datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_renew_before_reads_rfc_3339(text: str, at: datetime.datetime) -> None:
    parsed = trustbundle.parse_renew_before(text)
    assert parsed == at
    assert parsed.utcoffset() == datetime.timedelta(0)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is not an RFC 3339 time with an offset, e.g. 2026-11-24T10:00:00Z"),
        ("2026-11-24T10:00:00", "with an offset"),  # no offset: whose 10 o'clock?
        ("2026-11-24", "is not an RFC 3339 time"),
        ("1764000000", "is not an RFC 3339 time"),
        ("next tuesday", "is not an RFC 3339 time"),
        ("2026-11-24T10:00Z", "is not an RFC 3339 time"),
        ("2026-02-30T10:00:00Z", "is not a real date and time"),
        ("2026-11-24T25:00:00Z", "is not a real date and time"),
        ("2026-11-24T10:00:00+24:00", "is not a valid UTC offset"),
    ],
)
def test_a_malformed_renew_before_says_what_to_write(text: str, says: str) -> None:
    with pytest.raises(errors.InvalidTrustBundle) as caught:
        trustbundle.parse_renew_before(text)
    assert says in str(caught.value)


def test_renew_before_round_trips() -> None:
    at = datetime.datetime(2026, 11, 24, 10, 0, 0, 250000, tzinfo=UTC)
    text = trustbundle.format_renew_before(at)
    assert text == "2026-11-24T10:00:00.250000Z"
    assert trustbundle.parse_renew_before(text) == at
    with pytest.raises(ValueError, match="timezone-aware"):
        trustbundle.format_renew_before(at.replace(tzinfo=None))


# -- the proxy following the mounted ConfigMap -------------------------------------------------


class Followed:
    """TrustRoots on a kubelet-style volume, recording what it hands on."""

    def __init__(self, tmp_path: pathlib.Path, initial: bytes) -> None:
        self.volume = ConfigMapVolume(tmp_path / "trust-roots")
        self.volume.write({"ca-bundle.crt": initial.decode()})
        self.metrics = metrics.Metrics()
        self.bundles: list[trustbundle.Bundle] = []
        self.renew: list[datetime.datetime] = []
        self.roots = trust_roots.TrustRoots(
            trustbundle.load(initial, "test"),
            self.volume.directory / "ca-bundle.crt",
            on_bundle=self.bundles.append,
            on_renew_before=self.renew.append,
            metrics=self.metrics,
            interval=0.05,
        )

    def sample(self, name: str, **labels: str) -> float | None:
        families = parser.text_string_to_metric_families(self.metrics.exposition().decode())
        for family in families:
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return None

    def info(self) -> list[str]:
        families = parser.text_string_to_metric_families(self.metrics.exposition().decode())
        return [
            s.labels["fingerprint"]
            for family in families
            for s in family.samples
            if s.name == "identity_trust_bundle_info" and s.value == 1
        ]


def fp(pem: bytes) -> str:
    return trustbundle.fingerprint(pki.load_certificates(pem))


def test_an_unchanged_mount_reloads_nothing(tmp_path: pathlib.Path) -> None:
    a = anchor()
    followed = Followed(tmp_path, a)
    followed.roots.poll()
    followed.volume.write({"ca-bundle.crt": a.decode()})  # a swap with the same bundle
    followed.roots.poll()
    assert followed.bundles == [] and followed.renew == []
    assert followed.info() == [fp(a)]
    assert followed.sample("identity_trust_bundle_reloads_total", result="ok") == 0
    assert followed.sample("identity_trust_bundle_reloads_total", result="invalid") == 0


def test_a_new_bundle_is_handed_on_and_reported(tmp_path: pathlib.Path) -> None:
    a, b = anchor(), anchor()
    followed = Followed(tmp_path, a)
    followed.roots.poll()
    followed.volume.write({"ca-bundle.crt": (a + b).decode()})
    followed.roots.poll()
    followed.roots.poll()  # seen once, handed on once
    assert [bundle.fingerprint for bundle in followed.bundles] == [fp(a + b)]
    assert followed.roots.current.pem == a + b
    assert followed.info() == [fp(a + b)]  # the old fingerprint's series is gone
    assert followed.sample("identity_trust_bundle_reloads_total", result="ok") == 1
    followed.volume.write({"ca-bundle.crt": b.decode()})
    followed.roots.poll()
    assert [bundle.fingerprint for bundle in followed.bundles] == [fp(a + b), fp(b)]
    assert followed.sample("identity_trust_bundle_reloads_total", result="ok") == 2


def test_a_file_rewritten_in_place_is_seen(tmp_path: pathlib.Path) -> None:
    """Not how the kubelet writes, but a hand-edited file must not be missed either."""
    a, b = anchor(), anchor()
    target = tmp_path / "static" / "ca-bundle.crt"
    target.parent.mkdir()
    target.write_bytes(a)
    seen: list[trustbundle.Bundle] = []
    roots = trust_roots.TrustRoots(
        trustbundle.load(a, "test"),
        target,
        on_bundle=seen.append,
        on_renew_before=lambda _: None,
        metrics=metrics.Metrics(),
    )
    roots.poll()
    target.write_bytes(a + b)
    roots.poll()
    assert [bundle.fingerprint for bundle in seen] == [fp(a + b)]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("garbage", "is not a PEM certificate bundle"),
        ("", "is empty"),
        (None, "which is not a CA"),
        (b"expired", "every anchor has expired"),
        (False, "it is missing"),
    ],
    ids=["garbage", "empty", "leaf", "expired", "missing"],
)
def test_an_invalid_bundle_is_refused_and_the_old_one_kept(
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    content: str | bytes | bool | None,
    says: str,
) -> None:
    a = anchor()
    followed = Followed(tmp_path, a)
    followed.roots.poll()
    if content is None:
        followed.volume.write({"ca-bundle.crt": (a + leaf_pem()).decode()})
    elif content == b"expired":
        followed.volume.write({"ca-bundle.crt": anchor(ago=datetime.timedelta(days=5)).decode()})
    elif content is False:
        followed.volume.write({"other-key": "x"})  # the key left the ConfigMap
    else:
        assert isinstance(content, str)
        followed.volume.write({"ca-bundle.crt": content})
    with caplog.at_level(logging.ERROR, logger="meshward.proxy.trust_roots"):
        followed.roots.poll()
        followed.roots.poll()  # refused once, counted once
    assert followed.bundles == []
    assert followed.roots.current.pem == a
    assert followed.info() == [fp(a)]
    assert followed.sample("identity_trust_bundle_reloads_total", result="invalid") == 1
    (record,) = caplog.records
    message = record.getMessage()
    assert str(followed.volume.directory / "ca-bundle.crt") in message
    assert f"refused, keeping {fp(a)}" in message
    assert says in message
    # Fixed: taken at once.
    b = anchor()
    followed.volume.write({"ca-bundle.crt": (a + b).decode()})
    followed.roots.poll()
    assert [bundle.fingerprint for bundle in followed.bundles] == [fp(a + b)]


def test_renew_leaves_before_is_handed_on_once_per_value(tmp_path: pathlib.Path) -> None:
    a = anchor()
    followed = Followed(tmp_path, a)
    followed.volume.write(
        {"ca-bundle.crt": a.decode(), "renew-leaves-before": "2026-11-24T10:00:00Z"}
    )
    followed.roots.poll()
    followed.roots.poll()
    first = datetime.datetime(2026, 11, 24, 10, tzinfo=UTC)
    assert followed.renew == [first]
    assert followed.roots.renew_before == first
    followed.volume.write(
        {"ca-bundle.crt": a.decode(), "renew-leaves-before": "2026-11-24T10:00:00Z"}
    )  # another swap, same request
    followed.roots.poll()
    followed.volume.write(
        {"ca-bundle.crt": a.decode(), "renew-leaves-before": "2026-11-25T08:00:00+01:00"}
    )
    followed.roots.poll()
    assert followed.renew == [first, datetime.datetime(2026, 11, 25, 7, tzinfo=UTC)]
    assert followed.bundles == []  # the bundle did not change
    followed.volume.write({"ca-bundle.crt": a.decode()})
    followed.roots.poll()
    assert followed.roots.renew_before is None


def test_a_malformed_renew_leaves_before_is_logged_and_ignored(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = anchor()
    followed = Followed(tmp_path, a)
    followed.volume.write({"ca-bundle.crt": a.decode(), "renew-leaves-before": "tomorrow"})
    with caplog.at_level(logging.WARNING, logger="meshward.proxy.trust_roots"):
        followed.roots.poll()
        followed.roots.poll()
    assert followed.renew == []
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "renew-leaves-before ignored: 'tomorrow' is not an RFC 3339 time" in message
    assert followed.sample("identity_trust_bundle_reloads_total", result="invalid") == 0


async def test_it_follows_the_mount_while_running(tmp_path: pathlib.Path) -> None:
    a, b = anchor(), anchor()
    followed = Followed(tmp_path, a)
    task = asyncio.get_running_loop().create_task(followed.roots.run())
    try:
        await asyncio.sleep(0.1)
        followed.volume.write({"ca-bundle.crt": (a + b).decode()})
        for _ in range(100):
            if followed.bundles:
                break
            await asyncio.sleep(0.02)
        assert [bundle.fingerprint for bundle in followed.bundles] == [fp(a + b)]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_without_a_file_the_anchors_are_fixed() -> None:
    a = anchor()
    roots = trust_roots.TrustRoots(
        trustbundle.load(a, "test"),
        None,
        on_bundle=lambda _: None,
        on_renew_before=lambda _: None,
        metrics=metrics.Metrics(),
    )
    await asyncio.wait_for(roots.run(), 1)  # nothing to follow: returns
    assert roots.current.pem == a and roots.renew_file is None


def test_a_bundle_that_can_not_be_put_into_effect_is_not_reported(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator removes the old anchor once every proxy reports the new bundle, so a proxy
    must not report one its TLS contexts did not take."""
    a, b = anchor(), anchor()
    followed = Followed(tmp_path, a)

    def refuse(bundle: trustbundle.Bundle) -> None:
        raise errors.ConfigError("the TLS library refused it")

    followed.roots = trust_roots.TrustRoots(
        trustbundle.load(a, "test"),
        followed.volume.directory / "ca-bundle.crt",
        on_bundle=refuse,
        on_renew_before=followed.renew.append,
        metrics=followed.metrics,
    )
    followed.volume.write({"ca-bundle.crt": (a + b).decode()})
    with caplog.at_level(logging.ERROR, logger="meshward.proxy.trust_roots"):
        followed.roots.poll()
    assert followed.roots.current.pem == a
    assert followed.info() == [fp(a)]
    assert followed.sample("identity_trust_bundle_reloads_total", result="invalid") == 1
    assert "could not be put into effect (the TLS library refused it)" in caplog.text
