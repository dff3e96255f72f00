"""Resetting a pod's TCP connections at enrollment (what ``ss -K`` does, from the pod's namespace).

A flow a pod opened before it was enrolled is steered into the ztunnel from
the next packet on, and the ztunnel has no socket for it: the packets are
dropped and the application waits for its own TCP timeout (minutes). So at
enrollment the agent aborts the pod's existing TCP sockets: the application
gets ECONNABORTED at once and reconnects, now through the mesh.

How: the pod's network namespace is found from its host-side veth (the
veth's peer namespace id, compared with the id this namespace gives each
candidate under /run/netns and /proc/*/ns/net); a sock_diag netlink socket is
opened inside it (the calling thread enters the namespace only for the
``socket()`` call); the TCP sockets are dumped and each one that is not
loopback-to-loopback gets ``SOCK_DESTROY``.

Limits, reported once in the log and in the README: the kernel needs
``CONFIG_INET_DIAG_DESTROY`` (else every destroy answers EOPNOTSUPP), and
entering another network namespace needs ``CAP_SYS_ADMIN``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SocketReset", "reset_pod_tcp"]

log = logging.getLogger("veil.agent.sockreset")

_CLONE_NEWNET = 0x40000000
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_SOCK_DESTROY = 21
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP = 0x300
_NLMSG = struct.Struct("=IHHII")
# inet_diag_req_v2 without its sockid: family, protocol, ext, pad, states.
_REQ = struct.Struct("=BBBBI")
_SOCKID_LEN = 48  # be16 sport, be16 dport, src[16], dst[16], u32 if, u32 cookie[2]
# inet_diag_msg: family, state, timer, retrans, sockid, expires, rqueue, wqueue, uid, inode.
_MSG_HEAD = struct.Struct("=BBBB")
# Every TCP state with a full socket behind it that carries (or is about to
# carry) a flow: ESTABLISHED 1, SYN_SENT 2, FIN_WAIT1 4, FIN_WAIT2 5,
# CLOSE_WAIT 8, LAST_ACK 9, CLOSING 11. Not LISTEN (the pod's servers keep
# serving), TIME_WAIT / SYN_RECV (no full socket to abort) or CLOSE.
_STATES = sum(1 << s for s in (1, 2, 4, 5, 8, 9, 11))

_libc = ctypes.CDLL(None, use_errno=True)
_warned: set[str] = set()


@dataclass(frozen=True, slots=True)
class SocketReset:
    """What one reset did: sockets aborted, or why nothing could be done."""

    destroyed: int
    skipped: str | None = None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)


def _candidate_namespaces() -> Iterator[Path]:
    yield from sorted(Path("/run/netns").glob("*")) if Path("/run/netns").is_dir() else iter(())
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            yield proc / "ns" / "net"


def _find_netns(ipr: Any, host_ifindex: int) -> int | None:
    """An open fd on the network namespace at the other end of ``host_ifindex``."""
    links = ipr.link("get", index=host_ifindex)
    nsid = links[0].get_attr("IFLA_LINK_NETNSID") if links else None
    if nsid is None:
        return None
    seen: set[tuple[int, int]] = set()
    for path in _candidate_namespaces():
        try:
            st = path.stat()
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            answer = ipr.get_netnsid(fd=fd)
        except Exception:  # a namespace that vanished meanwhile
            answer = None
        if answer is not None and answer.get("nsid") == nsid:
            return fd
        os.close(fd)
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _diag_socket_in(netns_fd: int) -> socket.socket:
    """A sock_diag socket bound to ``netns_fd``'s namespace (this thread returns home)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(netns_fd)
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
        finally:
            # Failing to return would leave a worker thread in a pod's
            # namespace: nothing may continue after that.
            if _libc.setns(home, _CLONE_NEWNET) != 0:
                os.abort()
    finally:
        os.close(home)


def _request(family: int, sockid: bytes, msg_type: int, flags: int, seq: int) -> bytes:
    states = _STATES if msg_type == _SOCK_DIAG_BY_FAMILY else 0xFFFFFFFF
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states) + sockid
    return _NLMSG.pack(_NLMSG.size + len(body), msg_type, flags, seq, 0) + body


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, msg_type, _flags, seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return
        yield msg_type, seq, data[offset + _NLMSG.size : offset + length]
        offset += (length + 3) & ~3


def _loopback_pair(family: int, sockid: bytes) -> bool:
    size = 4 if family == socket.AF_INET else 16
    src = ipaddress.ip_address(sockid[4 : 4 + size])
    dst = ipaddress.ip_address(sockid[20 : 20 + size])
    return src.is_loopback and dst.is_loopback


def _dump(sock: socket.socket, family: int) -> list[bytes]:
    """The sockid of every TCP socket of ``family`` in the namespace worth aborting."""
    sock.send(
        _request(family, bytes(_SOCKID_LEN), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1)
    )
    found: list[bytes] = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return found
        for msg_type, _seq, payload in _messages(data):
            if msg_type == _NLMSG_DONE:
                return found
            if msg_type == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code:
                    raise OSError(-code, f"sock_diag dump: {os.strerror(-code)}")
                continue
            if msg_type != _SOCK_DIAG_BY_FAMILY or len(payload) < _MSG_HEAD.size + _SOCKID_LEN:
                continue
            fam, _state, _timer, _retrans = _MSG_HEAD.unpack_from(payload)
            sockid = payload[_MSG_HEAD.size : _MSG_HEAD.size + _SOCKID_LEN]
            if fam == family and not _loopback_pair(fam, sockid):
                found.append(sockid)


def _destroy(sock: socket.socket, family: int, sockid: bytes, seq: int) -> int:
    """0 when destroyed (or already gone), else the positive errno."""
    sock.send(_request(family, sockid, _SOCK_DESTROY, _NLM_F_REQUEST | _NLM_F_ACK, seq))
    while True:
        for msg_type, got_seq, payload in _messages(sock.recv(1 << 16)):
            if msg_type == _NLMSG_ERROR and got_seq == seq:
                (code,) = struct.unpack_from("=i", payload)
                return 0 if code in (0, -errno.ENOENT) else -code


def _destroy_all(sock: socket.socket) -> SocketReset:
    destroyed = 0
    seq = 100
    for family in (socket.AF_INET, socket.AF_INET6):
        for sockid in _dump(sock, family):
            seq += 1
            err = _destroy(sock, family, sockid, seq)
            if err == errno.EOPNOTSUPP:
                _warn_once(
                    "destroy",
                    "this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is off): "
                    "flows a pod opened before its enrollment stall until the application's "
                    "TCP timeout; a kernel with that option resets them at enrollment",
                )
                return SocketReset(destroyed, "kernel lacks CONFIG_INET_DIAG_DESTROY")
            if err == 0:
                destroyed += 1
            else:
                log.debug("SOCK_DESTROY failed: %s", os.strerror(err))
    return SocketReset(destroyed)


def reset_pod_tcp(ipr: Any, host_ifindex: int) -> SocketReset:
    """Aborts the TCP connections of the pod behind ``host_ifindex`` (its host veth).

    ``ipr`` is an open ``IPRoute`` in the node's namespace. Never raises: a
    pod whose connections cannot be reset keeps them (as before enrollment
    existed), and the reason is returned and logged once per kind.
    """
    try:
        netns_fd = _find_netns(ipr, host_ifindex)
    except Exception as e:
        return SocketReset(0, f"cannot find the pod's network namespace: {e}")
    if netns_fd is None:
        _warn_once(
            "netns",
            "cannot find pods' network namespaces (the agent needs the host's /run/netns or "
            "/proc): flows opened before enrollment are not reset",
        )
        return SocketReset(0, "pod network namespace not found")
    try:
        try:
            sock = _diag_socket_in(netns_fd)
        except OSError as e:
            if e.errno == errno.EPERM:
                _warn_once(
                    "setns",
                    "cannot enter pods' network namespaces (needs CAP_SYS_ADMIN): flows "
                    "opened before enrollment are not reset",
                )
            return SocketReset(0, f"cannot enter the pod's network namespace: {e}")
        with sock:
            sock.settimeout(2.0)
            try:
                return _destroy_all(sock)
            except OSError as e:
                return SocketReset(0, f"sock_diag failed: {e}")
    finally:
        with contextlib.suppress(OSError):
            os.close(netns_fd)
