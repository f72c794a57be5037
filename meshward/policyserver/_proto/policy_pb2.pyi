from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class WatchRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class PolicyUpdate(_message.Message):
    __slots__ = ("document", "hash")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    document: bytes
    hash: str
    def __init__(self, document: _Optional[bytes] = ..., hash: _Optional[str] = ...) -> None: ...

class ProxyReport(_message.Message):
    __slots__ = ("namespace", "pod", "trust_bundle_fingerprint", "leaf_issuer_fingerprint", "leaf_not_after_unix", "proxy_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEAF_ISSUER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEAF_NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    PROXY_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    pod: str
    trust_bundle_fingerprint: str
    leaf_issuer_fingerprint: str
    leaf_not_after_unix: int
    proxy_version: str
    def __init__(self, namespace: _Optional[str] = ..., pod: _Optional[str] = ..., trust_bundle_fingerprint: _Optional[str] = ..., leaf_issuer_fingerprint: _Optional[str] = ..., leaf_not_after_unix: _Optional[int] = ..., proxy_version: _Optional[str] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("address", "port")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("meshed", "identities", "ttl_ms")
    MESHED_FIELD_NUMBER: _ClassVar[int]
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    meshed: bool
    identities: _containers.RepeatedScalarFieldContainer[str]
    ttl_ms: int
    def __init__(self, meshed: _Optional[bool] = ..., identities: _Optional[_Iterable[str]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...
