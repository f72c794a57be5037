"""Proxy injection without a cluster: the rules, the exact containers and volumes, idempotence,
the injector's settings, and ``meshward inject`` on manifest files."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import pathlib
import re
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from meshward import cli, errors, inject
from meshward.identity import pki
from meshward.operator import _settings
from meshward.proxy import settings as proxy_settings
from tests import test_bundle

AT = "2026-11-24T10:00:00Z"
SETTINGS = inject.Settings.defaults("cluster.local", "1.2.3")
ENABLED = {inject.INJECT_ANNOTATION: "enabled"}
DISABLED = {inject.INJECT_ANNOTATION: "disabled"}


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A Pod with an application container that has its own probes."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-0", "annotations": dict(annotations or {})},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                    "livenessProbe": {"httpGet": {"path": "/live", "port": 8080}},
                }
            ],
            **spec,
        },
    }


def injected(p: dict[str, Any], namespace: dict[str, str] | None = None) -> dict[str, Any]:
    result = inject.inject(p, ENABLED if namespace is None else namespace, SETTINGS, AT)
    assert isinstance(result, inject.Injected), result
    return result.pod


def skipped(p: dict[str, Any], namespace: dict[str, str]) -> str:
    result = inject.inject(p, namespace, SETTINGS, AT)
    assert isinstance(result, inject.Skipped), result
    return result.reason


def container(p: dict[str, Any], name: str, key: str = "containers") -> dict[str, Any]:
    (found,) = [c for c in p["spec"][key] if c["name"] == name]
    return found


# -- when ---------------------------------------------------------------------------------


def test_the_namespace_annotation_enables_injection() -> None:
    out = injected(pod(), ENABLED)
    assert [c["name"] for c in out["spec"]["containers"]] == ["meshward-proxy", "app"]
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["meshward-init"]


def test_the_pod_annotation_wins_over_the_namespace() -> None:
    assert injected(pod(ENABLED), DISABLED)["metadata"]["annotations"][
        inject.VERSION_ANNOTATION
    ] == ("1.2.3")
    assert skipped(pod(DISABLED), ENABLED) == "the pod is annotated meshward.io/inject: disabled"


def test_nothing_enabled_leaves_the_pod_alone_and_says_how_to_enable() -> None:
    assert "annotate the pod or its namespace meshward.io/inject: enabled" in skipped(pod(), {})
    assert skipped(pod(), DISABLED) == "the namespace is annotated meshward.io/inject: disabled"


@pytest.mark.parametrize(
    ("pod_notes", "ns_notes", "where"),
    [
        ({inject.INJECT_ANNOTATION: "true"}, ENABLED, "the pod's annotation"),
        ({inject.INJECT_ANNOTATION: "Enabled"}, {}, "the pod's annotation"),
        ({}, {inject.INJECT_ANNOTATION: "yes"}, "the namespace's annotation"),
    ],
)
def test_an_unknown_value_is_refused_with_the_fix(
    pod_notes: dict[str, str], ns_notes: dict[str, str], where: str
) -> None:
    with pytest.raises(errors.InjectionError) as exc:
        inject.inject(pod(pod_notes), ns_notes, SETTINGS, AT)
    message = str(exc.value)
    assert message.startswith(f"{where} meshward.io/inject is ")
    assert "set it to 'enabled' or 'disabled'" in message


def test_an_explicit_pod_value_does_not_need_a_valid_namespace_value() -> None:
    assert skipped(pod(DISABLED), {inject.INJECT_ANNOTATION: "bogus"}).endswith("disabled")
    injected(pod(ENABLED), {inject.INJECT_ANNOTATION: "bogus"})


def test_host_network_pods_are_left_alone() -> None:
    reason = skipped(pod(ENABLED, hostNetwork=True), ENABLED)
    assert reason.startswith("hostNetwork pod")


def test_injected_pods_are_left_alone() -> None:
    once = injected(pod())
    assert skipped(once, ENABLED) == "already injected (annotation meshward.io/proxy-version)"
    by_hand = pod()
    by_hand["spec"]["containers"].append({"name": "meshward-proxy", "image": "x"})
    assert skipped(by_hand, ENABLED).startswith("already injected (it has a container named")


def test_injecting_twice_equals_injecting_once() -> None:
    once = injected(pod())
    again, reports = inject.inject_object(once, SETTINGS, "2030-01-01T00:00:00Z")
    assert again == once
    assert [r.injected for r in reports] == [False]


def test_the_input_is_not_modified() -> None:
    original = pod(ENABLED)
    before = copy.deepcopy(original)
    injected(original)
    assert original == before


# -- what ---------------------------------------------------------------------------------


def test_the_proxy_container_exactly() -> None:
    proxy = container(injected(pod()), "meshward-proxy")
    assert proxy == {
        "name": "meshward-proxy",
        "image": "ghcr.io/meshward/meshward:1.2.3",
        "command": ["meshward", "proxy"],
        "env": [
            {
                "name": "MESHWARD_PROXY_IDENTITY_DIR",
                "value": "/var/run/meshward/identity/end-entity",
            },
            {
                "name": "MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS_FILE",
                "value": "/var/run/meshward/trust-roots/ca-bundle.crt",
            },
            {
                "name": "MESHWARD_PROXY_IDENTITY_TOKEN_FILE",
                "value": "/var/run/secrets/tokens/meshward-identity-token",
            },
            {
                "name": "_pod_sa",
                "valueFrom": {
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "spec.serviceAccountName"}
                },
            },
            {
                "name": "_pod_ns",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}},
            },
            {
                "name": "MESHWARD_PROXY_IDENTITY_LOCAL_NAME",
                "value": "$(_pod_sa).$(_pod_ns).serviceaccount.identity.meshward.cluster.local",
            },
            {
                "name": "MESHWARD_PROXY_IDENTITY_SVC_ADDR",
                "value": "meshward-identity.meshward.svc:8080",
            },
            {
                "name": "MESHWARD_PROXY_IDENTITY_SVC_NAME",
                "value": "meshward-identity.meshward.serviceaccount.identity.meshward"
                ".cluster.local",
            },
            {
                "name": "MESHWARD_PROXY_POLICY_SVC_ADDR",
                "value": "meshward-policy.meshward.svc:8090",
            },
            {
                "name": "MESHWARD_PROXY_POLICY_SVC_NAME",
                "value": "meshward-policy.meshward.serviceaccount.identity.meshward.cluster.local",
            },
            {
                "name": "MESHWARD_PROXY_POD_NAME",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
            },
            {"name": "MESHWARD_PROXY_INBOUND_LISTEN_ADDR", "value": "0.0.0.0:4143"},
            {"name": "MESHWARD_PROXY_OUTBOUND_LISTEN_ADDR", "value": "127.0.0.1:4140"},
            {"name": "MESHWARD_PROXY_ADMIN_LISTEN_ADDR", "value": "0.0.0.0:4191"},
        ],
        "ports": [
            {"name": "meshward-proxy", "containerPort": 4143, "protocol": "TCP"},
            {"name": "meshward-admin", "containerPort": 4191, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 4191}, "initialDelaySeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/live", "port": 4191}, "initialDelaySeconds": 10},
        "resources": {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            "runAsUser": 2102,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {
                "name": "meshward-identity-end-entity",
                "mountPath": "/var/run/meshward/identity/end-entity",
            },
            {
                "name": "meshward-identity-token",
                "mountPath": "/var/run/secrets/tokens",
                "readOnly": True,
            },
            {
                "name": "meshward-trust-roots",
                "mountPath": "/var/run/meshward/trust-roots",
                "readOnly": True,
            },
        ],
    }


def expand(env: list[dict[str, Any]], pod_fields: dict[str, str]) -> dict[str, str]:
    """The environment as the kubelet would give it: fieldRefs resolved, and ``$(VAR)``
    replaced by variables defined earlier in the list (later ones stay as is)."""
    out: dict[str, str] = {}
    for var in env:
        if "value" in var:
            value = re.sub(r"\$\((\w+)\)", lambda m: out.get(m[1], m[0]), var["value"])
        else:
            value = pod_fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        out[var["name"]] = value
    return out


def test_the_proxy_accepts_the_environment_it_is_given(tmp_path: pathlib.Path) -> None:
    """What Kubernetes makes of the injected environment is a valid proxy configuration,
    with the pod's own identity (the mounts are stood in for by temporary paths)."""
    anchor, _ = pki.new_trust_anchor("cluster.local", datetime.timedelta(days=1))
    injected_pod = injected(pod())
    proxy = container(injected_pod, "meshward-proxy")
    env = expand(
        proxy["env"],
        {
            "spec.serviceAccountName": "web",
            "metadata.namespace": "emojivoto",
            "metadata.name": "web-0",
        },
    )
    identity_dir, token = tmp_path / "identity", tmp_path / "token"
    identity_dir.mkdir()
    token.write_text("not-a-real-token")
    mounts = {m["mountPath"]: m for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in injected_pod["spec"]["volumes"]}
    assert mounts[env[proxy_settings.IDENTITY_DIR]]["name"] == inject.IDENTITY_VOLUME
    token_dir, _, token_name = env[proxy_settings.TOKEN_FILE].rpartition("/")
    assert (mounts[token_dir]["name"], token_name) == (inject.TOKEN_VOLUME, inject.TOKEN_VOLUME)
    # The trust bundle is the ca-bundle.crt key of the namespace's trust-roots ConfigMap,
    # mounted read-only (the proxy only reads it).
    roots_dir, _, roots_key = env[proxy_settings.TRUST_ANCHORS_FILE].rpartition("/")
    roots_mount = mounts[roots_dir]
    assert roots_mount["readOnly"] is True
    assert volumes[roots_mount["name"]]["configMap"]["name"] == "meshward-identity-trust-roots"
    assert roots_key == "ca-bundle.crt"
    pem = pki.to_pem(anchor).decode()
    test_bundle.ConfigMapVolume(tmp_path / "trust-roots").write({roots_key: pem})
    env[proxy_settings.IDENTITY_DIR] = str(identity_dir)
    env[proxy_settings.TOKEN_FILE] = str(token)
    env[proxy_settings.TRUST_ANCHORS_FILE] = str(tmp_path / "trust-roots" / roots_key)

    settings = proxy_settings.from_env(env)
    assert settings.trust_anchors_file == tmp_path / "trust-roots" / "ca-bundle.crt"
    assert settings.trust_anchors == pem.encode()
    assert settings.local_name == "web.emojivoto.serviceaccount.identity.meshward.cluster.local"
    assert settings.namespace == "emojivoto"
    assert settings.pod_name == "web-0"
    assert str(settings.identity_svc_addr) == "meshward-identity.meshward.svc:8080"
    assert str(settings.policy_svc_addr) == "meshward-policy.meshward.svc:8090"
    assert (str(settings.inbound), str(settings.outbound), str(settings.admin)) == (
        "0.0.0.0:4143",
        "127.0.0.1:4140",
        "0.0.0.0:4191",
    )


def test_the_volumes_exactly() -> None:
    out = injected(pod(volumes=[{"name": "data", "emptyDir": {}}]))
    assert out["spec"]["volumes"] == [
        {"name": "data", "emptyDir": {}},
        {
            "name": "meshward-identity-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": "identity.meshward.io",
                            "expirationSeconds": 86400,
                            "path": "meshward-identity-token",
                        }
                    }
                ]
            },
        },
        {"name": "meshward-identity-end-entity", "emptyDir": {"medium": "Memory"}},
        {"name": "meshward-trust-roots", "configMap": {"name": "meshward-identity-trust-roots"}},
        {"name": "meshward-init-xtables-lock", "emptyDir": {}},
    ]


def test_the_init_container_exactly_and_last() -> None:
    app_init = {"name": "migrate", "image": "registry.invalid/migrate:1"}
    out = injected(pod(initContainers=[app_init]))
    assert out["spec"]["initContainers"][0] == app_init
    assert out["spec"]["initContainers"][1] == {
        "name": "meshward-init",
        "image": "ghcr.io/meshward/meshward:1.2.3",
        "command": [
            "meshward",
            "proxy-init",
            "--inbound-port",
            "4143",
            "--outbound-port",
            "4140",
            "--proxy-uid",
            "2102",
            "--skip-inbound-ports",
            "4191",
        ],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "meshward-init-xtables-lock", "mountPath": "/run"}],
    }


def test_skip_ports_and_other_settings_reach_the_containers() -> None:
    settings = inject.Settings(
        **{
            **SETTINGS.__dict__,
            "image": "registry.example/meshward:dev",
            "proxy_uid": 1337,
            "skip_inbound_ports": (22, 4191),
            "skip_outbound_ports": (443, 25),
            "memory_limit": "1Gi",
        }
    )
    result = inject.inject(pod(), ENABLED, settings, AT)
    assert isinstance(result, inject.Injected)
    init = container(result.pod, "meshward-init", "initContainers")
    assert init["command"][2:] == [
        "--inbound-port",
        "4143",
        "--outbound-port",
        "4140",
        "--proxy-uid",
        "1337",
        "--skip-inbound-ports",
        "22,4191",
        "--skip-outbound-ports",
        "25,443",
    ]
    proxy = container(result.pod, "meshward-proxy")
    assert proxy["image"] == init["image"] == "registry.example/meshward:dev"
    assert proxy["securityContext"]["runAsUser"] == 1337
    assert proxy["resources"]["limits"] == {"memory": "1Gi"}


def test_annotations_and_the_application_untouched() -> None:
    original = pod({"team": "web"})
    out = injected(original)
    assert out["metadata"]["annotations"] == {
        "team": "web",
        "meshward.io/proxy-version": "1.2.3",
        "meshward.io/injected-at": AT,
        "kubectl.kubernetes.io/default-container": "app",
    }
    assert container(out, "app") == container(original, "app")
    chosen = injected(pod({"kubectl.kubernetes.io/default-container": "sidecar"}))
    assert chosen["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == (
        "sidecar"
    )


def test_a_template_without_metadata_gets_it() -> None:
    template = {"spec": {"containers": [{"name": "app", "image": "x"}]}}
    out = injected(template)
    assert out["metadata"]["annotations"][inject.INJECTED_AT_ANNOTATION] == AT


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p["spec"]["containers"][0]["ports"].append({"containerPort": 4191}),
            "container 'app' declares port 4191, which the meshward proxy listens on",
        ),
        (
            lambda p: p["spec"].update(securityContext={"runAsUser": 2102}),
            "container 'app' runs as UID 2102, the proxy's UID, so its traffic would bypass",
        ),
        (
            lambda p: p["spec"].update(volumes=[{"name": "meshward-identity-token"}]),
            "volume name 'meshward-identity-token' is reserved for the meshward proxy",
        ),
        (
            lambda p: p["spec"].update(initContainers=[{"name": "meshward-init"}]),
            "init container name 'meshward-init' is reserved for meshward",
        ),
        (lambda p: p["spec"].update(containers=[]), "spec.containers is empty"),
        (lambda p: p["spec"].update(containers="app"), "spec.containers must be a list"),
        (lambda p: p.update(spec=["app"]), "spec is a list, not a mapping"),
    ],
)
def test_pods_the_proxy_would_break_are_refused(change: Any, message: str) -> None:
    p = pod(ENABLED)
    change(p)
    with pytest.raises(errors.InjectionError, match=re.escape(message)):
        inject.inject(p, {}, SETTINGS, AT)


def test_a_container_running_as_another_user_than_the_pod_is_fine() -> None:
    p = pod(securityContext={"runAsUser": 2102})
    p["spec"]["containers"][0]["securityContext"] = {"runAsUser": 1000}
    injected(p)


def test_the_namespace_selector() -> None:
    assert inject.namespace_selector(["meshward", "kube-system", "meshward"]) == {
        "matchExpressions": [
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": ["kube-system", "meshward"],
            }
        ]
    }


# -- settings -------------------------------------------------------------------------------


def test_injector_settings_default_to_the_control_plane_in_namespace_meshward() -> None:
    settings = _settings.injector_from_env({"MESHWARD_TRUST_DOMAIN": "example.org"})
    version = inject.package_version()
    assert settings.image == f"ghcr.io/meshward/meshward:{version}"
    assert settings.version == version
    assert settings.identity_svc_addr == "meshward-identity.meshward.svc:8080"
    assert settings.identity_svc_name == (
        "meshward-identity.meshward.serviceaccount.identity.meshward.example.org"
    )
    assert settings.policy_svc_name == (
        "meshward-policy.meshward.serviceaccount.identity.meshward.example.org"
    )
    assert (settings.proxy_uid, settings.skip_inbound_ports) == (2102, ())


def test_injector_settings_from_the_environment() -> None:
    settings = _settings.injector_from_env(
        {
            "MESHWARD_INJECT_PROXY_IMAGE": "registry.example/proxy:2",
            "MESHWARD_INJECT_PROXY_UID": "3000",
            "MESHWARD_INJECT_IDENTITY_SVC_ADDR": "identity.mesh.svc:9000",
            "MESHWARD_INJECT_POLICY_SVC_NAME": "policy.example",
            "MESHWARD_INJECT_PROXY_MEMORY_LIMIT": "512Mi",
            "MESHWARD_INJECT_SKIP_OUTBOUND_PORTS": "443, 25,443",
        }
    )
    assert settings.image == "registry.example/proxy:2"
    assert settings.proxy_uid == 3000
    assert settings.identity_svc_addr == "identity.mesh.svc:9000"
    assert settings.policy_svc_name == "policy.example"
    assert settings.memory_limit == "512Mi"
    assert settings.skip_outbound_ports == (25, 443)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("MESHWARD_INJECT_PROXY_UID", "0"),
        ("MESHWARD_INJECT_PROXY_UID", "proxy"),
        ("MESHWARD_INJECT_IDENTITY_SVC_ADDR", "meshward-identity"),
        ("MESHWARD_INJECT_POLICY_SVC_ADDR", "policy:99999"),
        ("MESHWARD_INJECT_IDENTITY_SVC_NAME", "Not_A_Name"),
        ("MESHWARD_INJECT_PROXY_CPU_REQUEST", "lots"),
        ("MESHWARD_INJECT_SKIP_INBOUND_PORTS", "22,ssh"),
        ("MESHWARD_INJECT_PROXY_IMAGE", "two words"),
        ("MESHWARD_TRUST_DOMAIN", "Cluster.Local"),
    ],
)
def test_a_bad_injector_setting_names_its_variable(var: str, value: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        _settings.injector_from_env({var: value})
    assert str(exc.value).startswith(f"{var}={value!r} is not valid: expected ")


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("MESHWARD_INJECT_SKIP_INBOUND_PORTS", "80,4143", "covers the inbound port 4143"),
        ("MESHWARD_INJECT_SKIP_OUTBOUND_PORTS", "4140", "covers the outbound port 4140"),
    ],
)
def test_settings_proxy_init_would_refuse_are_refused_up_front(
    var: str, value: str, says: str
) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        _settings.injector_from_env({var: value})
    assert "init container of every injected pod would fail" in str(exc.value)
    assert says in str(exc.value)


def test_operator_flags_set_the_injector_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _settings.INJECT_ENV.values():
        monkeypatch.setenv(var, "")  # restored afterwards: the flags write the environment
    for var in _settings.ENV.values():
        monkeypatch.delenv(var, raising=False)
    args = cli.build_parser().parse_args(
        ["operator", "--proxy-image", "registry.example/p:3", "--skip-inbound-ports", "22"]
    )
    _settings.apply_arguments(args)
    config = _settings.from_env()
    assert config.injector.image == "registry.example/p:3"
    assert config.injector.skip_inbound_ports == (22,)


# -- manifests ------------------------------------------------------------------------------

CONTAINERS = [{"name": "app", "image": "registry.invalid/app:1"}]


def workload(kind: str, name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    template = {"metadata": {"annotations": annotations or {}}, "spec": {"containers": CONTAINERS}}
    if kind == "CronJob":
        spec: dict[str, Any] = {
            "schedule": "@daily",
            "jobTemplate": {"spec": {"template": template}},
        }
    else:
        spec = {"template": template}
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("kind", sorted(inject.TEMPLATE_PATHS))
def test_every_workload_kind_has_its_template_injected(kind: str) -> None:
    obj = workload(kind, "w")
    out, reports = inject.inject_object(obj, SETTINGS, AT)
    template = out
    for key in inject.TEMPLATE_PATHS[kind]:
        template = template[key]
    assert [c["name"] for c in template["spec"]["containers"]] == ["meshward-proxy", "app"]
    assert out["metadata"] == obj["metadata"]
    assert [str(r) for r in reports] == [f"{kind.lower()}/w injected"]


def test_other_kinds_pass_through() -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {}}
    out, reports = inject.inject_object(service, SETTINGS, AT)
    assert out == service
    assert [str(r) for r in reports] == ["service/web skipped: not a workload with pods"]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (["a"], "document 3 is not a Kubernetes object"),
        ({"apiVersion": "v1"}, "document 3 is not a Kubernetes object"),
        (
            {"kind": "Deployment", "metadata": {"name": "web"}, "spec": {}},
            "document 3 (deployment/web) has no pod template at spec.template",
        ),
        (
            {"kind": "List", "items": [{"kind": "Pod", "metadata": {"name": "p"}}]},
            "document 3, item 1 (pod/p): spec.containers is empty",
        ),
        (
            workload("Deployment", "web", {inject.INJECT_ANNOTATION: "on"}),
            "document 3 (deployment/web): the pod's annotation meshward.io/inject is 'on'",
        ),
    ],
)
def test_bad_objects_are_named_in_the_error(obj: Any, message: str) -> None:
    with pytest.raises(errors.InjectionError, match=re.escape(message)):
        inject.inject_object(obj, SETTINGS, AT, "document 3")


MANIFEST = textwrap.dedent("""
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: web, namespace: emojivoto}
    spec:
      selector: {matchLabels: {app: web}}
      template:
        metadata: {labels: {app: web}}
        spec:
          containers: [{name: web, image: registry.invalid/web:1}]
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: debug}
    spec:
      containers: [{name: shell, image: registry.invalid/shell:1}]
    ---
    # an empty document is dropped
    ---
    apiVersion: v1
    kind: List
    items:
    - apiVersion: v1
      kind: Service
      metadata: {name: web}
      spec: {ports: [{port: 80}]}
    - apiVersion: batch/v1
      kind: Job
      metadata: {name: migrate}
      spec:
        template:
          metadata: {annotations: {meshward.io/inject: disabled}}
          spec: {containers: [{name: m, image: registry.invalid/m:1}], restartPolicy: Never}
    - apiVersion: apps/v1
      kind: DaemonSet
      metadata: {name: node-agent}
      spec:
        template:
          spec:
            hostNetwork: true
            containers: [{name: agent, image: registry.invalid/agent:1}]
""")


@dataclasses.dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def meshward(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Run]:
    """Run the ``meshward`` command in this process (as its entry point does), feeding
    ``input`` on standard input and setting ``env`` on top of the environment."""

    def run(*args: str, input: str = "", env: dict[str, str] | None = None) -> Run:
        with monkeypatch.context() as m:
            for var, value in (env or {}).items():
                m.setenv(var, value)
            m.setattr(sys, "stdin", io.StringIO(input))
            capsys.readouterr()
            code = cli.main(list(args))
            out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


def test_meshward_inject_a_multi_document_file(
    tmp_path: pathlib.Path, meshward: Callable[..., Run]
) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(MANIFEST)
    proc = meshward("inject", "-f", str(path), "--skip-outbound-ports", "25")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "deployment/web injected",
        "pod/debug injected",
        "service/web skipped: not a workload with pods",
        "job/migrate skipped: the pod is annotated meshward.io/inject: disabled",
        "daemonset/node-agent skipped: hostNetwork pod: redirecting its traffic would rewrite "
        "the node's own network",
    ]
    deployment, debug, listing = yaml.safe_load_all(proc.stdout)
    original_deployment, original_debug, _, original_list = yaml.safe_load_all(MANIFEST)
    template = deployment["spec"]["template"]
    assert [c["name"] for c in template["spec"]["containers"]] == ["meshward-proxy", "web"]
    assert template["spec"]["initContainers"][0]["command"][-2:] == ["--skip-outbound-ports", "25"]
    assert template["metadata"]["labels"] == {"app": "web"}
    assert deployment["metadata"] == original_deployment["metadata"]
    at = template["metadata"]["annotations"][inject.INJECTED_AT_ANNOTATION]
    assert datetime.datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ")
    assert [c["name"] for c in debug["spec"]["containers"]] == ["meshward-proxy", "shell"]
    assert debug["metadata"]["annotations"][inject.INJECTED_AT_ANNOTATION] == at
    assert listing == original_list
    assert original_debug["metadata"] == {"name": "debug"}

    # The output injected again, from standard input: nothing changes.
    again = meshward("inject", "-f", "-", input=proc.stdout)
    assert again.returncode == 0, again.stderr
    assert list(yaml.safe_load_all(again.stdout)) == [deployment, debug, listing]
    assert again.stderr.splitlines()[:2] == [
        "deployment/web skipped: already injected (annotation meshward.io/proxy-version)",
        "pod/debug skipped: already injected (annotation meshward.io/proxy-version)",
    ]


def test_meshward_inject_takes_settings_from_the_environment(meshward: Callable[..., Run]) -> None:
    proc = meshward(
        "inject",
        "-f",
        "-",
        input=MANIFEST,
        env={"MESHWARD_INJECT_PROXY_IMAGE": "registry.example/p:9", "MESHWARD_TRUST_DOMAIN": "x.y"},
    )
    assert proc.returncode == 0, proc.stderr
    deployment = next(yaml.safe_load_all(proc.stdout))
    proxy = deployment["spec"]["template"]["spec"]["containers"][0]
    assert proxy["image"] == "registry.example/p:9"
    local = {e["name"]: e.get("value") for e in proxy["env"]}[proxy_settings.LOCAL_NAME]
    assert local == "$(_pod_sa).$(_pod_ns).serviceaccount.identity.meshward.x.y"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kind: [", "standard input is not valid YAML at line 1, column 8: expected the node"),
        ("", "standard input holds no Kubernetes objects"),
        ("- just\n- a list\n", "document 1 is not a Kubernetes object"),
        (
            "kind: Pod\nmetadata: {name: p, annotations: {meshward.io/inject: maybe}}\n"
            "spec: {containers: [{name: a, image: b}]}\n",
            "document 1 (pod/p): the pod's annotation meshward.io/inject is 'maybe': set it to",
        ),
    ],
)
def test_meshward_inject_refuses_a_bad_file(
    content: str, message: str, meshward: Callable[..., Run]
) -> None:
    proc = meshward("inject", "-f", "-", input=content)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"meshward: error: {message}")


def test_meshward_inject_a_missing_file(
    tmp_path: pathlib.Path, meshward: Callable[..., Run]
) -> None:
    proc = meshward("inject", "-f", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"meshward: error: can not read {tmp_path / 'nope.yaml'}: No such file or directory"
    )
    bad = meshward("inject", "-f", "-", input="", env={"MESHWARD_INJECT_PROXY_UID": "root"})
    assert bad.returncode == 1
    assert "MESHWARD_INJECT_PROXY_UID='root' is not valid" in bad.stderr
