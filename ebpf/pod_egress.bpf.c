/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tc egress on an ENROLLED pod's host-side veth: the egress guard for packets
 * going TO the pod. Only the ztunnel may talk TCP to an enrolled pod, so a
 * path that skipped steering (a missing filter, another node component, a
 * route around the uplink) cannot reach it with plaintext.
 *
 * What passes (TC_ACT_UNSPEC, so other classifiers still run):
 *   - anything carrying the ztunnel mark: the ztunnel sets SO_MARK on all of
 *     its sockets (listeners included, so SYN-ACKs and replies of accepted
 *     connections carry it too). For locally generated packets skb->mark is
 *     set from sk_mark at output and is still intact at the egress hook of
 *     the same namespace; veth scrubs the mark only when the packet crosses
 *     into the pod. Packets that arrive from elsewhere cannot carry it: a
 *     pod's own SO_MARK is scrubbed when it leaves the pod's namespace, and
 *     the uplink does not carry marks. The netns tests verify this;
 *   - TCP from the configured node probe source (kubelet probes), read from
 *     the config map so it can change without a reload;
 *   - ICMP (errors keep PMTU discovery and unreachable reports working);
 *   - UDP (DNS replies); with VEIL_DROP_UDP only replies from port 53;
 *   - non-IPv4 (ARP keeps the pod reachable).
 * There is no generic "reply" exception: the pod's own connections are all
 * proxied, so their replies come from ztunnel sockets and carry the mark; a
 * packet that merely looks like a reply (ACK without SYN) could be forged.
 * Everything else is dropped and counted as VEIL_DROP_NOT_ZTUNNEL.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "veil_maps.h"
#include "veil_packet.h"

static __always_inline bool from_probe_source(__be32 saddr)
{
	__u32 key = 0;
	struct veil_config *cfg = veil_config.lookup(&key);

	return cfg && cfg->probe_source != 0 && cfg->probe_source == saddr;
}

int veil_pod_egress(struct __sk_buff *skb)
{
	struct veil_packet pkt = {};
	struct veil_pod *pod;
	__u32 ifindex = skb->ifindex;
	int err;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	pod = veil_pods.lookup(&ifindex);
	if (!pod || !(pod->flags & VEIL_POD_ENROLLED))
		return TC_ACT_UNSPEC;
	if ((skb->mark & VEIL_MARK_MASK) == VEIL_MARK_ZTUNNEL)
		return TC_ACT_UNSPEC;

	err = veil_parse_ipv4(skb, &pkt);
	if (err < 0)
		return veil_drop(veil_counters.lookup(&ifindex), -err);

	switch (pkt.protocol) {
	case IPPROTO_TCP:
		if (from_probe_source(pkt.tuple.ipv4.saddr))
			return TC_ACT_UNSPEC;
		return veil_drop(veil_counters.lookup(&ifindex), VEIL_DROP_NOT_ZTUNNEL);
	case IPPROTO_UDP:
#ifdef VEIL_DROP_UDP
		if (!pkt.has_ports || pkt.tuple.ipv4.sport != bpf_htons(VEIL_DNS_PORT))
			return veil_drop(veil_counters.lookup(&ifindex), VEIL_DROP_UDP_BLOCKED);
#endif
		return TC_ACT_UNSPEC;
	case IPPROTO_ICMP:
		return TC_ACT_UNSPEC;
	default:
		return veil_drop(veil_counters.lookup(&ifindex), VEIL_DROP_PROTOCOL);
	}
}
