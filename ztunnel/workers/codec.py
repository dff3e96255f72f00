"""The supervisor <-> worker wire format (sans-IO).

Every message is one frame::

    version (1 byte) | kind (1 byte) | length (4 bytes, big-endian) | body

``body`` is UTF-8 JSON for every kind but ``STATE``, whose body is the
controller's own ``WatchResponse`` protobuf (the one contract nodes already
speak, so a snapshot crosses the socket exactly as it crossed the network).

:class:`FrameDecoder` turns bytes into :class:`Frame` values and raises
:class:`IpcError` for anything that is not a frame of this version: an
unknown version or kind, or a body over :data:`MAX_FRAME`. The ``parse_*``
functions check the shape of a JSON body and raise :class:`IpcError` too, so
malformed input from a peer is one exception type the caller handles by
dropping that peer, never a crash.

Keys travel in ``CERT`` frames over an anonymous socketpair: they never
touch the filesystem.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from controller.api.model import TrustBundle, WatchUpdate
from controller.api.spiffe import SpiffeId
from controller.api.wire import watch_update_from_bytes, watch_update_to_bytes
from veil.errors import VeilError

from ..config import ZtunnelConfig
from ..identity import WorkloadCertificate

__all__ = [
    "MAX_FRAME",
    "VERSION",
    "Frame",
    "FrameDecoder",
    "Hello",
    "IpcError",
    "Kind",
    "decode_certificate",
    "decode_hello",
    "decode_state",
    "encode",
    "encode_certificate",
    "encode_hello",
    "encode_json",
    "encode_state",
    "parse_json",
]

VERSION = 1
# A snapshot of a large mesh is a few MB; anything far beyond that is a bug
# or a hostile peer, and buffering it would let one worker exhaust memory.
MAX_FRAME = 64 << 20
_HEADER = struct.Struct("!BBI")


class IpcError(VeilError):
    """A peer sent something that is not a valid frame or body."""


class Kind(enum.IntEnum):
    HELLO = 1  # supervisor -> worker: config and options (JSON)
    STATE = 2  # supervisor -> worker: WatchResponse protobuf
    CERT = 3  # supervisor -> worker: one workload certificate and key
    CERT_DROP = 4  # supervisor -> worker: forget an identity's certificate
    CERT_WANTED = 5  # worker -> supervisor: please fetch this identity
    CERT_REFUSED = 6  # supervisor -> worker: the fetch failed (error text)
    READY = 7  # worker -> supervisor: listeners bound (pid, ports)
    QUERY = 8  # supervisor -> worker: {id, what}
    ANSWER = 9  # worker -> supervisor: {id, body}
    DRAIN = 10  # supervisor -> worker: stop accepting, drain for {grace}
    DENY = 11  # worker -> supervisor: one policy deny (admin /denies feed)


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    body: bytes


def encode(kind: Kind, body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise IpcError(f"{kind.name} frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(VERSION, int(kind), len(body)) + body


def encode_json(kind: Kind, value: object) -> bytes:
    return encode(kind, json.dumps(value, separators=(",", ":")).encode())


class FrameDecoder:
    """Buffers bytes and yields whole frames; raises IpcError on garbage."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        while len(self._buf) >= _HEADER.size:
            version, kind, length = _HEADER.unpack_from(self._buf)
            if version != VERSION:
                raise IpcError(f"frame version {version}, expected {VERSION}")
            try:
                k = Kind(kind)
            except ValueError:
                raise IpcError(f"unknown frame kind {kind}") from None
            if length > self._max:
                raise IpcError(f"{k.name} frame of {length} bytes exceeds {self._max}")
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            out.append(Frame(k, bytes(self._buf[_HEADER.size : end])))
            del self._buf[:end]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def parse_json(frame: Frame) -> dict[str, Any]:
    """The JSON object in ``frame``'s body; IpcError when it is not one."""
    try:
        value = json.loads(frame.body)
    except (UnicodeDecodeError, ValueError) as e:
        raise IpcError(f"{frame.kind.name} body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise IpcError(f"{frame.kind.name} body is not a JSON object")
    return value


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise IpcError(f"{where}: field {name!r} is missing or has the wrong type")
    return value


# -- STATE ---------------------------------------------------------------------


def encode_state(update: WatchUpdate) -> bytes:
    return encode(Kind.STATE, watch_update_to_bytes(update))


def decode_state(frame: Frame) -> WatchUpdate:
    try:
        return watch_update_from_bytes(frame.body)
    except (ValueError, KeyError, TypeError, VeilError) as e:
        raise IpcError(f"STATE body is not a valid WatchResponse: {e}") from None


# -- CERT ----------------------------------------------------------------------


def encode_certificate(cert: WorkloadCertificate) -> bytes:
    return encode_json(
        Kind.CERT,
        {
            "identity": str(cert.identity),
            "key_pem": cert.key_pem.decode("ascii"),
            "chain_pem": [c.decode("ascii") for c in cert.chain_pem],
            "not_before": cert.not_before.isoformat(),
            "not_after": cert.not_after.isoformat(),
            "serial": cert.serial,
            "received_at": cert.received_at.isoformat() if cert.received_at else None,
        },
    )


def decode_certificate(frame: Frame) -> WorkloadCertificate:
    obj = parse_json(frame)
    w = "CERT"
    try:
        chain = _field(obj, "chain_pem", list, w)
        if not chain or not all(isinstance(c, str) for c in chain):
            raise IpcError("CERT: chain_pem must be a non-empty list of PEM strings")
        received = obj.get("received_at")
        return WorkloadCertificate(
            identity=SpiffeId.parse(_field(obj, "identity", str, w)),
            key_pem=_field(obj, "key_pem", str, w).encode("ascii"),
            chain_pem=tuple(c.encode("ascii") for c in chain),
            not_before=datetime.fromisoformat(_field(obj, "not_before", str, w)),
            not_after=datetime.fromisoformat(_field(obj, "not_after", str, w)),
            serial=_field(obj, "serial", int, w),
            received_at=datetime.fromisoformat(received) if isinstance(received, str) else None,
        )
    except (ValueError, UnicodeEncodeError, VeilError) as e:
        if isinstance(e, IpcError):
            raise
        raise IpcError(f"CERT: {e}") from None


# -- HELLO ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """What a worker is told before anything else."""

    index: int
    config: ZtunnelConfig
    join_bundle: TrustBundle
    transparent: bool
    mark: int | None
    peer_hbone_port: int | None


def _field_type(name: str) -> str:
    # The annotations are strings (postponed evaluation): "Path | None", ...
    return str(ZtunnelConfig.__dataclass_fields__[name].type)


def encode_hello(hello: Hello) -> bytes:
    cfg: dict[str, Any] = {}
    for name in ZtunnelConfig.__dataclass_fields__:
        value = getattr(hello.config, name)
        cfg[name] = str(value) if isinstance(value, Path) else value
    return encode_json(
        Kind.HELLO,
        {
            "index": hello.index,
            "config": cfg,
            "join_bundle": {
                "trust_domain": hello.join_bundle.trust_domain,
                "roots": [r.decode("ascii") for r in hello.join_bundle.roots],
            },
            "transparent": hello.transparent,
            "mark": hello.mark,
            "peer_hbone_port": hello.peer_hbone_port,
        },
    )


def decode_hello(frame: Frame) -> Hello:
    obj = parse_json(frame)
    w = "HELLO"
    cfg = dict(_field(obj, "config", dict, w))
    unknown = set(cfg) - set(ZtunnelConfig.__dataclass_fields__)
    if unknown:
        raise IpcError(f"HELLO: unknown config fields {sorted(unknown)}")
    for name, value in cfg.items():
        kind = _field_type(name)
        if kind.startswith("Path") and isinstance(value, str):
            cfg[name] = Path(value)
        elif kind.startswith("tuple[str, int]") and isinstance(value, list) and len(value) == 2:
            if not isinstance(value[1], int):
                raise IpcError(f"HELLO: config field {name!r} has the wrong type")
            cfg[name] = (str(value[0]), value[1])
    bundle = _field(obj, "join_bundle", dict, w)
    roots = _field(bundle, "roots", list, w)
    mark = obj.get("mark")
    peer = obj.get("peer_hbone_port")
    try:
        config = ZtunnelConfig(**cfg)
        return Hello(
            index=_field(obj, "index", int, w),
            config=config,
            join_bundle=TrustBundle(
                _field(bundle, "trust_domain", str, w), tuple(str(r).encode() for r in roots)
            ),
            transparent=bool(obj.get("transparent", True)),
            mark=mark if isinstance(mark, int) else None,
            peer_hbone_port=peer if isinstance(peer, int) else None,
        )
    except (TypeError, ValueError, VeilError) as e:
        if isinstance(e, IpcError):
            raise
        raise IpcError(f"HELLO: {e}") from None
