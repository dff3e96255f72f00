"""The YAML registry document: text in, validated RegistryState out.

This is the embedded registry source used without Kubernetes (the demo, labs,
VMs); the format is described in docs/registry.md with a worked example in
examples/registry.yaml. Parsing is pure: :func:`parse_registry` takes text and
returns a state or raises :class:`RegistryError` naming the object and field
(``workloads[3] (shop/checkout): field "ips[0]": "10.1.1" is not an IP
address``). Reading the file and watching it for changes live in
:mod:`controller.registry.watcher`.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from controller.api.model import (
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    AuthorizationPolicy,
    Labels,
    Namespace,
    PeerAuthentication,
    RegistryState,
    RequestAuthentication,
    ResourceType,
    Service,
    ServicePort,
    Workload,
)
from controller.api.spiffe import InvalidSpiffeId, validate_trust_domain

from .errors import RegistryError
from .fields import (
    Fields,
    Invalid,
    check_dns1035_label,
    check_dns1123_label,
    check_dns1123_subdomain,
    check_ip,
    check_port,
    show,
)
from .fragments import RegistryFragment, assemble
from .policy import (
    parse_authorization_policy,
    parse_peer_authentication,
    parse_request_authentication,
)

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "TOP_LEVEL_FIELDS",
    "decode_document",
    "parse_fragment",
    "parse_registry",
    "parse_registry_bytes",
    "read_registry_bytes",
    "read_registry_file",
]

# A registry of 10,000 workloads is about 2 MB; the cap keeps a runaway file
# (or /dev/zero given by mistake) from exhausting the controller's memory.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024

TOP_LEVEL_FIELDS = (
    "trustDomain",
    "namespaces",
    "workloads",
    "services",
    "authorizationPolicies",
    "peerAuthentications",
    "requestAuthentications",
)
_OBJECT_FIELDS = TOP_LEVEL_FIELDS[1:]
_NAMESPACE_FIELDS = ("name", "labels")
_WORKLOAD_FIELDS = ("name", "namespace", "serviceAccount", "node", "ips", "labels", "ready")
_SERVICE_FIELDS = ("name", "namespace", "vips", "ports", "selector", "labels")
_PORT_FIELDS = ("name", "port", "targetPort")
_POLICY_FIELDS = ("name", "namespace", "spec")

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_Loader):  # type: ignore[valid-type,misc]
    """A safe loader that refuses duplicate mapping keys.

    Plain YAML keeps the last of two equal keys, so a second ``ips:`` under a
    workload would silently replace the first; refusing it is the safe choice.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                mark = key_node.start_mark
                raise RegistryError(
                    f"line {mark.line + 1}: duplicate key {show(key)} in one mapping",
                    hint="each field may appear once per object; remove one of them",
                )
            seen.add(key)
        result: dict[Hashable, Any] = super().construct_mapping(node, deep=deep)
        return result


def _load_yaml(text: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RegistryError(
            f"not valid YAML{at}: {problem}",
            hint="fix the syntax; the controller keeps serving the last valid registry",
        ) from None


def _label(kind: str, index: int, raw: object, namespaced: bool = True) -> str:
    """``workloads[3] (shop/checkout)``: the object's position and, if readable, its key."""
    key = ""
    if isinstance(raw, dict):
        name, ns = raw.get("name"), raw.get("namespace")
        if isinstance(name, str):
            key = f"{ns}/{name}" if namespaced and isinstance(ns, str) else name
    return f"{kind}[{index}] ({key})" if key else f"{kind}[{index}]"


def _check_waypoint_labels(f: Fields, labels: Labels) -> None:
    """``veil.io/use-waypoint-namespace`` names a namespace and needs ``veil.io/use-waypoint``."""
    target = labels.get(USE_WAYPOINT_NAMESPACE_LABEL)
    if target is None:
        return
    field = f"labels.{USE_WAYPOINT_NAMESPACE_LABEL}"
    if not labels.get(USE_WAYPOINT_LABEL):
        f.fail(
            field,
            f"{show(target)} names the namespace of a waypoint, but no "
            f"{USE_WAYPOINT_LABEL} label names the waypoint",
            hint=f"add {USE_WAYPOINT_LABEL}: <waypoint name> next to it, or remove it",
        )
    try:
        check_dns1123_label(target)
    except Invalid as e:
        f.fail(
            field, e.message, "the value is the namespace the waypoint runs in (docs/waypoint.md)"
        )


def _namespace(raw: object, where: str) -> Namespace:
    f = Fields(raw, where, _NAMESPACE_FIELDS)
    labels = f.labels("labels")
    _check_waypoint_labels(f, labels)
    return Namespace(name=f.value("name", check_dns1123_label), labels=labels)


def _workload(raw: object, where: str) -> Workload:
    f = Fields(raw, where, _WORKLOAD_FIELDS)
    return Workload(
        name=f.value("name", check_dns1123_subdomain),
        namespace=f.value("namespace", check_dns1123_label),
        service_account=f.value("serviceAccount", check_dns1123_subdomain, "default"),
        node=f.value("node", check_dns1123_subdomain),
        ips=f.values("ips", check_ip, required=True),
        labels=f.labels("labels"),
        ready=f.flag("ready", True),
    )


def _service(raw: object, where: str) -> Service:
    f = Fields(raw, where, _SERVICE_FIELDS)
    ports: list[ServicePort] = []
    seen_ports: dict[int, str] = {}
    for path, item in f.items("ports", required=True):
        p = Fields(item, where, _PORT_FIELDS, path=path)
        port = p.value("port", check_port)
        if port in seen_ports:
            p.fail("port", f"port {port} is already listed at {seen_ports[port]}")
        seen_ports[port] = path
        ports.append(
            ServicePort(
                port=port,
                target_port=p.value("targetPort", check_port, port),
                name=p.value("name", check_dns1123_label, ""),
            )
        )
    labels = f.labels("labels")
    _check_waypoint_labels(f, labels)
    return Service(
        name=f.value("name", check_dns1035_label),
        namespace=f.value("namespace", check_dns1123_label),
        vips=f.values("vips", check_ip),
        ports=tuple(ports),
        selector=f.labels("selector"),
        # The model keeps only what nodes use: the waypoint opt-in.
        use_waypoint=labels.get(USE_WAYPOINT_LABEL, ""),
        use_waypoint_namespace=labels.get(USE_WAYPOINT_NAMESPACE_LABEL, ""),
    )


def _policy_header(raw: object, where: str) -> tuple[str, str, Any]:
    f = Fields(raw, where, _POLICY_FIELDS)
    name = f.value("name", check_dns1123_subdomain)
    namespace = f.value("namespace", check_dns1123_label)
    return name, namespace, f.raw("spec")


def parse_fragment(text: str, source: str) -> RegistryFragment:
    """Parses and validates one document on its own; ``source`` prefixes every error.

    Cross-document checks (references, shared IPs) happen in :func:`assemble`.
    """
    try:
        return _parse(text, source)
    except RegistryError as e:
        raise e.located(source) from None


def parse_registry(text: str, source: str = "registry") -> RegistryState:
    """Parses and validates a complete single-document registry."""
    return assemble([parse_fragment(text, source)])


def _parse(text: str, source: str) -> RegistryFragment:
    data = _load_yaml(text)
    if data is None:
        # What a truncated file (`: > registry.yaml`, an editor mid-save) looks
        # like: applying it would unenroll every pod and drop every policy.
        raise RegistryError(
            "the document is empty (or holds only comments)",
            hint="a registry lists at least one of "
            + ", ".join(_OBJECT_FIELDS)
            + "; to empty the mesh on purpose, write `workloads: []`",
        )
    top = Fields(data, "", TOP_LEVEL_FIELDS)
    trust_domain: str | None = None
    if top.has("trustDomain"):
        trust_domain = top.text("trustDomain")
        try:
            validate_trust_domain(trust_domain)
        except InvalidSpiffeId as e:
            top.fail("trustDomain", e.message, e.hint)

    origin: dict[tuple[ResourceType, str], str] = {}

    def remember(rtype: ResourceType, key: str, where: str) -> None:
        first = origin.setdefault((rtype, key), where)
        if first != where:
            raise RegistryError(
                f"duplicate key {key}; {first} has the same name",
                hint="names are unique per namespace (per kind); rename or remove one",
                where=where,
            )

    namespaces: list[Namespace] = []
    workloads: list[Workload] = []
    services: list[Service] = []
    policies: list[AuthorizationPolicy] = []
    peers: list[PeerAuthentication] = []
    request_auths: list[RequestAuthentication] = []

    for i, (_, raw) in enumerate(top.items("namespaces")):
        where = _label("namespaces", i, raw, namespaced=False)
        ns = _namespace(raw, where)
        remember(ResourceType.NAMESPACE, ns.key, where)
        namespaces.append(ns)
    for i, (_, raw) in enumerate(top.items("workloads")):
        where = _label("workloads", i, raw)
        w = _workload(raw, where)
        remember(ResourceType.WORKLOAD, w.key, where)
        workloads.append(w)
    for i, (_, raw) in enumerate(top.items("services")):
        where = _label("services", i, raw)
        s = _service(raw, where)
        remember(ResourceType.SERVICE, s.key, where)
        services.append(s)
    for i, (_, raw) in enumerate(top.items("authorizationPolicies")):
        where = _label("authorizationPolicies", i, raw)
        name, namespace, spec = _policy_header(raw, where)
        p = parse_authorization_policy(name, namespace, spec, where)
        remember(ResourceType.AUTHORIZATION_POLICY, p.key, where)
        policies.append(p)
    for i, (_, raw) in enumerate(top.items("peerAuthentications")):
        where = _label("peerAuthentications", i, raw)
        name, namespace, spec = _policy_header(raw, where)
        a = parse_peer_authentication(name, namespace, spec, where)
        remember(ResourceType.PEER_AUTHENTICATION, a.key, where)
        peers.append(a)
    for i, (_, raw) in enumerate(top.items("requestAuthentications")):
        where = _label("requestAuthentications", i, raw)
        name, namespace, spec = _policy_header(raw, where)
        ra = parse_request_authentication(name, namespace, spec, where)
        remember(ResourceType.REQUEST_AUTHENTICATION, ra.key, where)
        request_auths.append(ra)

    return RegistryFragment(
        source=source,
        trust_domain=trust_domain,
        namespaces=tuple(namespaces),
        workloads=tuple(workloads),
        services=tuple(services),
        authorization_policies=tuple(policies),
        peer_authentications=tuple(peers),
        request_authentications=tuple(request_auths),
        origin=origin,
        declares_objects=any(top.present(name) for name in _OBJECT_FIELDS),
    )


def decode_document(data: bytes, source: str) -> str:
    """File content as text: enforces the size cap and UTF-8."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise RegistryError(
            f"registry file {source} is larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB",
            hint="split it into several files in a registry directory",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RegistryError(
            f"registry file {source} is not UTF-8 text (byte {e.start})", hint="save it as UTF-8"
        ) from None


def parse_registry_bytes(data: bytes, source: str) -> RegistryState:
    """:func:`parse_registry` for raw file content."""
    return parse_registry(decode_document(data, source), source=source)


def read_registry_bytes(path: Path) -> bytes:
    """The file's content (at most one byte over the cap, so the cap can be reported)."""
    try:
        with path.open("rb") as fh:
            return fh.read(MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise RegistryError(
            f"registry file {path} does not exist",
            hint="create it (see examples/registry.yaml) or pass --registry with the right path",
        ) from None
    except OSError as e:
        raise RegistryError(
            f"cannot read registry file {path}: {e.strerror}",
            hint="check the path and its permissions",
        ) from None


def read_registry_file(path: Path) -> RegistryState:
    """Reads, parses and validates the single registry file at ``path``."""
    return parse_registry_bytes(read_registry_bytes(path), str(path))
