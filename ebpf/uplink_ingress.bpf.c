/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tc ingress on the node's uplink: packets arriving from other nodes, IPv4
 * and IPv6 alike.
 *
 * Only TCP addressed to an enrolled local pod (veil_local_ips,
 * veil_local_ips6) is ours. It goes to an existing socket first (replies to
 * the ztunnel's transparent connections that leave the node with a pod's
 * source address), then a SYN to :VEIL_HBONE_PORT goes to the HBONE listener
 * and a SYN to any other port to the inbound plaintext listener, where
 * PERMISSIVE/STRICT is decided. Counters are charged to the destination pod.
 *
 * UDP and ICMP to enrolled pods are left to the pod's egress guard; anything
 * else, including packets we cannot parse, is TC_ACT_UNSPEC: the uplink
 * carries the node's own traffic too, and it is not ours to judge.
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
static __always_inline int uplink_drop(const struct veil_packet *pkt, __u32 ifindex,
					struct veil_counters *c, int reason)
{
	struct veil_drop_event ev;
	__u32 zero = 0;

	if (veil_drop_event_take(veil_drop_limit.lookup(&zero), pkt, ifindex, reason,
				 VEIL_PROG_UPLINK_INGRESS, &ev))
		veil_drop_events.ringbuf_output(&ev, sizeof(ev), 0);
	return veil_drop(c, reason);
}

int veil_uplink_ingress(struct __sk_buff *skb)
{
	struct veil_packet pkt = {};
	struct veil_local_pod *dst;
	struct veil_counters *c;
	__u32 dst_ifindex;
	__u16 port;
	int ret;

	if (!veil_is_ip(skb))
		return TC_ACT_UNSPEC;
	if (veil_parse(skb, &pkt) < 0)
		return TC_ACT_UNSPEC;
	if (pkt.protocol != IPPROTO_TCP)
		return TC_ACT_UNSPEC;
	if (pkt.family == VEIL_AF_INET6) {
		struct veil_ip6 key = {};

		__builtin_memcpy(key.addr, pkt.tuple.ipv6.daddr, sizeof(key.addr));
		dst = veil_local_ips6.lookup(&key);
	} else {
		dst = veil_local_ips.lookup(&pkt.tuple.ipv4.daddr);
	}
	if (!dst)
		return TC_ACT_UNSPEC;

	port = VEIL_INBOUND_PLAINTEXT_PORT;
	if (pkt.has_ports && pkt.dport == bpf_htons(VEIL_HBONE_PORT))
		port = VEIL_HBONE_PORT;
	dst_ifindex = dst->ifindex;
	c = veil_counters.lookup(&dst_ifindex);
	ret = veil_steer_tcp(skb, &pkt, port, c, true);
	return ret < 0 ? uplink_drop(&pkt, dst_ifindex, c, -ret) : ret;
}
