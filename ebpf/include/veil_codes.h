/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Drop reasons and counter layout shared by every Veil BPF program.
 *
 * agent/bpf/codes.py mirrors veil_drop_reason in ONE IntEnum
 * (DropReason); tests/unit/agent/test_bpf_codes.py parses this file and fails
 * when the two disagree, so add a reason here and there in the same change.
 *
 * Reasons are small positive numbers because they index the drops[] array of
 * struct veil_counters. VEIL_DROP_SLOTS is fixed (not VEIL_DROP__MAX) so that
 * adding a reason does not change the value size of the pinned counters map:
 * a newer agent keeps reusing the map an older one pinned.
 */
#ifndef VEIL_CODES_H
#define VEIL_CODES_H

enum veil_drop_reason {
	VEIL_DROP_NONE = 0,             /* slot 0 is never counted: "no drop" */
	VEIL_DROP_SPOOFED_SOURCE = 1,   /* source IP is not the pod's own IP for that veth */
	VEIL_DROP_NO_LISTENER = 2,      /* ztunnel listener absent: fail closed, never pass */
	VEIL_DROP_FOREIGN_LISTENER = 3, /* a socket listens on the ztunnel port without the ztunnel mark */
	VEIL_DROP_NO_SOCKET = 4,        /* non-SYN TCP that matches no socket */
	VEIL_DROP_ASSIGN_FAILED = 5,    /* bpf_sk_assign() refused the socket */
	VEIL_DROP_UDP_BLOCKED = 6,      /* non-DNS UDP while VEIL_DROP_UDP is set */
	VEIL_DROP_PROTOCOL = 7,         /* IP protocol other than TCP, UDP, ICMP to/from an enrolled pod */
	VEIL_DROP_FRAGMENT = 8,         /* IP fragment whose ports cannot be checked */
	VEIL_DROP_MALFORMED = 9,        /* truncated or invalid IPv4/L4 header */
	VEIL_DROP_NOT_ZTUNNEL = 10,     /* egress guard: traffic to an enrolled pod not sent by the ztunnel */
	VEIL_DROP_ICMP = 11,            /* ICMP/ICMPv6 echo (unless VEIL_ALLOW_ICMP_ECHO) or another non-error type */
	VEIL_DROP_IPV6_UNKNOWN = 12,    /* IPv6 of an enrolled pod whose IPv6 address is not known yet */
	VEIL_DROP__MAX
};

#define VEIL_DROP_SLOTS 16

_Static_assert(VEIL_DROP__MAX <= VEIL_DROP_SLOTS,
	       "more drop reasons than counter slots: raising VEIL_DROP_SLOTS changes the pinned map layout");

/* Pod flags (struct veil_pod.flags), mirrored by agent/bpf/codes.py PodFlag. */
#define VEIL_POD_ENROLLED 0x1
/* At least one IPv6 address of the pod is in veil_pod_addrs: an unknown IPv6
 * source is then spoofed; without the flag it is VEIL_DROP_IPV6_UNKNOWN. */
#define VEIL_POD_IPV6 0x2

#endif /* VEIL_CODES_H */
