/* SPDX-License-Identifier: Apache-2.0 */
/*
 * IPv4 header parsing for tc programs.
 *
 * Headers are copied with bpf_skb_load_bytes() rather than read through
 * skb->data/data_end: veth and the uplink can hand us non-linear skbs (GRO,
 * GSO) whose L4 header is not in the linear area, and direct packet access
 * would then fail the bounds check and misclassify the packet. The copy
 * costs a few nanoseconds and needs no verifier-visible bounds dance.
 */
#ifndef VEIL_PACKET_H
#define VEIL_PACKET_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>

#include "veil_codes.h"

/* include/net/ip.h is not UAPI; these are the two fragment bits we test. */
#define VEIL_IP_MF 0x2000
#define VEIL_IP_OFFSET 0x1FFF

#define VEIL_TCP_FLAG_SYN 0x02
#define VEIL_TCP_FLAG_ACK 0x10

struct veil_packet {
	struct bpf_sock_tuple tuple; /* ipv4 half only; ports in network order */
	__u8 protocol;
	__u8 has_ports; /* an L4 header was read */
	__u8 syn_only;  /* TCP SYN without ACK: the first packet of a new connection */
	__u8 fragment;  /* part of a fragmented datagram */
};

/* The first 14 bytes of a TCP header: ports, then the flags byte at offset 13. */
struct veil_tcp_head {
	__be16 source;
	__be16 dest;
	__be32 seq;
	__be32 ack_seq;
	__u8 doff_res;
	__u8 flags;
};

struct veil_l4_ports {
	__be16 source;
	__be16 dest;
};

/*
 * Parse the IPv4 and L4 headers behind an Ethernet header. The caller has
 * already checked skb->protocol == ETH_P_IP. Returns 0 or -VEIL_DROP_MALFORMED.
 */
static __always_inline int veil_parse_ipv4(struct __sk_buff *skb, struct veil_packet *pkt)
{
	struct iphdr ip;
	__u32 l4;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -VEIL_DROP_MALFORMED;
	if (ip.version != 4 || ip.ihl < 5)
		return -VEIL_DROP_MALFORMED;

	pkt->tuple.ipv4.saddr = ip.saddr;
	pkt->tuple.ipv4.daddr = ip.daddr;
	pkt->protocol = ip.protocol;
	if (ip.frag_off & bpf_htons(VEIL_IP_MF | VEIL_IP_OFFSET))
		pkt->fragment = 1;
	/* Only the first fragment carries the L4 header. */
	if (ip.frag_off & bpf_htons(VEIL_IP_OFFSET))
		return 0;

	/* ihl is 4 bits wide, so l4 is bounded (<= 14 + 60) without an extra check. */
	l4 = ETH_HLEN + ip.ihl * 4;
	if (ip.protocol == IPPROTO_TCP) {
		struct veil_tcp_head tcp;

		if (bpf_skb_load_bytes(skb, l4, &tcp, sizeof(tcp)) < 0)
			return -VEIL_DROP_MALFORMED;
		pkt->tuple.ipv4.sport = tcp.source;
		pkt->tuple.ipv4.dport = tcp.dest;
		pkt->syn_only = (tcp.flags & (VEIL_TCP_FLAG_SYN | VEIL_TCP_FLAG_ACK)) == VEIL_TCP_FLAG_SYN;
		pkt->has_ports = 1;
	} else if (ip.protocol == IPPROTO_UDP) {
		struct veil_l4_ports udp;

		if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) < 0)
			return -VEIL_DROP_MALFORMED;
		pkt->tuple.ipv4.sport = udp.source;
		pkt->tuple.ipv4.dport = udp.dest;
		pkt->has_ports = 1;
	}
	return 0;
}

#endif /* VEIL_PACKET_H */
