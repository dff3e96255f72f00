from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResourceType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESOURCE_TYPE_UNSPECIFIED: _ClassVar[ResourceType]
    NAMESPACE: _ClassVar[ResourceType]
    WORKLOAD: _ClassVar[ResourceType]
    SERVICE: _ClassVar[ResourceType]
    AUTHORIZATION_POLICY: _ClassVar[ResourceType]
    PEER_AUTHENTICATION: _ClassVar[ResourceType]
    REQUEST_AUTHENTICATION: _ClassVar[ResourceType]

class PolicyAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALLOW: _ClassVar[PolicyAction]
    DENY: _ClassVar[PolicyAction]

class PeerAuthMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNSET: _ClassVar[PeerAuthMode]
    PERMISSIVE: _ClassVar[PeerAuthMode]
    STRICT: _ClassVar[PeerAuthMode]
RESOURCE_TYPE_UNSPECIFIED: ResourceType
NAMESPACE: ResourceType
WORKLOAD: ResourceType
SERVICE: ResourceType
AUTHORIZATION_POLICY: ResourceType
PEER_AUTHENTICATION: ResourceType
REQUEST_AUTHENTICATION: ResourceType
ALLOW: PolicyAction
DENY: PolicyAction
UNSET: PeerAuthMode
PERMISSIVE: PeerAuthMode
STRICT: PeerAuthMode

class JoinNodeRequest(_message.Message):
    __slots__ = ("token", "csr", "node")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr: bytes
    node: str
    def __init__(self, token: _Optional[str] = ..., csr: _Optional[bytes] = ..., node: _Optional[str] = ...) -> None: ...

class JoinNodeResponse(_message.Message):
    __slots__ = ("cert_chain", "trust_bundle", "node", "trust_domain", "controller_address")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    trust_bundle: _containers.RepeatedScalarFieldContainer[bytes]
    node: str
    trust_domain: str
    controller_address: str
    def __init__(self, cert_chain: _Optional[_Iterable[bytes]] = ..., trust_bundle: _Optional[_Iterable[bytes]] = ..., node: _Optional[str] = ..., trust_domain: _Optional[str] = ..., controller_address: _Optional[str] = ...) -> None: ...

class CreateCertificateRequest(_message.Message):
    __slots__ = ("csr", "ttl_seconds", "identity")
    CSR_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    ttl_seconds: int
    identity: str
    def __init__(self, csr: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ..., identity: _Optional[str] = ...) -> None: ...

class CreateCertificateResponse(_message.Message):
    __slots__ = ("cert_chain",)
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, cert_chain: _Optional[_Iterable[bytes]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("node", "types", "epoch", "version")
    NODE_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    node: str
    types: _containers.RepeatedScalarFieldContainer[ResourceType]
    epoch: str
    version: int
    def __init__(self, node: _Optional[str] = ..., types: _Optional[_Iterable[_Union[ResourceType, str]]] = ..., epoch: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("epoch", "version", "snapshot", "upserts", "removals", "trust_bundle")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    UPSERTS_FIELD_NUMBER: _ClassVar[int]
    REMOVALS_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    version: int
    snapshot: bool
    upserts: _containers.RepeatedCompositeFieldContainer[Resource]
    removals: _containers.RepeatedCompositeFieldContainer[ResourceRef]
    trust_bundle: TrustBundle
    def __init__(self, epoch: _Optional[str] = ..., version: _Optional[int] = ..., snapshot: _Optional[bool] = ..., upserts: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., removals: _Optional[_Iterable[_Union[ResourceRef, _Mapping]]] = ..., trust_bundle: _Optional[_Union[TrustBundle, _Mapping]] = ...) -> None: ...

class ResourceRef(_message.Message):
    __slots__ = ("type", "key")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    type: ResourceType
    key: str
    def __init__(self, type: _Optional[_Union[ResourceType, str]] = ..., key: _Optional[str] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("namespace", "workload", "service", "authorization_policy", "peer_authentication", "request_authentication")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_POLICY_FIELD_NUMBER: _ClassVar[int]
    PEER_AUTHENTICATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_AUTHENTICATION_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    workload: Workload
    service: Service
    authorization_policy: AuthorizationPolicy
    peer_authentication: PeerAuthentication
    request_authentication: RequestAuthentication
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., workload: _Optional[_Union[Workload, _Mapping]] = ..., service: _Optional[_Union[Service, _Mapping]] = ..., authorization_policy: _Optional[_Union[AuthorizationPolicy, _Mapping]] = ..., peer_authentication: _Optional[_Union[PeerAuthentication, _Mapping]] = ..., request_authentication: _Optional[_Union[RequestAuthentication, _Mapping]] = ...) -> None: ...

class TrustBundle(_message.Message):
    __slots__ = ("trust_domain", "roots")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ROOTS_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    roots: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, trust_domain: _Optional[str] = ..., roots: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Namespace(_message.Message):
    __slots__ = ("name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Workload(_message.Message):
    __slots__ = ("name", "namespace", "service_account", "node", "ips", "labels", "enrolled", "ready", "trust_domain")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    service_account: str
    node: str
    ips: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    enrolled: bool
    ready: bool
    trust_domain: str
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., node: _Optional[str] = ..., ips: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., enrolled: _Optional[bool] = ..., ready: _Optional[bool] = ..., trust_domain: _Optional[str] = ...) -> None: ...

class ServicePort(_message.Message):
    __slots__ = ("name", "port", "target_port")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    target_port: int
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., target_port: _Optional[int] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("name", "namespace", "vips", "ports", "selector", "endpoints", "use_waypoint", "use_waypoint_namespace")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    USE_WAYPOINT_FIELD_NUMBER: _ClassVar[int]
    USE_WAYPOINT_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    vips: _containers.RepeatedScalarFieldContainer[str]
    ports: _containers.RepeatedCompositeFieldContainer[ServicePort]
    selector: _containers.ScalarMap[str, str]
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    use_waypoint: str
    use_waypoint_namespace: str
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., vips: _Optional[_Iterable[str]] = ..., ports: _Optional[_Iterable[_Union[ServicePort, _Mapping]]] = ..., selector: _Optional[_Mapping[str, str]] = ..., endpoints: _Optional[_Iterable[str]] = ..., use_waypoint: _Optional[str] = ..., use_waypoint_namespace: _Optional[str] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("principals", "not_principals", "namespaces", "not_namespaces", "ip_blocks", "not_ip_blocks", "request_principals", "not_request_principals")
    PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    NOT_PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    NOT_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    IP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NOT_IP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    NOT_REQUEST_PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    principals: _containers.RepeatedScalarFieldContainer[str]
    not_principals: _containers.RepeatedScalarFieldContainer[str]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    not_namespaces: _containers.RepeatedScalarFieldContainer[str]
    ip_blocks: _containers.RepeatedScalarFieldContainer[str]
    not_ip_blocks: _containers.RepeatedScalarFieldContainer[str]
    request_principals: _containers.RepeatedScalarFieldContainer[str]
    not_request_principals: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, principals: _Optional[_Iterable[str]] = ..., not_principals: _Optional[_Iterable[str]] = ..., namespaces: _Optional[_Iterable[str]] = ..., not_namespaces: _Optional[_Iterable[str]] = ..., ip_blocks: _Optional[_Iterable[str]] = ..., not_ip_blocks: _Optional[_Iterable[str]] = ..., request_principals: _Optional[_Iterable[str]] = ..., not_request_principals: _Optional[_Iterable[str]] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("ports", "not_ports", "hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths")
    PORTS_FIELD_NUMBER: _ClassVar[int]
    NOT_PORTS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    NOT_HOSTS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    NOT_METHODS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    NOT_PATHS_FIELD_NUMBER: _ClassVar[int]
    ports: _containers.RepeatedScalarFieldContainer[int]
    not_ports: _containers.RepeatedScalarFieldContainer[int]
    hosts: _containers.RepeatedScalarFieldContainer[str]
    not_hosts: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[str]
    not_methods: _containers.RepeatedScalarFieldContainer[str]
    paths: _containers.RepeatedScalarFieldContainer[str]
    not_paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ports: _Optional[_Iterable[int]] = ..., not_ports: _Optional[_Iterable[int]] = ..., hosts: _Optional[_Iterable[str]] = ..., not_hosts: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[str]] = ..., not_methods: _Optional[_Iterable[str]] = ..., paths: _Optional[_Iterable[str]] = ..., not_paths: _Optional[_Iterable[str]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("key", "values", "not_values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NOT_VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    values: _containers.RepeatedScalarFieldContainer[str]
    not_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., not_values: _Optional[_Iterable[str]] = ...) -> None: ...

class TargetRef(_message.Message):
    __slots__ = ("kind", "name", "group")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    group: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class Rule(_message.Message):
    __slots__ = ("to", "when")
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    to: _containers.RepeatedCompositeFieldContainer[Operation]
    when: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, to: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ..., when: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., **kwargs) -> None: ...

class AuthorizationPolicy(_message.Message):
    __slots__ = ("name", "namespace", "has_selector", "selector", "action", "rules", "target_refs")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HAS_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    TARGET_REFS_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    has_selector: bool
    selector: _containers.ScalarMap[str, str]
    action: PolicyAction
    rules: _containers.RepeatedCompositeFieldContainer[Rule]
    target_refs: _containers.RepeatedCompositeFieldContainer[TargetRef]
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., has_selector: _Optional[bool] = ..., selector: _Optional[_Mapping[str, str]] = ..., action: _Optional[_Union[PolicyAction, str]] = ..., rules: _Optional[_Iterable[_Union[Rule, _Mapping]]] = ..., target_refs: _Optional[_Iterable[_Union[TargetRef, _Mapping]]] = ...) -> None: ...

class JwtHeader(_message.Message):
    __slots__ = ("name", "prefix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    prefix: str
    def __init__(self, name: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class JwtRule(_message.Message):
    __slots__ = ("issuer", "audiences", "jwks", "jwks_uri", "from_headers", "forward_original_token")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    JWKS_FIELD_NUMBER: _ClassVar[int]
    JWKS_URI_FIELD_NUMBER: _ClassVar[int]
    FROM_HEADERS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ORIGINAL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    audiences: _containers.RepeatedScalarFieldContainer[str]
    jwks: str
    jwks_uri: str
    from_headers: _containers.RepeatedCompositeFieldContainer[JwtHeader]
    forward_original_token: bool
    def __init__(self, issuer: _Optional[str] = ..., audiences: _Optional[_Iterable[str]] = ..., jwks: _Optional[str] = ..., jwks_uri: _Optional[str] = ..., from_headers: _Optional[_Iterable[_Union[JwtHeader, _Mapping]]] = ..., forward_original_token: _Optional[bool] = ...) -> None: ...

class RequestAuthentication(_message.Message):
    __slots__ = ("name", "namespace", "has_selector", "selector", "target_refs", "jwt_rules")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HAS_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    TARGET_REFS_FIELD_NUMBER: _ClassVar[int]
    JWT_RULES_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    has_selector: bool
    selector: _containers.ScalarMap[str, str]
    target_refs: _containers.RepeatedCompositeFieldContainer[TargetRef]
    jwt_rules: _containers.RepeatedCompositeFieldContainer[JwtRule]
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., has_selector: _Optional[bool] = ..., selector: _Optional[_Mapping[str, str]] = ..., target_refs: _Optional[_Iterable[_Union[TargetRef, _Mapping]]] = ..., jwt_rules: _Optional[_Iterable[_Union[JwtRule, _Mapping]]] = ...) -> None: ...

class PeerAuthentication(_message.Message):
    __slots__ = ("name", "namespace", "has_selector", "selector", "mode")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HAS_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    has_selector: bool
    selector: _containers.ScalarMap[str, str]
    mode: PeerAuthMode
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., has_selector: _Optional[bool] = ..., selector: _Optional[_Mapping[str, str]] = ..., mode: _Optional[_Union[PeerAuthMode, str]] = ...) -> None: ...
