"""Keep ``crds/`` and ``samples/`` in step with :mod:`meshward.policy.resources`, without a cluster.

The CRDs are written by hand (descriptions, printer columns), and the API server silently prunes
any field its schema does not declare. So a field added to a model but not to its CRD would be
dropped on every write, and an enum value missing from the CRD would be refused before the
webhook ever sees it. These tests walk each model and its CRD schema side by side and fail on
any difference: fields, required lists, types, enums, patterns, bounds and defaults.
"""

from __future__ import annotations

import copy
import enum
import pathlib
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Literal, get_args, get_origin

import pydantic
import pytest
import yaml
from pydantic.fields import FieldInfo

from meshward import errors
from meshward.identity import trustdomain
from meshward.policy import resources, workload

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRD_DIR = ROOT / "crds"
SAMPLE_DIR = ROOT / "samples"
KIND_NAMES = sorted(resources.KINDS)
MODELS: dict[str, type[pydantic.BaseModel]] = {
    **resources.KINDS,
    trustdomain.KIND: trustdomain.TrustDomain,
}
"""Every kind with a CRD: the policy kinds and the identity group's TrustDomain."""
ALL_KINDS = sorted(MODELS)
CRD_FILES = {
    **{kind: f"{plural}.yaml" for kind, plural in resources.PLURALS.items()},
    trustdomain.KIND: "trustdomain.yaml",
}

# The only anyOf a structural schema may carry, and only beside x-kubernetes-int-or-string.
INT_OR_STRING_ANY_OF = [{"type": "integer"}, {"type": "string"}]
JUNCTORS = ("anyOf", "allOf", "oneOf", "not")
# What the structural-schema rules forbid inside a junctor.
FORBIDDEN_IN_JUNCTOR = ("type", "default", "description", "additionalProperties", "nullable")
# Value constraints a model can express; the CRD must carry exactly the model's.
CONSTRAINT_KEYWORDS = (
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "enum",
)
NO_DEFAULT = object()

Schema = dict[str, Any]


# -- loading ---------------------------------------------------------------------------------


def _load_crds() -> dict[str, Schema]:
    """Every CRD in crds/, by kind; each file must hold exactly one document."""
    crds: dict[str, Schema] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, (
            f"{path.name}: expected one CustomResourceDefinition, found {len(docs)}"
        )
        crd = docs[0]
        kind = crd["spec"]["names"]["kind"]
        assert kind not in crds, f"{path.name}: a second CRD for {kind}"
        assert path.name == CRD_FILES.get(kind), f"{path.name} holds {kind}"
        crds[kind] = crd
    return crds


CRDS = _load_crds()


def _version(kind: str) -> Schema:
    versions: list[Schema] = CRDS[kind]["spec"]["versions"]
    return versions[0]


def _schema(kind: str) -> Schema:
    return typing.cast(Schema, _version(kind)["schema"]["openAPIV3Schema"])


def _sample_docs() -> Iterator[tuple[str, Schema]]:
    for path in sorted(SAMPLE_DIR.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield f"{path.name}#{i}", doc


def _is_policy(doc: Schema) -> bool:
    """Of the policy group at any version, so a sample with a stale version is still checked."""
    return str(doc.get("apiVersion", "")).split("/")[0] == resources.GROUP


def _is_identity(doc: Schema) -> bool:
    return str(doc.get("apiVersion", "")).split("/")[0] == trustdomain.GROUP


SAMPLE_DOCS = list(_sample_docs())
POLICY_SAMPLES = [(name, doc) for name, doc in SAMPLE_DOCS if _is_policy(doc)]
IDENTITY_SAMPLES = [(name, doc) for name, doc in SAMPLE_DOCS if _is_identity(doc)]


# -- model side: annotations to OpenAPI ------------------------------------------------------


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (typing.Union, types.UnionType)


def _constraints(metadata: Iterable[Any]) -> dict[str, Any]:
    """ge/le/min_length/max_length/pattern from pydantic or annotated-types metadata."""
    found: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            found.update(_constraints(item.metadata))
            continue
        for attr in ("ge", "le", "gt", "lt", "min_length", "max_length", "pattern"):
            value = getattr(item, attr, None)
            if value is not None:
                found[attr] = value
    return found


def _split(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """Strip ``| None`` and ``Annotated`` layers: the bare type and the constraints they carried."""
    constraints: dict[str, Any] = {}
    while True:
        if get_origin(annotation) is Annotated:
            base, *meta = get_args(annotation)
            constraints.update(_constraints(meta))
            annotation = base
        elif _is_union(annotation):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation, constraints
            annotation = members[0]
        else:
            return annotation, constraints


def _openapi_constraints(openapi_type: str, c: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI keywords that express the model constraints ``c`` on a value of a type."""
    out: dict[str, Any] = {}
    if "ge" in c:
        out["minimum"] = c["ge"]
    if "le" in c:
        out["maximum"] = c["le"]
    if "gt" in c:
        out.update(minimum=c["gt"], exclusiveMinimum=True)
    if "lt" in c:
        out.update(maximum=c["lt"], exclusiveMaximum=True)
    if "pattern" in c:
        out["pattern"] = c["pattern"]
    lengths = {
        "string": ("minLength", "maxLength"),
        "array": ("minItems", "maxItems"),
        "object": ("minProperties", "maxProperties"),
    }.get(openapi_type)
    if lengths:
        if "min_length" in c:
            out[lengths[0]] = c["min_length"]
        if "max_length" in c:
            out[lengths[1]] = c["max_length"]
    return out


def _alias(name: str, field: FieldInfo) -> str:
    return field.alias or name


def _model_default(field: FieldInfo) -> Any:
    """The field's default as JSON, or NO_DEFAULT when absence means the same (None, "", [], {})."""
    if field.is_required():
        return NO_DEFAULT
    value = field.get_default(call_default_factory=True)
    if value is None:
        return NO_DEFAULT
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(typing.cast(Any, field.annotation))
    dumped = adapter.dump_python(value, mode="json", by_alias=True)
    if dumped in ("", [], {}):
        return NO_DEFAULT
    return dumped


def _with_defaults(value: Any, node: Schema) -> Any:
    """``value`` after the API server's defaulting: nested defaults apply inside a default."""
    if isinstance(value, dict):
        props: Schema = node.get("properties", {})
        extra = node.get("additionalProperties")
        out = dict(value)
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        for key, item in out.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                out[key] = _with_defaults(item, sub)
        return out
    if isinstance(value, list) and "items" in node:
        return [_with_defaults(item, node["items"]) for item in value]
    return value


def _check_keywords(node: Schema, expected: dict[str, Any], path: str) -> list[str]:
    problems = []
    for key in CONSTRAINT_KEYWORDS:
        have, want = node.get(key), expected.get(key)
        if key == "enum" and have is not None and want is not None:
            have, want = sorted(have, key=repr), sorted(want, key=repr)
        if have != want:
            problems.append(f"{path}: {key} is {node.get(key)!r} in the CRD, {want!r} in the model")
    return problems


def _check_type(node: Schema, openapi_type: str, path: str) -> list[str]:
    if node.get("type") != openapi_type:
        return [f"{path}: type is {node.get('type')!r} in the CRD, {openapi_type!r} in the model"]
    return []


def _mirror(annotation: Any, node: Schema, path: str, field_meta: Iterable[Any] = ()) -> list[str]:
    """Every difference between a model annotation and the CRD schema node meant to mirror it."""
    bare, nested = _split(annotation)
    c = {**_constraints(field_meta), **nested}

    if _is_union(bare):
        members = dict(_split(m) for m in get_args(bare) if m is not type(None))
        if set(members) != {int, str}:
            return [f"{path}: the test can not map the union {bare!r} to OpenAPI"]
        problems = []
        if node.get("x-kubernetes-int-or-string") is not True or "type" in node:
            problems.append(f"{path}: int | str must be x-kubernetes-int-or-string without a type")
        if node.get("anyOf", INT_OR_STRING_ANY_OF) != INT_OR_STRING_ANY_OF:
            problems.append(f"{path}: anyOf must be exactly {INT_OR_STRING_ANY_OF}")
        expected = {
            **_openapi_constraints("integer", members[int]),
            **_openapi_constraints("string", members[str]),
        }
        return problems + _check_keywords(node, expected, path)

    if isinstance(bare, type) and issubclass(bare, pydantic.BaseModel):
        problems = _check_type(node, "object", path)
        problems += _check_keywords(node, {}, path)
        props: Schema = node.get("properties", {})
        fields = {_alias(n, f): f for n, f in bare.model_fields.items()}
        for name in sorted(set(props) - set(fields)):
            problems.append(f"{path}.{name}: in the CRD but not in {bare.__name__}")
        for name in sorted(set(fields) - set(props)):
            problems.append(f"{path}.{name}: in {bare.__name__} but not in the CRD")
        required = {a for a, f in fields.items() if f.is_required()}
        if set(node.get("required", [])) != required:
            problems.append(
                f"{path}: required is {sorted(node.get('required', []))} in the CRD, "
                f"{sorted(required)} in the model"
            )
        for name in sorted(set(props) & set(fields)):
            field, sub = fields[name], props[name]
            problems += _mirror(field.annotation, sub, f"{path}.{name}", field.metadata)
            problems += _check_default(field, sub, f"{path}.{name}")
        return problems

    if isinstance(bare, type) and issubclass(bare, enum.Enum):
        expected = {"enum": [m.value for m in bare]}
        return _check_type(node, "string", path) + _check_keywords(node, expected, path)

    if get_origin(bare) is Literal:
        expected = {"enum": list(get_args(bare))}
        return _check_type(node, "string", path) + _check_keywords(node, expected, path)

    if get_origin(bare) is tuple:
        args = get_args(bare)
        if len(args) != 2 or args[1] is not Ellipsis:
            return [f"{path}: the test maps only tuple[X, ...] to an array, not {bare!r}"]
        problems = _check_type(node, "array", path)
        problems += _check_keywords(node, _openapi_constraints("array", c), path)
        return problems + _mirror(args[0], node.get("items", {}), f"{path}[]")

    if get_origin(bare) is dict:
        key_type, value_type = get_args(bare)
        if key_type is not str:
            return [f"{path}: map keys must be str, not {key_type!r}"]
        problems = _check_type(node, "object", path)
        problems += _check_keywords(node, _openapi_constraints("object", c), path)
        if "properties" in node:
            problems.append(f"{path}: a map must not declare properties")
        values = node.get("additionalProperties")
        if not isinstance(values, dict):
            return [*problems, f"{path}: a map needs an additionalProperties schema"]
        return problems + _mirror(value_type, values, f"{path}.*")

    scalars = {bool: "boolean", int: "integer", str: "string"}
    if bare in scalars:
        openapi_type = scalars[bare]
        problems = _check_type(node, openapi_type, path)
        return problems + _check_keywords(node, _openapi_constraints(openapi_type, c), path)

    return [f"{path}: the test can not map {bare!r} to OpenAPI; teach _mirror"]


def _check_default(field: FieldInfo, node: Schema, path: str) -> list[str]:
    want = _model_default(field)
    if "default" not in node:
        return (
            [] if want is NO_DEFAULT else [f"{path}: the model defaults to {want!r}, the CRD not"]
        )
    have = _with_defaults(copy.deepcopy(node["default"]), node)
    problems = [f"{path}: default is {have!r} in the CRD, {want!r} in the model"] * (have != want)
    # The API server refuses a CRD whose default does not pass its own schema.
    return problems + _validate(have, node, f"{path} (default)")


def _mirror_resource(kind: str, schema: Schema) -> list[str]:
    model = MODELS[kind]
    problems = []
    fields = {_alias(n, f): f for n, f in model.model_fields.items()}
    if set(schema.get("properties", {})) != set(fields):
        problems.append(
            f"top-level properties are {sorted(schema.get('properties', {}))} in the CRD, "
            f"{sorted(fields)} in the model"
        )
    if schema.get("required") != ["spec"]:
        problems.append(f"top-level required is {schema.get('required')!r}, want ['spec']")
    props = schema.get("properties", {})
    for name in ("spec", "status"):
        if name in props:
            problems += _mirror(fields[name].annotation, props[name], name)
    return problems


# -- CRD side: structural rules, and a small validator for manifests -------------------------


def _walk(node: Schema, path: str) -> Iterator[tuple[Schema, str]]:
    """Every schema node below and including ``node``, junctor branches included."""
    yield node, path
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            yield from _walk(node[key], f"{path}.{key}")
    for key in ("anyOf", "allOf", "oneOf"):
        for i, sub in enumerate(node.get(key, [])):
            yield from _walk(sub, f"{path}.{key}[{i}]")


def _structural_problems(schema: Schema) -> list[str]:
    """What the apiextensions.k8s.io/v1 structural-schema rules (and Kubernetes 1.20) refuse."""
    problems = []
    if schema.get("properties", {}).get("metadata") != {"type": "object"}:
        problems.append("metadata: must be just {type: object}; the API server owns its schema")
    junction_nodes: set[int] = set()
    for node, path in _walk(schema, "<root>"):
        for key in JUNCTORS:
            if key not in node:
                continue
            if key == "anyOf" and node.get("x-kubernetes-int-or-string") is True:
                if node["anyOf"] != INT_OR_STRING_ANY_OF:
                    problems.append(f"{path}.anyOf: beside int-or-string it must be exactly")
                continue
            branches = node[key] if isinstance(node[key], list) else [node[key]]
            for branch in branches:
                junction_nodes.update(id(n) for n, _ in _walk(branch, path))
    for node, path in _walk(schema, "<root>"):
        if "x-kubernetes-validations" in node:
            problems.append(f"{path}: x-kubernetes-validations does not exist in Kubernetes 1.20")
        if id(node) in junction_nodes:
            problems += [f"{path}: {k} inside a junctor" for k in FORBIDDEN_IN_JUNCTOR if k in node]
            continue
        if node.get("x-kubernetes-int-or-string") is True:
            if "type" in node:
                problems.append(f"{path}: int-or-string takes no type")
            continue
        node_type = node.get("type")
        if node_type not in ("object", "array", "string", "integer", "number", "boolean"):
            problems.append(f"{path}: needs a type (found {node_type!r})")
        if node_type == "array" and not isinstance(node.get("items"), dict):
            problems.append(f"{path}: an array needs an items schema")
        if node_type == "object" and path != "<root>.metadata":
            has_props, has_map = "properties" in node, "additionalProperties" in node
            if has_props == has_map:
                problems.append(f"{path}: an object needs properties or additionalProperties (one)")
        missing = set(node.get("required", [])) - set(node.get("properties", {}))
        if missing:
            problems.append(f"{path}: required names undeclared {sorted(missing)}")
        if node.get("x-kubernetes-list-type") == "map":
            keys = node.get("x-kubernetes-list-map-keys") or []
            if not keys or not set(keys) <= set(node.get("items", {}).get("required", [])):
                problems.append(f"{path}: list-type map needs required list-map-keys")
    return problems


def _validate(value: Any, node: Schema, path: str) -> list[str]:
    """The API server's schema check, in small: types, unknown fields, required, enums, bounds."""
    if node.get("x-kubernetes-int-or-string") is True:
        if not isinstance(value, int | str) or isinstance(value, bool):
            return [f"{path}: must be an integer or a string, not {value!r}"]
        return _validate_scalar(value, node, path)
    node_type = node.get("type")
    if node_type == "object":
        if not isinstance(value, dict):
            return [f"{path}: must be an object, not {value!r}"]
        problems = [f"{path}.{r}: required" for r in node.get("required", []) if r not in value]
        props = node.get("properties")
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{path}: key {key!r} must be a string (quote it in YAML)")
            elif props is not None and key in props:
                problems += _validate(item, props[key], f"{path}.{key}")
            elif isinstance(node.get("additionalProperties"), dict):
                problems += _validate(item, node["additionalProperties"], f"{path}.{key}")
            elif props is not None:
                problems.append(f"{path}.{key}: unknown field; the API server would drop it")
        return problems
    if node_type == "array":
        if not isinstance(value, list):
            return [f"{path}: must be a list, not {value!r}"]
        problems = []
        if len(value) < node.get("minItems", 0):
            problems.append(f"{path}: needs at least {node['minItems']} items")
        for i, item in enumerate(value):
            problems += _validate(item, node["items"], f"{path}[{i}]")
        return problems
    python_types: dict[str, type | tuple[type, ...]] = {
        "string": str,
        "integer": int,
        "boolean": bool,
        "number": (int, float),
    }
    want = python_types.get(str(node_type))
    if want is None:
        return [f"{path}: schema has no type"]
    if not isinstance(value, want) or (isinstance(value, bool) and node_type != "boolean"):
        return [f"{path}: must be {node_type}, not {value!r}"]
    return _validate_scalar(value, node, path)


def _validate_scalar(value: Any, node: Schema, path: str) -> list[str]:
    problems = []
    if "enum" in node and value not in node["enum"]:
        problems.append(f"{path}: {value!r} is not one of {node['enum']}")
    if isinstance(value, str):
        if "pattern" in node and not re.search(node["pattern"], value):
            problems.append(f"{path}: {value!r} does not match {node['pattern']}")
        if len(value) > node.get("maxLength", len(value)):
            problems.append(f"{path}: longer than {node['maxLength']}")
    elif isinstance(value, int):
        if value < node.get("minimum", value):
            problems.append(f"{path}: below {node['minimum']}")
        if value > node.get("maximum", value):
            problems.append(f"{path}: above {node['maximum']}")
    return problems


def _resolve(schema: Schema, json_path: str) -> Schema | None:
    """The schema node a printer column's simple JSONPath (filters allowed) points at."""
    node: Schema | None = schema
    for part in re.sub(r"\[[^\]]*\]", "[]", json_path).lstrip(".").split("."):
        name, is_list = part.removesuffix("[]"), part.endswith("[]")
        node = (node or {}).get("properties", {}).get(name)
        if node is not None and is_list:
            node = node.get("items")
    return node


# -- the CRD files ---------------------------------------------------------------------------


def test_one_crd_per_kind() -> None:
    assert set(CRDS) == set(MODELS)


def test_trustdomain_crd_identity() -> None:
    crd = CRDS[trustdomain.KIND]
    assert crd["metadata"]["name"] == f"{trustdomain.PLURAL}.{trustdomain.GROUP}"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == (trustdomain.GROUP, "Cluster")
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"], names["listKind"]) == (
        "TrustDomain",
        trustdomain.PLURAL,
        "trustdomain",
        "TrustDomainList",
    )
    assert names["categories"] == ["meshward", "identity"]
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [
        (trustdomain.VERSION, True, True)
    ]


def test_trustdomain_printer_columns() -> None:
    columns = _version(trustdomain.KIND)["additionalPrinterColumns"]
    names = [c["name"] for c in columns]
    assert names == [
        "Trust-Domain",
        "Phase",
        "Anchor-Expires",
        "Issuer-Expires",
        "Waiting-For",
        "Ready",
        "Age",
    ]
    for column in columns:
        if not column["jsonPath"].startswith(".metadata."):
            assert _resolve(_schema(trustdomain.KIND), column["jsonPath"]) is not None, column


def test_trustdomain_phase_enum_matches_the_model() -> None:
    phase = _schema(trustdomain.KIND)["properties"]["status"]["properties"]["phase"]
    assert phase["enum"] == [p.value for p in trustdomain.Phase]


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_crd_identity(kind: str) -> None:
    crd = CRDS[kind]
    plural = resources.PLURALS[kind]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{plural}.{resources.GROUP}"
    spec = crd["spec"]
    assert spec["group"] == resources.GROUP
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (kind, plural, kind.lower())
    assert names["listKind"] == f"{kind}List"
    assert names["categories"] == ["meshward", "policy"]
    assert names["shortNames"], "a short name saves typing in kubectl"
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [
        (resources.VERSION, True, True)
    ]


def test_short_names_are_unique() -> None:
    """The API server refuses a CRD whose short name another CRD of the group already has."""
    seen: dict[str, str] = {}
    for kind, crd in CRDS.items():
        for short in crd["spec"]["names"]["shortNames"]:
            assert short not in seen, f"{kind} and {seen[short]} both claim {short!r}"
            seen[short] = kind


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_status_subresource_and_conditions(kind: str) -> None:
    assert _version(kind)["subresources"] == {"status": {}}
    status = _schema(kind)["properties"]["status"]
    assert status["properties"]["observedGeneration"]["type"] == "integer"
    conditions = status["properties"]["conditions"]
    assert conditions["type"] == "array"
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) >= {"type", "status"}
    fields = item["properties"]
    assert set(fields) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    # Quoted in YAML: bare True/False would load as booleans and the API server would refuse
    # every condition the operator writes.
    assert fields["status"]["enum"] == ["True", "False", "Unknown"]
    assert fields["lastTransitionTime"] == {"type": "string", "format": "date-time"}
    assert fields["observedGeneration"]["type"] == "integer"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_schema_is_structural(kind: str) -> None:
    assert _structural_problems(_schema(kind)) == []


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_schema_mirrors_model(kind: str) -> None:
    assert _mirror_resource(kind, _schema(kind)) == []


EXPECTED_COLUMNS = {
    "Server": ["Port", "Protocol", "Access", "Accepted", "Age"],
    "ServerAuthorization": ["Server", "Accepted", "Age"],
    "AuthorizationPolicy": ["Target-Kind", "Target-Name", "Accepted", "Age"],
    "MeshTLSAuthentication": ["Accepted", "Age"],
    "NetworkAuthentication": ["Accepted", "Age"],
    "PeerAuthentication": ["Mode", "Accepted", "Age"],
}


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_printer_columns(kind: str) -> None:
    columns = _version(kind)["additionalPrinterColumns"]
    names = [c["name"] for c in columns]
    assert [n for n in names if n in EXPECTED_COLUMNS[kind]] == EXPECTED_COLUMNS[kind]
    assert columns[-1] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    accepted = columns[names.index("Accepted")]
    assert accepted["jsonPath"] == '.status.conditions[?(@.type=="Accepted")].status'
    for column in columns:
        assert column["type"] in ("integer", "number", "string", "boolean", "date")
        if column["jsonPath"].startswith(".metadata."):
            continue
        node = _resolve(_schema(kind), column["jsonPath"])
        assert node is not None, f"column {column['name']}: {column['jsonPath']} names no field"
        if column["type"] in ("integer", "number", "boolean"):
            assert node.get("type") == column["type"], column["name"]


# -- the checks themselves can fail ----------------------------------------------------------


def _spec(schema: Schema) -> Schema:
    return typing.cast(Schema, schema["properties"]["spec"]["properties"])


MIRROR_BREAKS: list[tuple[str, Callable[[Schema], object], str]] = [
    ("field only in CRD", lambda s: _spec(s).update(weight={"type": "integer"}), "spec.weight"),
    ("field missing", lambda s: _spec(s).pop("proxyProtocol"), "spec.proxyProtocol"),
    ("enum value missing", lambda s: _spec(s)["proxyProtocol"]["enum"].remove("TLS"), "enum"),
    ("default changed", lambda s: _spec(s)["accessPolicy"].update(default="audit"), "default"),
    ("default dropped", lambda s: _spec(s)["proxyProtocol"].pop("default"), "defaults to"),
    ("pattern dropped", lambda s: _spec(s)["port"].pop("pattern"), "spec.port: pattern"),
    ("maximum dropped", lambda s: _spec(s)["port"].pop("maximum"), "spec.port: maximum"),
    ("required dropped", lambda s: s["properties"]["spec"]["required"].remove("port"), "required"),
    (
        "nested field renamed",
        lambda s: _spec(s)["podSelector"]["properties"]["matchExpressions"]["items"][
            "properties"
        ].update(value={"type": "array", "items": {"type": "string"}}),
        "spec.podSelector.matchExpressions[].value",
    ),
    (
        "map value type",
        lambda s: _spec(s)["podSelector"]["properties"]["matchLabels"].update(
            additionalProperties={"type": "integer"}
        ),
        "spec.podSelector.matchLabels.*: type",
    ),
    (
        "condition status unquoted",
        lambda s: s["properties"]["status"]["properties"]["conditions"]["items"]["properties"][
            "status"
        ].update(enum=[True, False, "Unknown"]),
        "status.conditions[].status: enum",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [m[1:] for m in MIRROR_BREAKS], ids=[m[0] for m in MIRROR_BREAKS]
)
def test_mirror_check_catches(mutate: Callable[[Schema], object], expected: str) -> None:
    schema = copy.deepcopy(_schema("Server"))
    mutate(schema)
    problems = _mirror_resource("Server", schema)
    assert any(expected in p for p in problems), problems


def test_mirror_check_catches_field_only_in_model() -> None:
    class ServerSpecPlus(resources.ServerSpec):
        weight: int | None = None

    problems = _mirror(ServerSpecPlus, _schema("Server")["properties"]["spec"], "spec")
    assert "spec.weight: in ServerSpecPlus but not in the CRD" in problems


STRUCTURAL_BREAKS: list[tuple[str, Callable[[Schema], object], str]] = [
    (
        "bounds inside int-or-string anyOf",
        lambda s: _spec(s)["port"]["anyOf"][0].update(minimum=1),
        "spec.port.anyOf",
    ),
    ("missing type", lambda s: _spec(s)["accessPolicy"].pop("type"), "spec.accessPolicy"),
    ("object without fields", lambda s: _spec(s).update(podSelector={"type": "object"}), "object"),
    ("array without items", lambda s: _spec(s).update(x={"type": "array"}), "items"),
    (
        "CEL rule",
        lambda s: s["properties"]["spec"].update({"x-kubernetes-validations": [{"rule": "true"}]}),
        "x-kubernetes-validations",
    ),
    ("typed metadata", lambda s: s["properties"]["metadata"].update(required=["name"]), "metadata"),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [m[1:] for m in STRUCTURAL_BREAKS],
    ids=[m[0] for m in STRUCTURAL_BREAKS],
)
def test_structural_check_catches(mutate: Callable[[Schema], object], expected: str) -> None:
    schema = copy.deepcopy(_schema("Server"))
    mutate(schema)
    problems = _structural_problems(schema)
    assert any(expected in p for p in problems), problems


# -- samples ---------------------------------------------------------------------------------


def test_expected_samples_exist() -> None:
    names = {p.name for p in SAMPLE_DIR.glob("*.yaml")}
    assert names >= {
        "namespace-jail-server-authorization.yaml",
        "namespace-jail-authorization-policy.yaml",
        "peer-authentication-strict.yaml",
        "deny-with-probes.yaml",
    }


@pytest.mark.parametrize(("name", "doc"), SAMPLE_DOCS, ids=[n for n, _ in SAMPLE_DOCS])
def test_sample_document_is_known(name: str, doc: Schema) -> None:
    """Samples hold policy kinds, TrustDomains, Namespaces and Deployments; a Namespace's
    default policy must be valid."""
    if _is_identity(doc):
        assert doc["apiVersion"] == trustdomain.API_VERSION
        assert doc["kind"] == trustdomain.KIND
        assert "namespace" not in doc["metadata"], "a TrustDomain is cluster-scoped"
        return
    if _is_policy(doc):
        assert doc["apiVersion"] == resources.API_VERSION
        assert doc["kind"] in resources.KINDS
        assert doc["metadata"].get("namespace"), "policy kinds are namespaced"
        return
    if (doc.get("apiVersion"), doc.get("kind")) == ("apps/v1", "Deployment"):
        return  # a workload for the injector (injected-namespace.yaml)
    assert (doc.get("apiVersion"), doc.get("kind")) == ("v1", "Namespace")
    policy = doc["metadata"].get("annotations", {}).get(workload.DEFAULT_POLICY_ANNOTATION)
    assert policy is None or policy in {p.value for p in resources.DefaultPolicy}


@pytest.mark.parametrize(("name", "doc"), POLICY_SAMPLES, ids=[n for n, _ in POLICY_SAMPLES])
def test_sample_passes_model_and_schema(name: str, doc: Schema) -> None:
    parsed = resources.parse(doc)
    assert parsed.metadata.name == doc["metadata"]["name"]
    assert _validate(doc, _schema(doc["kind"]), doc["kind"]) == []


@pytest.mark.parametrize(("name", "doc"), IDENTITY_SAMPLES, ids=[n for n, _ in IDENTITY_SAMPLES])
def test_identity_sample_passes_model_and_schema(name: str, doc: Schema) -> None:
    parsed = trustdomain.parse(doc)
    assert parsed.metadata.name == doc["metadata"]["name"]
    assert _validate(doc, _schema(doc["kind"]), doc["kind"]) == []


# -- invalid manifests -----------------------------------------------------------------------


def _doc(kind: str, spec: Schema) -> Schema:
    return {
        "apiVersion": resources.API_VERSION,
        "kind": kind,
        "metadata": {"name": "invalid", "namespace": "crdtest-invalid"},
        "spec": spec,
    }


def _server(**spec: Any) -> Schema:
    return _doc("Server", {"podSelector": {"matchLabels": {"app": "web"}}, "port": 8080, **spec})


# Refused by both the CRD schema and the model: (manifest, field the model's message names).
REFUSED_BY_BOTH = {
    "port 0": (_server(port=0), "spec.port"),
    "port 65536": (_server(port=65536), "spec.port"),
    "port name pattern": (_server(port="Web_Port"), "spec.port"),
    "port name too long": (_server(port="a-very-long-port-name"), "spec.port"),
    "port boolean": (_server(port=True), "spec.port"),
    "proxyProtocol enum": (_server(proxyProtocol="http"), "spec.proxyProtocol"),
    "accessPolicy enum": (_server(accessPolicy="allow"), "spec.accessPolicy"),
    "selector operator": (
        _server(podSelector={"matchExpressions": [{"key": "app", "operator": "Equals"}]}),
        "spec.podSelector.matchExpressions.0.operator",
    ),
    "mtls mode enum": (_doc("PeerAuthentication", {"mtls": {"mode": "strict"}}), "spec.mtls.mode"),
    "identity pattern": (
        _doc("MeshTLSAuthentication", {"identities": ["Web.Emojivoto"]}),
        "spec.identities.0",
    ),
    "targetRef kind": (
        _doc(
            "AuthorizationPolicy",
            {"targetRef": {"kind": "Pod", "name": "web"}, "requiredAuthenticationRefs": []},
        ),
        "spec.targetRef.kind",
    ),
    "no authentication refs (would allow everyone)": (
        _doc(
            "AuthorizationPolicy",
            {"targetRef": {"kind": "Namespace", "name": "x"}, "requiredAuthenticationRefs": []},
        ),
        "spec.requiredAuthenticationRefs",
    ),
    "no networks": (_doc("NetworkAuthentication", {"networks": []}), "spec.networks"),
    "no client": (_doc("ServerAuthorization", {"server": {"name": "web"}}), "spec.client"),
}


@pytest.mark.parametrize(
    ("doc", "field"), REFUSED_BY_BOTH.values(), ids=list(REFUSED_BY_BOTH.keys())
)
def test_refused_by_schema_and_model(doc: Schema, field: str) -> None:
    assert _validate(doc, _schema(doc["kind"]), doc["kind"]) != []
    with pytest.raises(errors.InvalidResource, match=re.escape(field)):
        resources.parse(doc)


_MESH = {"meshTLS": {"identities": ["*.emojivoto.serviceaccount.identity.meshward.cluster.local"]}}

# Rules the schema can not state on Kubernetes 1.20 (no CEL): only the model (webhook) refuses.
REFUSED_BY_MODEL = {
    "meshTLS and unauthenticated": (
        _doc(
            "ServerAuthorization",
            {"server": {"name": "web"}, "client": {**_MESH, "unauthenticated": True}},
        ),
        ["spec.client", "meshTLS", "unauthenticated"],
    ),
    "server name and selector": (
        _doc("ServerAuthorization", {"server": {"name": "web", "selector": {}}, "client": _MESH}),
        ["spec.server", "name or selector"],
    ),
    "two meshTLS choices": (
        _doc(
            "ServerAuthorization",
            {
                "server": {"name": "web"},
                "client": {"meshTLS": {"identities": ["*"], "serviceAccounts": [{"name": "web"}]}},
            },
        ),
        ["spec.client.meshTLS", "identities, serviceAccounts"],
    ),
    "except outside cidr": (
        _doc(
            "NetworkAuthentication",
            {"networks": [{"cidr": "10.20.0.0/16", "except": ["10.30.0.0/24"]}]},
        ),
        ["spec.networks.0", "except '10.30.0.0/24'"],
    ),
    "cidr not a network": (
        _doc("NetworkAuthentication", {"networks": [{"cidr": "10.20.0.0/33"}]}),
        ["spec.networks.0", "cidr '10.20.0.0/33'"],
    ),
    "neither identities nor identityRefs": (
        _doc("MeshTLSAuthentication", {}),
        ["spec:", "identities or identityRefs"],
    ),
    "portLevelMtls without selector": (
        _doc("PeerAuthentication", {"portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
        ["spec:", "portLevelMtls needs a selector"],
    ),
    "portLevelMtls key not a port": (
        _doc(
            "PeerAuthentication",
            {"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"http": {}}},
        ),
        ["spec:", "portLevelMtls key 'http'"],
    ),
    "In without values": (
        _server(podSelector={"matchExpressions": [{"key": "app", "operator": "In"}]}),
        ["spec.podSelector.matchExpressions.0", "needs values"],
    ),
}


@pytest.mark.parametrize(
    ("doc", "fragments"), REFUSED_BY_MODEL.values(), ids=list(REFUSED_BY_MODEL.keys())
)
def test_refused_by_model_naming_the_field(doc: Schema, fragments: list[str]) -> None:
    with pytest.raises(errors.InvalidResource) as refused:
        resources.parse(doc)
    message = str(refused.value)
    assert all(f in message for f in fragments), message


def test_schema_check_catches_unknown_fields() -> None:
    """The API server drops unknown fields silently, so a typo in a sample must fail here."""
    doc = _server(proxyprotocol="gRPC")
    resources.parse(doc)  # the model ignores extras too, which is why this check exists
    assert _validate(doc, _schema("Server"), "Server") == [
        "Server.spec.proxyprotocol: unknown field; the API server would drop it"
    ]
