"""Python mirror of ebpf/include/veil_codes.h: drop reasons and pod flags.

This is the ONE place userspace decodes the numbers the BPF programs write.
A unit test parses the C header and fails when the two drift apart.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

__all__ = ["DROP_SLOTS", "DropReason", "PodFlag"]

# Size of struct veil_counters.drops[]; fixed so the pinned map layout does
# not change when a reason is added (see the header).
DROP_SLOTS: Final = 16


class DropReason(IntEnum):
    """Why a BPF program dropped a packet (enum veil_drop_reason)."""

    NONE = 0
    SPOOFED_SOURCE = 1
    NO_LISTENER = 2
    FOREIGN_LISTENER = 3
    NO_SOCKET = 4
    ASSIGN_FAILED = 5
    UDP_BLOCKED = 6
    PROTOCOL = 7
    FRAGMENT = 8
    MALFORMED = 9
    NOT_ZTUNNEL = 10
    ICMP = 11
    IPV6_UNKNOWN = 12

    @property
    def label(self) -> str:
        """Stable lower-case name for tables, JSON and metric labels."""
        return self.name.lower()

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: Final[dict[DropReason, str]] = {
    DropReason.NONE: "not a drop",
    DropReason.SPOOFED_SOURCE: "source address is not the pod's own",
    DropReason.NO_LISTENER: "ztunnel listener absent (fail closed)",
    DropReason.FOREIGN_LISTENER: "a socket without the ztunnel mark listens on the ztunnel port",
    DropReason.NO_SOCKET: "TCP segment without SYN matches no socket",
    DropReason.ASSIGN_FAILED: "the kernel refused bpf_sk_assign",
    DropReason.UDP_BLOCKED: "non-DNS UDP while UDP is restricted",
    DropReason.PROTOCOL: "IP protocol the mesh cannot police",
    DropReason.FRAGMENT: "IP fragment whose ports cannot be checked",
    DropReason.MALFORMED: "truncated or invalid header",
    DropReason.NOT_ZTUNNEL: "traffic to an enrolled pod that did not come from the ztunnel",
    DropReason.ICMP: "ICMP echo (allowed only with --allow-icmp-echo) or a non-error ICMP type",
    DropReason.IPV6_UNKNOWN: "IPv6 of an enrolled pod whose IPv6 address is not known yet",
}


class PodFlag(IntFlag):
    """struct veil_pod.flags (VEIL_POD_*)."""

    NONE = 0
    ENROLLED = 0x1
    IPV6 = 0x2
