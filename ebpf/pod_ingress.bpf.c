/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tc ingress on a pod's host-side veth: packets coming FROM the pod, IPv4
 * and IPv6 alike.
 *
 * Enrolled pod:
 *   - IPv6 neighbour discovery and MLD to link-scoped destinations pass
 *     first: they use link-local or unspecified sources and keep the link up;
 *   - the source address must be one of the pod's own (struct veil_pod.ip,
 *     or an IPv6 entry of veil_pod_addrs) or the packet is dropped: a pod
 *     must not borrow another workload's identity, and the ztunnel
 *     identifies the source workload by this address. IPv6 before any IPv6
 *     address of the pod is known is dropped as VEIL_DROP_IPV6_UNKNOWN,
 *     never passed: an enrolled pod's traffic never gets TC_ACT_UNSPEC
 *     just because its family is new to us;
 *   - TCP goes to an existing socket or, for a SYN, to the ztunnel's outbound
 *     listener; anything else is dropped (veil_steer_tcp);
 *   - UDP passes (DNS), unless VEIL_DROP_UDP limits it to DNS;
 *   - ICMP errors pass; echo only with VEIL_ALLOW_ICMP_ECHO; other ICMP and
 *     any other IP protocol is dropped, because the mesh cannot police it.
 * Known, non-enrolled local pod:
 *   - only TCP to an enrolled local pod is ours: it goes to the inbound
 *     plaintext listener, exactly as if it came from outside the node.
 * Everything else (non-IP such as ARP, unknown veth, other traffic of
 * non-enrolled pods) gets TC_ACT_UNSPEC so other classifiers (the CNI's)
 * still run.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "veil_events.h"
#include "veil_maps.h"
#include "veil_packet.h"
#include "veil_steer.h"

/*
 * Count a drop on the pod's row and report it to the drop stream. It lives
 * here, not in a header, because bcc rewrites map calls only in the main
 * source (veil_events.h); `ifindex` names the pod whose row is charged.
 */
static __always_inline int pod_ingress_drop(const struct veil_packet *pkt, __u32 ifindex,
					    struct veil_counters *c, int reason)
{
	struct veil_drop_event ev;
	__u32 zero = 0;

	if (veil_drop_event_take(veil_drop_limit.lookup(&zero), pkt, ifindex, reason,
				 VEIL_PROG_POD_INGRESS, &ev))
		veil_drop_events.ringbuf_output(&ev, sizeof(ev), 0);
	return veil_drop(c, reason);
}

/* 0 when the pod behind `ifindex` owns the packet's source address, else the drop reason. */
static __always_inline int ingress_source_reason(__u32 ifindex, const struct veil_packet *pkt,
						 const struct veil_pod *pod)
{
	struct veil_pod_addr_key key = {};

	/* An IPv6-only pod is enrolled with ip 0.0.0.0: none of its IPv4 is its own,
	 * not even a packet whose source is 0.0.0.0. */
	if (pkt->family == VEIL_AF_INET)
		return pod->ip != 0 && pkt->tuple.ipv4.saddr == pod->ip ? 0 : VEIL_DROP_SPOOFED_SOURCE;
	key.ifindex = ifindex;
	key.family = VEIL_AF_INET6;
	__builtin_memcpy(key.addr, pkt->tuple.ipv6.saddr, sizeof(key.addr));
	if (veil_pod_addrs.lookup(&key))
		return 0;
	return (pod->flags & VEIL_POD_IPV6) ? VEIL_DROP_SPOOFED_SOURCE : VEIL_DROP_IPV6_UNKNOWN;
}

static __always_inline int enrolled_pod(struct __sk_buff *skb, struct veil_packet *pkt,
					const struct veil_pod *pod, __u32 ifindex,
					struct veil_counters *c)
{
	int reason;

	if (veil_link_control(pkt, false))
		return TC_ACT_UNSPEC;
	reason = ingress_source_reason(ifindex, pkt, pod);
	if (reason)
		return pod_ingress_drop(pkt, ifindex, c, reason);

	switch (pkt->protocol) {
	case IPPROTO_TCP:
		reason = veil_steer_tcp(skb, pkt, VEIL_OUTBOUND_PORT, c, false);
		return reason < 0 ? pod_ingress_drop(pkt, ifindex, c, -reason) : reason;
	case IPPROTO_UDP:
#ifdef VEIL_DROP_UDP
		/* A non-first fragment has no ports to prove it is DNS. */
		if (!pkt->has_ports || pkt->dport != bpf_htons(VEIL_DNS_PORT))
			return pod_ingress_drop(pkt, ifindex, c, VEIL_DROP_UDP_BLOCKED);
#endif
		return TC_ACT_UNSPEC;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		reason = veil_icmp_reason(pkt);
		if (reason)
			return pod_ingress_drop(pkt, ifindex, c, reason);
		return TC_ACT_UNSPEC;
	default:
		return pod_ingress_drop(pkt, ifindex, c, VEIL_DROP_PROTOCOL);
	}
}

static __always_inline int plain_pod(struct __sk_buff *skb, struct veil_packet *pkt,
				     const struct veil_pod *pod, __u32 ifindex)
{
	struct veil_local_pod *dst;
	struct veil_counters *c;
	__u32 dst_ifindex;
	int reason;

	if (pkt->protocol != IPPROTO_TCP)
		return TC_ACT_UNSPEC;
	if (pkt->family == VEIL_AF_INET6) {
		struct veil_ip6 key = {};

		__builtin_memcpy(key.addr, pkt->tuple.ipv6.daddr, sizeof(key.addr));
		dst = veil_local_ips6.lookup(&key);
	} else {
		dst = veil_local_ips.lookup(&pkt->tuple.ipv4.daddr);
	}
	if (!dst)
		return TC_ACT_UNSPEC;
	/* The ztunnel matches ipBlocks against this source: keep it honest. */
	reason = ingress_source_reason(ifindex, pkt, pod);
	if (reason)
		return pod_ingress_drop(pkt, ifindex, veil_counters.lookup(&ifindex), reason);
	/* Steering is charged to the destination: it is that pod's inbound. */
	dst_ifindex = dst->ifindex;
	c = veil_counters.lookup(&dst_ifindex);
	reason = veil_steer_tcp(skb, pkt, VEIL_INBOUND_PLAINTEXT_PORT, c, true);
	return reason < 0 ? pod_ingress_drop(pkt, dst_ifindex, c, -reason) : reason;
}

int veil_pod_ingress(struct __sk_buff *skb)
{
	struct veil_packet pkt = {};
	struct veil_pod *pod;
	__u32 ifindex = skb->ifindex;
	int err;

	/* ARP and other non-IP frames are not steered: they cannot leave the
	 * veth's link, and the egress guard scopes itself the same way. */
	if (!veil_is_ip(skb))
		return TC_ACT_UNSPEC;
	pod = veil_pods.lookup(&ifindex);
	if (!pod)
		return TC_ACT_UNSPEC;

	err = veil_parse(skb, &pkt);
	if (!(pod->flags & VEIL_POD_ENROLLED)) {
		if (err < 0)
			return TC_ACT_UNSPEC;
		return plain_pod(skb, &pkt, pod, ifindex);
	}
	if (err < 0)
		return pod_ingress_drop(&pkt, ifindex, veil_counters.lookup(&ifindex), -err);
	return enrolled_pod(skb, &pkt, pod, ifindex, veil_counters.lookup(&ifindex));
}
