/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map definitions shared by every Veil program.
 *
 * All maps are pinned under VEIL_PIN_DIR with BPF_TABLE_PINNED: bcc (0.26)
 * opens the pinned map when the path exists and otherwise creates the map and
 * pins it there. Whichever program is compiled first creates the maps; the
 * others, and every later agent process, reuse them. The state therefore
 * survives an agent restart or kill -9, and a recompiled program sees the
 * entries the previous one used.
 *
 * bcc does not check that a reused pin has the declared layout, so the agent
 * compares key and value sizes of each pin against agent/bpf/maps.py before
 * compiling (see Dataplane.open). Change a struct here only together with
 * maps.py; the sizes below are part of the on-node ABI.
 *
 * Byte order: IP addresses are stored in network byte order (as they appear
 * in the packet), ifindexes and flags in host order.
 */
#ifndef VEIL_MAPS_H
#define VEIL_MAPS_H

#include <uapi/linux/pkt_cls.h>

#include "veil_codes.h"
#include "veil_config.h"

/* pods: host-side veth ifindex -> the pod behind it. */
struct veil_pod {
	__be32 ip;    /* the pod's IPv4 source address */
	__u32 flags;  /* VEIL_POD_ENROLLED, VEIL_POD_IPV6 */
};

/*
 * pod_addrs: every source address a pod may use, IPv4 and IPv6, keyed by
 * (veth, family, address) so one pod can hold one IPv4 and several IPv6
 * addresses. IPv4 addresses sit in addr[0] with the rest zero. The key has
 * explicit padding and programs zero it before filling it in: hash keys
 * compare every byte.
 */
struct veil_pod_addr_key {
	__u32 ifindex;  /* host-side veth of the pod */
	__u8 family;    /* AF_INET or AF_INET6 */
	__u8 pad[3];
	__be32 addr[4];
};

struct veil_pod_addr {
	__u32 flags;    /* reserved, 0 */
};

/* local_ips6: enrolled local pod IPv6 address -> where it lives. */
struct veil_ip6 {
	__be32 addr[4];
};

/* local_ips: enrolled local pod IP -> where it lives. */
struct veil_local_pod {
	__u32 ifindex; /* host-side veth of the pod */
	__u32 flags;
};

/*
 * counters: per-CPU, keyed by the pod's host-side veth ifindex. Inbound
 * events seen on the uplink are charged to the destination pod, so each
 * pod's row tells its whole story. The agent creates the row when it enrolls
 * a pod and deletes it on removal; programs only look rows up, so an in-flight
 * packet cannot resurrect a row for a pod that is gone.
 */
struct veil_counters {
	__u64 outbound_redirected; /* new connections from the pod sent to the outbound listener */
	__u64 inbound_redirected;  /* new connections to the pod sent to the inbound listeners */
	__u64 established;         /* packets handed to an existing socket */
	__u64 drops[VEIL_DROP_SLOTS];
};

/* config: a single slot (key 0) of node-wide runtime settings. */
struct veil_config {
	__be32 probe_source;  /* node address kubelet probes come from; 0 = none */
	__u32 uplink_ifindex; /* for the agent: where the uplink program is attached */
	__u8 build_id[32];    /* sha256 of sources + flags of the loaded programs */
};

BPF_TABLE_PINNED("hash", __u32, struct veil_pod, veil_pods, VEIL_MAX_PODS,
		 VEIL_PIN_DIR "/pods");
BPF_TABLE_PINNED("hash", __be32, struct veil_local_pod, veil_local_ips, VEIL_MAX_PODS,
		 VEIL_PIN_DIR "/local_ips");
BPF_TABLE_PINNED("hash", struct veil_pod_addr_key, struct veil_pod_addr, veil_pod_addrs,
		 VEIL_MAX_POD_ADDRS, VEIL_PIN_DIR "/pod_addrs");
BPF_TABLE_PINNED("hash", struct veil_ip6, struct veil_local_pod, veil_local_ips6,
		 VEIL_MAX_POD_ADDRS, VEIL_PIN_DIR "/local_ips6");
BPF_TABLE_PINNED("percpu_hash", __u32, struct veil_counters, veil_counters, VEIL_MAX_PODS,
		 VEIL_PIN_DIR "/counters");
BPF_TABLE_PINNED("array", __u32, struct veil_config, veil_config, 1,
		 VEIL_PIN_DIR "/config");

/*
 * bcc rewrites map method calls (veil_pods.lookup(...)) only in the main
 * source file, not in included headers: a .lookup() here would compile to an
 * indirect call the verifier rejects ("unknown opcode 8d"). So headers never
 * touch maps. Programs look a pod's counter row up once and pass the pointer
 * (NULL when the row is missing) to the shared helpers.
 */

/* Count and drop. Returning the verdict lets call sites read "return veil_drop(...)". */
static __always_inline int veil_drop(struct veil_counters *c, int reason)
{
	__u32 slot = reason;

	/* The explicit bound keeps the verifier sure the index stays inside drops[]. */
	if (c && slot < VEIL_DROP_SLOTS)
		c->drops[slot] += 1;
	return TC_ACT_SHOT;
}

#endif /* VEIL_MAPS_H */
