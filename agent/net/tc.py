"""tc plumbing for Veil's BPF programs: clsact qdiscs and direct-action bpf filters.

Veil's filters use one fixed (priority, handle) per hook, so attaching is
``tc filter replace``: the kernel swaps the program of the existing filter
in place, atomically, and a reload never opens a window where a packet
meets no program (detach-then-attach would). Priority 1 puts Veil's
decision before other classifiers on the same hook; programs answer
TC_ACT_UNSPEC for traffic that is not theirs, so later filters (the CNI's)
still run. Veil recognises its own filters by name (``veil_*``).

The clsact qdisc may be shared with other software, so it is created when
missing and deleted only when no filter at all remains on it.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from pyroute2.netlink.exceptions import NetlinkError as PyrNetlinkError

from agent.errors import NetlinkError

__all__ = [
    "FILTER_PREFIX",
    "TC_HANDLE",
    "TC_PRIORITY",
    "Hook",
    "TcFilter",
    "attach_bpf",
    "detach_bpf",
    "ensure_clsact",
    "list_bpf_filters",
    "parse_bpf_options",
    "remove_clsact_if_unused",
]

TC_PRIORITY: Final = 1
TC_HANDLE: Final = 0x7E11
FILTER_PREFIX: Final = "veil_"
_ETH_P_ALL: Final = 0x0003
_TCA_OPTIONS: Final = 2
_TCA_BPF_NAME: Final = 7
_TCA_BPF_ID: Final = 11


class Hook(StrEnum):
    """A clsact hook: ingress (packets arriving on the interface) or egress (leaving it)."""

    INGRESS = "ingress"
    EGRESS = "egress"


_PARENT: Final = {Hook.INGRESS: 0xFFFFFFF2, Hook.EGRESS: 0xFFFFFFF3}


@dataclass(frozen=True)
class TcFilter:
    """A bpf filter on a clsact hook."""

    ifindex: int
    hook: Hook
    name: str
    prog_id: int | None
    priority: int
    handle: int

    @property
    def ours(self) -> bool:
        return self.name.startswith(FILTER_PREFIX) and self.handle == TC_HANDLE


def ensure_clsact(ipr: Any, ifindex: int) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except PyrNetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise _error(exc, f"add a clsact qdisc on ifindex {ifindex}") from exc


def attach_bpf(ipr: Any, ifindex: int, hook: Hook, prog_fd: int, name: str) -> None:
    """Attach (or atomically replace) Veil's filter on one hook of one interface."""
    ensure_clsact(ipr, ifindex)
    try:
        ipr.tc(
            "replace-filter",
            "bpf",
            ifindex,
            TC_HANDLE,
            parent=_PARENT[hook],
            fd=prog_fd,
            name=name,
            direct_action=True,
            prio=TC_PRIORITY,
            protocol=_ETH_P_ALL,
        )
    except PyrNetlinkError as exc:
        raise _error(exc, f"attach {name} to tc {hook} of ifindex {ifindex}") from exc


def detach_bpf(ipr: Any, ifindex: int, hook: Hook, name: str | None = None) -> bool:
    """Remove Veil's filter (only one called ``name``, if given) from one hook.

    False when there was none, or the link is gone.
    """
    present = [f for f in list_bpf_filters(ipr, ifindex) if f.ours and f.hook is hook]
    if not present or (name is not None and all(f.name != name for f in present)):
        return False
    try:
        ipr.tc(
            "del-filter",
            "bpf",
            ifindex,
            TC_HANDLE,
            parent=_PARENT[hook],
            prio=TC_PRIORITY,
            protocol=_ETH_P_ALL,
        )
    except PyrNetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise _error(exc, f"detach Veil's tc {hook} filter from ifindex {ifindex}") from exc
    return True


def list_bpf_filters(ipr: Any, ifindex: int) -> list[TcFilter]:
    """Every bpf filter on the clsact hooks of ``ifindex`` (empty if the link is gone)."""
    found: list[TcFilter] = []
    for hook, parent in _PARENT.items():
        try:
            messages = list(ipr.get_filters(index=ifindex, parent=parent))
        except PyrNetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                continue
            raise _error(exc, f"list tc filters of ifindex {ifindex}") from exc
        for msg in messages:
            if msg.get_attr("TCA_KIND") != "bpf" or not msg["handle"]:
                continue  # the per-priority header entry carries no filter
            name, prog_id = _bpf_name_and_id(msg)
            found.append(
                TcFilter(
                    ifindex=ifindex,
                    hook=hook,
                    name=name,
                    prog_id=prog_id,
                    priority=(msg["info"] >> 16) & 0xFFFF,
                    handle=msg["handle"],
                )
            )
    return found


def remove_clsact_if_unused(ipr: Any, ifindex: int) -> bool:
    """Delete the clsact qdisc when no filter remains on it (ours or anyone's)."""
    for parent in _PARENT.values():
        try:
            if any(m["handle"] for m in ipr.get_filters(index=ifindex, parent=parent)):
                return False
        except PyrNetlinkError:
            return False
    try:
        ipr.tc("del", "clsact", ifindex)
    except PyrNetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise _error(exc, f"remove the clsact qdisc of ifindex {ifindex}") from exc
    return True


def _bpf_name_and_id(msg: Any) -> tuple[str, int | None]:
    """Name and program id of a bpf filter message.

    pyroute2 (0.9) does not decode TCA_BPF_ID, so the nested TCA_OPTIONS
    attributes are walked in their raw form (4-byte aligned TLVs).
    """
    options = msg.get_nested("TCA_OPTIONS") if hasattr(msg, "get_nested") else None
    if options is None:
        return "", None
    raw = bytes(options.data[options.offset : options.offset + options.length])
    return parse_bpf_options(raw)


def parse_bpf_options(raw: bytes) -> tuple[str, int | None]:
    """(TCA_BPF_NAME, TCA_BPF_ID) from the raw TCA_OPTIONS attribute, header included."""
    name, prog_id = "", None
    pos = 4  # skip the TCA_OPTIONS header itself
    while pos + 4 <= len(raw):
        length, kind = struct.unpack_from("=HH", raw, pos)
        if length < 4 or pos + length > len(raw):
            break
        payload = raw[pos + 4 : pos + length]
        kind &= 0x3FFF  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
        if kind == _TCA_BPF_NAME:
            name = payload.split(b"\0", 1)[0].decode(errors="replace")
        elif kind == _TCA_BPF_ID and len(payload) >= 4:
            prog_id = struct.unpack_from("=I", payload)[0]
        pos += (length + 3) & ~3
    return name, prog_id


def _error(exc: PyrNetlinkError, action: str) -> NetlinkError:
    hint = "the agent needs CAP_NET_ADMIN in the node's network namespace"
    if exc.code in (errno.EOPNOTSUPP, errno.ENOENT):
        hint = "the kernel needs CONFIG_NET_SCH_INGRESS (clsact) and CONFIG_NET_CLS_BPF"
    elif exc.code == errno.ENODEV:
        hint = "the interface is gone (pod deleted?); re-resolve it and retry"
    return NetlinkError(f"cannot {action}: {exc.args[1] if len(exc.args) > 1 else exc}", hint=hint)
