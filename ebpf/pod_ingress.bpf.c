/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tc ingress on a pod's host-side veth: packets coming FROM the pod.
 *
 * Enrolled pod:
 *   - the source address must be the pod's own (struct veil_pod.ip) or the
 *     packet is dropped: a pod must not borrow another workload's identity,
 *     and the ztunnel identifies the source workload by this address;
 *   - TCP goes to an existing socket or, for a SYN, to the ztunnel's outbound
 *     listener; anything else is dropped (veil_steer_tcp);
 *   - UDP passes (DNS), unless VEIL_DROP_UDP limits it to DNS;
 *   - ICMP passes (errors, ping); any other IP protocol is dropped, because
 *     the mesh cannot apply policy to it.
 * Known, non-enrolled local pod:
 *   - only TCP to an enrolled local pod is ours: it goes to the inbound
 *     plaintext listener, exactly as if it came from outside the node.
 * Everything else (non-IPv4, unknown veth, other traffic of non-enrolled
 * pods) gets TC_ACT_UNSPEC so other classifiers (the CNI's) still run.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "veil_maps.h"
#include "veil_packet.h"
#include "veil_steer.h"

static __always_inline int enrolled_pod(struct __sk_buff *skb, struct veil_packet *pkt,
					const struct veil_pod *pod, struct veil_counters *c)
{
	if (pkt->tuple.ipv4.saddr != pod->ip)
		return veil_drop(c, VEIL_DROP_SPOOFED_SOURCE);

	switch (pkt->protocol) {
	case IPPROTO_TCP:
		return veil_steer_tcp(skb, pkt, VEIL_OUTBOUND_PORT, c, false);
	case IPPROTO_UDP:
#ifdef VEIL_DROP_UDP
		/* A non-first fragment has no ports to prove it is DNS. */
		if (!pkt->has_ports || pkt->tuple.ipv4.dport != bpf_htons(VEIL_DNS_PORT))
			return veil_drop(c, VEIL_DROP_UDP_BLOCKED);
#endif
		return TC_ACT_UNSPEC;
	case IPPROTO_ICMP:
		return TC_ACT_UNSPEC;
	default:
		return veil_drop(c, VEIL_DROP_PROTOCOL);
	}
}

static __always_inline int plain_pod(struct __sk_buff *skb, struct veil_packet *pkt,
				     const struct veil_pod *pod, __u32 ifindex)
{
	struct veil_local_pod *dst;
	__u32 dst_ifindex;

	if (pkt->protocol != IPPROTO_TCP)
		return TC_ACT_UNSPEC;
	dst = veil_local_ips.lookup(&pkt->tuple.ipv4.daddr);
	if (!dst)
		return TC_ACT_UNSPEC;
	/* The ztunnel matches ipBlocks against this source: keep it honest. */
	if (pkt->tuple.ipv4.saddr != pod->ip)
		return veil_drop(veil_counters.lookup(&ifindex), VEIL_DROP_SPOOFED_SOURCE);
	/* Steering is charged to the destination: it is that pod's inbound. */
	dst_ifindex = dst->ifindex;
	return veil_steer_tcp(skb, pkt, VEIL_INBOUND_PLAINTEXT_PORT,
			      veil_counters.lookup(&dst_ifindex), true);
}

int veil_pod_ingress(struct __sk_buff *skb)
{
	struct veil_packet pkt = {};
	struct veil_pod *pod;
	__u32 ifindex = skb->ifindex;
	int err;

	/* ARP, IPv6 and the rest are not steered; the egress guard treats
	 * non-IPv4 the same way, so the two programs agree on scope. */
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	pod = veil_pods.lookup(&ifindex);
	if (!pod)
		return TC_ACT_UNSPEC;

	err = veil_parse_ipv4(skb, &pkt);
	if (!(pod->flags & VEIL_POD_ENROLLED)) {
		if (err < 0)
			return TC_ACT_UNSPEC;
		return plain_pod(skb, &pkt, pod, ifindex);
	}
	if (err < 0)
		return veil_drop(veil_counters.lookup(&ifindex), -err);
	return enrolled_pod(skb, &pkt, pod, veil_counters.lookup(&ifindex));
}
