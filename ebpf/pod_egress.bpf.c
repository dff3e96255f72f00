/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tc egress on an ENROLLED pod's host-side veth: the egress guard for packets
 * going TO the pod, IPv4 and IPv6 alike. Only the ztunnel may talk TCP to an
 * enrolled pod, so a path that skipped steering (a missing filter, another
 * node component, a route around the uplink) cannot reach it with plaintext.
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
 *   - IPv6 neighbour discovery and MLD that cannot have been forwarded
 *     (veil_link_control): the node resolving and probing the pod;
 *   - TCP from the configured node probe sources (kubelet probes): the IPv4
 *     one is read from the config map so it can change without a reload; the
 *     IPv6 one is a build flag (VEIL_PROBE_SOURCE6_W0..3, veil_config.h);
 *   - ICMP errors (PMTU discovery and unreachable reports keep working);
 *     echo only with VEIL_ALLOW_ICMP_ECHO;
 *   - UDP (DNS replies); with VEIL_DROP_UDP only replies from port 53;
 *   - non-IP (ARP keeps the pod reachable).
 * IPv6 to a pod whose IPv6 address is not known yet is dropped
 * (VEIL_DROP_IPV6_UNKNOWN) rather than left unguarded.
 * There is no generic "reply" exception: the pod's own connections are all
 * proxied, so their replies come from ztunnel sockets and carry the mark; a
 * packet that merely looks like a reply (ACK without SYN) could be forged.
 * Everything else is dropped and counted as VEIL_DROP_NOT_ZTUNNEL (TCP) or
 * its own reason.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "veil_events.h"
#include "veil_maps.h"
#include "veil_packet.h"

/*
 * Count a drop on the pod's row and report it to the drop stream. It lives
 * here, not in a header, because bcc rewrites map calls only in the main
 * source (veil_events.h); `ifindex` names the pod whose row is charged.
 */
static __always_inline int pod_egress_drop(const struct veil_packet *pkt, __u32 ifindex,
					   struct veil_counters *c, int reason)
{
	struct veil_drop_event ev;
	__u32 zero = 0;

	if (veil_drop_event_take(veil_drop_limit.lookup(&zero), pkt, ifindex, reason,
				 VEIL_PROG_POD_EGRESS, &ev))
		veil_drop_events.ringbuf_output(&ev, sizeof(ev), 0);
	return veil_drop(c, reason);
}

static __always_inline bool from_probe_source(const struct veil_packet *pkt)
{
	__u32 key = 0;
	struct veil_config *cfg;

	if (pkt->family == VEIL_AF_INET6) {
#ifdef VEIL_PROBE_SOURCE6
		const __be32 *s = pkt->tuple.ipv6.saddr;

		return s[0] == bpf_htonl(VEIL_PROBE_SOURCE6_W0) &&
		       s[1] == bpf_htonl(VEIL_PROBE_SOURCE6_W1) &&
		       s[2] == bpf_htonl(VEIL_PROBE_SOURCE6_W2) &&
		       s[3] == bpf_htonl(VEIL_PROBE_SOURCE6_W3);
#else
		return false;
#endif
	}
	if (pkt->family != VEIL_AF_INET)
		return false;
	cfg = veil_config.lookup(&key);
	return cfg && cfg->probe_source != 0 && cfg->probe_source == pkt->tuple.ipv4.saddr;
}

int veil_pod_egress(struct __sk_buff *skb)
{
	struct veil_packet pkt = {};
	struct veil_pod *pod;
	__u32 ifindex = skb->ifindex;
	int err;

	if (!veil_is_ip(skb))
		return TC_ACT_UNSPEC;
	pod = veil_pods.lookup(&ifindex);
	if (!pod || !(pod->flags & VEIL_POD_ENROLLED))
		return TC_ACT_UNSPEC;
	if ((skb->mark & VEIL_MARK_MASK) == VEIL_MARK_ZTUNNEL)
		return TC_ACT_UNSPEC;

	err = veil_parse(skb, &pkt);
	if (err < 0)
		return pod_egress_drop(&pkt, ifindex, veil_counters.lookup(&ifindex), -err);
	if (veil_link_control(&pkt, true))
		return TC_ACT_UNSPEC;
	if (pkt.family == VEIL_AF_INET6 && !(pod->flags & VEIL_POD_IPV6))
		return pod_egress_drop(&pkt, ifindex, veil_counters.lookup(&ifindex), VEIL_DROP_IPV6_UNKNOWN);

	switch (pkt.protocol) {
	case IPPROTO_TCP:
		if (from_probe_source(&pkt))
			return TC_ACT_UNSPEC;
		return pod_egress_drop(&pkt, ifindex, veil_counters.lookup(&ifindex), VEIL_DROP_NOT_ZTUNNEL);
	case IPPROTO_UDP:
#ifdef VEIL_DROP_UDP
		if (!pkt.has_ports || pkt.sport != bpf_htons(VEIL_DNS_PORT))
			return pod_egress_drop(&pkt, ifindex, veil_counters.lookup(&ifindex), VEIL_DROP_UDP_BLOCKED);
#endif
		return TC_ACT_UNSPEC;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		err = veil_icmp_reason(&pkt);
		if (err)
			return pod_egress_drop(&pkt, ifindex, veil_counters.lookup(&ifindex), err);
		return TC_ACT_UNSPEC;
	default:
		return pod_egress_drop(&pkt, ifindex, veil_counters.lookup(&ifindex), VEIL_DROP_PROTOCOL);
	}
}
