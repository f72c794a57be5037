"""The injector against a real API server: the API server calls the operator's mutating
webhook on Pod CREATE, and the pods are stored (never run: there is no kubelet)."""

from __future__ import annotations

import base64
import copy
import pathlib
import signal
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client import exceptions

from meshward import inject
from tests import kubetest

pytestmark = pytest.mark.cluster

AT = "2026-11-24T10:00:00Z"
ENTRY = "inject-pods"
"""The injector's webhook in the configuration: ``inject-pods.<MESHWARD_WEBHOOK_NAME>``."""


def app_pod(name: str, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A Pod as a controller sends it: no namespace in its metadata (the URL says it)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": dict(annotations or {})},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                }
            ],
            **spec,
        },
    }


def create(
    core: client.CoreV1Api, namespace: str, body: dict[str, Any], dry_run: bool = False
) -> dict[str, Any]:
    """Create the pod (or pass it through admission only, with ``dry_run``): the stored pod."""
    created = core.create_namespaced_pod(namespace, body, dry_run="All" if dry_run else None)
    stored: dict[str, Any] = core.api_client.sanitize_for_serialization(created)
    return stored


def names(pod: dict[str, Any], key: str = "containers") -> list[str]:
    return [c["name"] for c in pod["spec"].get(key) or []]


def contains(stored: Any, wanted: Any) -> bool:
    """Whether everything in ``wanted`` survived in ``stored`` (the API server adds defaults,
    and its own admission adds the API token mount, so stored may hold more)."""
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(
            k in stored and contains(stored[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return isinstance(stored, list) and all(any(contains(s, w) for s in stored) for w in wanted)
    return bool(stored == wanted)


def shape(pod: dict[str, Any]) -> dict[str, Any]:
    """What injection decides, without what differs from pod to pod (names, times, tokens)."""
    ours = set(inject.RESERVED_VOLUMES)
    proxy = copy.deepcopy(pod["spec"]["containers"][0])
    proxy["volumeMounts"] = [m for m in proxy["volumeMounts"] if m["name"] in ours]
    init = copy.deepcopy(pod["spec"]["initContainers"][-1])
    init["volumeMounts"] = [m for m in init["volumeMounts"] if m["name"] in ours]
    return {
        "containers": names(pod),
        "init": names(pod, "initContainers"),
        "proxy": proxy,
        "meshward-init": init,
        "volumes": [v for v in pod["spec"]["volumes"] if v["name"] in ours],
        "annotations": sorted(pod["metadata"]["annotations"]),
    }


@pytest.fixture(scope="module")
def admission(core: client.CoreV1Api) -> client.AdmissionregistrationV1Api:
    return client.AdmissionregistrationV1Api(core.api_client)


@pytest.fixture
def make_namespace(core: client.CoreV1Api) -> Iterator[Callable[..., str]]:
    """Namespaces for one test, with their default ServiceAccount; deleted afterwards."""
    made: list[str] = []

    def make(annotations: dict[str, str] | None = None, prefix: str = "t-inject-") -> str:
        name = f"{prefix}{uuid.uuid4().hex[:6]}"
        meta = client.V1ObjectMeta(name=name, annotations=annotations)
        core.create_namespace(client.V1Namespace(metadata=meta))
        made.append(name)
        kubetest.wait_service_account(core, name)
        return name

    yield make
    for name in made:
        core.delete_namespace(name)


def entry(
    admission: client.AdmissionregistrationV1Api, webhook_name: str
) -> client.V1MutatingWebhook | None:
    config = admission.read_mutating_webhook_configuration(webhook_name)
    wanted = f"{ENTRY}.{webhook_name}"
    return next((w for w in config.webhooks or [] if w.name == wanted), None)


def test_the_webhook_configuration(
    operator: kubetest.Operator,
    injector: inject.Settings,
    admission: client.AdmissionregistrationV1Api,
) -> None:
    webhook = kubetest.wait_for(
        "the injector's webhook with its namespaceSelector and timeout",
        lambda: (
            (w := entry(admission, operator.webhook_name))
            and w.namespace_selector.match_expressions
            and w
        ),
    )
    assert webhook.failure_policy == "Ignore"
    assert webhook.side_effects == "None"
    assert webhook.timeout_seconds == 10
    assert [(r.api_groups, r.api_versions, r.resources, r.operations) for r in webhook.rules] == [
        ([""], ["v1"], ["pods"], ["CREATE"])
    ]
    (expression,) = webhook.namespace_selector.match_expressions
    assert (expression.key, expression.operator) == ("kubernetes.io/metadata.name", "NotIn")
    assert set(expression.values) == {
        operator.root_namespace,
        "kube-system",
        "kube-public",
        "kube-node-lease",
    }

    # The CA bundle the API server holds verifies the certificate the injector serves.
    url = webhook.client_config.url
    assert url.startswith("https://127.0.0.1:") and url.endswith(f"/{ENTRY}")
    context = ssl.create_default_context(
        cadata=base64.b64decode(webhook.client_config.ca_bundle).decode()
    )
    port = int(url.split(":")[2].split("/")[0])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_a_pod_in_an_enabled_namespace_is_stored_with_the_proxy(
    injector: inject.Settings,
    core: client.CoreV1Api,
    make_namespace: Callable[..., str],
) -> None:
    ns = make_namespace({inject.INJECT_ANNOTATION: "enabled"})
    sent = app_pod("web-0")
    stored = create(core, ns, sent)
    assert names(stored) == ["meshward-proxy", "app"]
    assert names(stored, "initContainers") == ["meshward-init"]
    proxy, app = stored["spec"]["containers"]
    assert contains(proxy, inject.proxy_container(injector))
    assert proxy["env"] == inject.proxy_container(injector)["env"]
    init = stored["spec"]["initContainers"][0]
    assert contains(init, inject.init_container(injector))
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert contains(stored["spec"]["volumes"], inject.volumes())
    assert contains(app, sent["spec"]["containers"][0])
    assert "initialDelaySeconds" not in app["readinessProbe"]  # the application's probes as sent
    notes = stored["metadata"]["annotations"]
    assert notes[inject.VERSION_ANNOTATION] == injector.version
    assert notes[inject.INJECTED_AT_ANNOTATION].endswith("Z")
    assert notes[inject.DEFAULT_CONTAINER_ANNOTATION] == "app"

    # Another pod: the same shape.
    second = create(core, ns, app_pod("web-1"))
    assert shape(second) == shape(stored)

    # A pod injected already (here offline, as `meshward inject` does) is stored as sent.
    offline = inject.inject(app_pod("web-2"), {inject.INJECT_ANNOTATION: "enabled"}, injector, AT)
    assert isinstance(offline, inject.Injected)
    third = create(core, ns, offline.pod)
    assert third["metadata"]["annotations"][inject.INJECTED_AT_ANNOTATION] == AT
    assert shape(third) == shape(stored)


def test_pods_that_do_not_ask_are_stored_untouched(
    operator: kubetest.Operator,
    injector: inject.Settings,
    core: client.CoreV1Api,
    make_namespace: Callable[..., str],
) -> None:
    plain = make_namespace()
    enabled = make_namespace({inject.INJECT_ANNOTATION: "enabled"})
    kubetest.wait_service_account(core, operator.root_namespace)
    cases = {
        "in a namespace without the annotation": (plain, app_pod("plain")),
        "annotated disabled": (
            enabled,
            app_pod("opted-out", {inject.INJECT_ANNOTATION: "disabled"}),
        ),
        "on the host network": (enabled, app_pod("host", hostNetwork=True)),
        "in the control-plane namespace": (
            operator.root_namespace,
            app_pod(f"cp-{uuid.uuid4().hex[:5]}", {inject.INJECT_ANNOTATION: "enabled"}),
        ),
    }
    untouched = {}
    for what, (ns, sent) in cases.items():
        stored = create(core, ns, sent)
        untouched[what] = (
            names(stored) == ["app"]
            and names(stored, "initContainers") == []
            and (stored["metadata"].get("annotations") or {}) == sent["metadata"]["annotations"]
        )
    assert untouched == dict.fromkeys(cases, True)
    core.delete_namespaced_pod(
        cases["in the control-plane namespace"][1]["metadata"]["name"], operator.root_namespace
    )

    # The pod's own annotation is enough in a namespace without one.
    own = create(core, plain, app_pod("asks", {inject.INJECT_ANNOTATION: "enabled"}))
    assert names(own) == ["meshward-proxy", "app"]


def test_a_bad_annotation_refuses_the_pod_with_the_reason(
    injector: inject.Settings,
    kubectl: kubetest.Kubectl,
    make_namespace: Callable[..., str],
) -> None:
    ns = make_namespace({inject.INJECT_ANNOTATION: "yes"})
    proc = kubectl.apply(
        yaml.safe_dump({**app_pod("web"), "metadata": {"name": "web", "namespace": ns}}),
        check=False,
    )
    assert proc.returncode != 0
    assert "the namespace's annotation meshward.io/inject is 'yes': set it to 'enabled'" in (
        proc.stderr
    )
    port = app_pod("clash", {inject.INJECT_ANNOTATION: "enabled"})
    port["spec"]["containers"][0]["ports"].append({"containerPort": 4191})
    port["metadata"]["namespace"] = ns
    proc = kubectl.apply(yaml.safe_dump(port), check=False)
    assert proc.returncode != 0
    assert "declares port 4191, which the meshward proxy listens on" in proc.stderr


@pytest.mark.unmanaged
def test_a_webhook_that_is_down_lets_pods_through_unmeshed(
    operator: kubetest.Operator,
    injector: inject.Settings,
    kubeconfig: pathlib.Path,
    core: client.CoreV1Api,
    admission: client.AdmissionregistrationV1Api,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    """failurePolicy Ignore: a crashed injector leaves its webhook behind, and pods are created
    without the proxy; a stopped one removes its webhook. The session operator leaves this
    (unmanaged) namespace alone, so only the second operator injects here; it shares the
    session's root namespace, so the policy documents it writes are the same."""
    core.patch_namespace(
        namespace, {"metadata": {"annotations": {inject.INJECT_ANNOTATION: "enabled"}}}
    )
    kubetest.wait_service_account(core, namespace)
    second = kubetest.Operator(
        kubeconfig,
        tmp_path / "second-operator.log",
        env={
            "MESHWARD_ROOT_NAMESPACE": operator.root_namespace,
            "MESHWARD_EXCLUDED_NAMESPACES": "kube-system,kube-public,kube-node-lease",
        },
    )
    second.start()
    try:
        kubetest.wait_injecting(core, namespace, "the second operator's injector")
        assert names(create(core, namespace, app_pod("before"))) == ["meshward-proxy", "app"]

        second.stop(signal.SIGKILL)
        assert entry(admission, second.webhook_name) is not None  # still there, unanswered
        crashed = create(core, namespace, app_pod("after-crash"))
        assert names(crashed) == ["app"]
        assert inject.VERSION_ANNOTATION not in (crashed["metadata"].get("annotations") or {})

        second.start()
        kubetest.wait_injecting(core, namespace, "the restarted injector")
        second.stop(signal.SIGTERM)
        config = admission.read_mutating_webhook_configuration(second.webhook_name)
        assert not config.webhooks
        assert names(create(core, namespace, app_pod("after-stop"))) == ["app"]
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nsecond operator's log:\n{second.log_tail()}") from exc
    finally:
        second.stop()
        for delete in (
            admission.delete_mutating_webhook_configuration,
            admission.delete_validating_webhook_configuration,
        ):
            try:
                delete(second.webhook_name)
            except exceptions.ApiException as exc:
                if exc.status != 404:
                    raise
