/* SPDX-License-Identifier: Apache-2.0 */
/*
 * IPv4 and IPv6 header parsing for tc programs, and the ICMP rules shared by
 * the pod programs.
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
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "veil_codes.h"

/* include/linux/socket.h is not UAPI. */
#define VEIL_AF_INET 2
#define VEIL_AF_INET6 10

/* include/net/ip.h is not UAPI; these are the two fragment bits we test. */
#define VEIL_IP_MF 0x2000
#define VEIL_IP_OFFSET 0x1FFF
/* IPv6 fragment header: the offset is the upper 13 bits of frag_off. */
#define VEIL_IP6_OFFSET 0xFFF8
/* Extension headers walked before giving up (then the packet is malformed).
 * Real traffic carries zero or one; a bound keeps the loop verifiable. */
#define VEIL_IPV6_MAX_EXT 4

#define VEIL_TCP_FLAG_SYN 0x02
#define VEIL_TCP_FLAG_ACK 0x10

struct veil_packet {
	struct bpf_sock_tuple tuple; /* the half for `family`; ports in network order */
	__be16 sport;   /* copies of the tuple's ports, valid when has_ports */
	__be16 dport;
	__u8 family;    /* VEIL_AF_INET or VEIL_AF_INET6 */
	__u8 protocol;  /* L4 protocol (after IPv6 extension headers) */
	__u8 has_ports; /* an L4 header with ports was read */
	__u8 syn_only;  /* TCP SYN without ACK: the first packet of a new connection */
	__u8 fragment;  /* part of a fragmented datagram */
	__u8 has_icmp;  /* an ICMP/ICMPv6 header was read: icmp_type is valid */
	__u8 icmp_type;
	__u8 hop_limit; /* IPv4 TTL or IPv6 hop limit */
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

/* struct frag_hdr lives in include/net/ipv6.h, which is not UAPI. */
struct veil_ip6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

/* Read the L4 header at `l4` (ports, TCP flags, ICMP type). */
static __always_inline int veil_parse_l4(struct __sk_buff *skb, struct veil_packet *pkt, __u32 l4)
{
	if (pkt->protocol == IPPROTO_TCP) {
		struct veil_tcp_head tcp;

		if (bpf_skb_load_bytes(skb, l4, &tcp, sizeof(tcp)) < 0)
			return -VEIL_DROP_MALFORMED;
		pkt->sport = tcp.source;
		pkt->dport = tcp.dest;
		pkt->syn_only = (tcp.flags & (VEIL_TCP_FLAG_SYN | VEIL_TCP_FLAG_ACK)) == VEIL_TCP_FLAG_SYN;
		pkt->has_ports = 1;
	} else if (pkt->protocol == IPPROTO_UDP) {
		struct veil_l4_ports udp;

		if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) < 0)
			return -VEIL_DROP_MALFORMED;
		pkt->sport = udp.source;
		pkt->dport = udp.dest;
		pkt->has_ports = 1;
	} else if (pkt->protocol == IPPROTO_ICMP || pkt->protocol == IPPROTO_ICMPV6) {
		__u8 type;

		if (bpf_skb_load_bytes(skb, l4, &type, sizeof(type)) < 0)
			return -VEIL_DROP_MALFORMED;
		pkt->icmp_type = type;
		pkt->has_icmp = 1;
	}
	if (!pkt->has_ports)
		return 0;
	if (pkt->family == VEIL_AF_INET6) {
		pkt->tuple.ipv6.sport = pkt->sport;
		pkt->tuple.ipv6.dport = pkt->dport;
	} else {
		pkt->tuple.ipv4.sport = pkt->sport;
		pkt->tuple.ipv4.dport = pkt->dport;
	}
	return 0;
}

/*
 * Parse the IPv4 and L4 headers behind an Ethernet header. The caller has
 * already checked skb->protocol == ETH_P_IP. Returns 0 or -VEIL_DROP_MALFORMED.
 */
static __always_inline int veil_parse_ipv4(struct __sk_buff *skb, struct veil_packet *pkt)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -VEIL_DROP_MALFORMED;
	if (ip.version != 4 || ip.ihl < 5)
		return -VEIL_DROP_MALFORMED;

	pkt->family = VEIL_AF_INET;
	pkt->tuple.ipv4.saddr = ip.saddr;
	pkt->tuple.ipv4.daddr = ip.daddr;
	pkt->protocol = ip.protocol;
	pkt->hop_limit = ip.ttl;
	if (ip.frag_off & bpf_htons(VEIL_IP_MF | VEIL_IP_OFFSET))
		pkt->fragment = 1;
	/* Only the first fragment carries the L4 header. */
	if (ip.frag_off & bpf_htons(VEIL_IP_OFFSET))
		return 0;
	/* ihl is 4 bits wide, so l4 is bounded (<= 14 + 60) without an extra check. */
	return veil_parse_l4(skb, pkt, ETH_HLEN + ip.ihl * 4);
}

/*
 * Parse the IPv6 header, walk up to VEIL_IPV6_MAX_EXT extension headers, and
 * read the L4 header. The caller has checked skb->protocol == ETH_P_IPV6.
 * More extension headers than that is malformed: the mesh cannot tell what
 * the packet carries, so it must not guess.
 */
static __always_inline int veil_parse_ipv6(struct __sk_buff *skb, struct veil_packet *pkt)
{
	struct ipv6hdr ip6;
	__u32 off = ETH_HLEN + sizeof(ip6);
	__u8 next;
	int i;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return -VEIL_DROP_MALFORMED;
	if (ip6.version != 6)
		return -VEIL_DROP_MALFORMED;

	pkt->family = VEIL_AF_INET6;
	__builtin_memcpy(pkt->tuple.ipv6.saddr, &ip6.saddr, sizeof(pkt->tuple.ipv6.saddr));
	__builtin_memcpy(pkt->tuple.ipv6.daddr, &ip6.daddr, sizeof(pkt->tuple.ipv6.daddr));
	pkt->hop_limit = ip6.hop_limit;
	next = ip6.nexthdr;

#pragma unroll
	for (i = 0; i < VEIL_IPV6_MAX_EXT; i++) {
		if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS) {
			struct ipv6_opt_hdr ext;

			if (bpf_skb_load_bytes(skb, off, &ext, sizeof(ext)) < 0)
				return -VEIL_DROP_MALFORMED;
			next = ext.nexthdr;
			off += (ext.hdrlen + 1) * 8;
		} else if (next == IPPROTO_FRAGMENT) {
			struct veil_ip6_frag frag;

			if (bpf_skb_load_bytes(skb, off, &frag, sizeof(frag)) < 0)
				return -VEIL_DROP_MALFORMED;
			pkt->fragment = 1;
			next = frag.nexthdr;
			off += sizeof(frag);
			/* Only the first fragment carries the L4 header. */
			if (frag.frag_off & bpf_htons(VEIL_IP6_OFFSET)) {
				pkt->protocol = next;
				return 0;
			}
		} else {
			break;
		}
	}
	if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	    next == IPPROTO_FRAGMENT)
		return -VEIL_DROP_MALFORMED;
	pkt->protocol = next;
	return veil_parse_l4(skb, pkt, off);
}

/* Parse whichever IP version the frame carries; callers filtered the ethertype. */
static __always_inline int veil_parse(struct __sk_buff *skb, struct veil_packet *pkt)
{
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return veil_parse_ipv6(skb, pkt);
	return veil_parse_ipv4(skb, pkt);
}

static __always_inline bool veil_is_ip(struct __sk_buff *skb)
{
	return skb->protocol == bpf_htons(ETH_P_IP) || skb->protocol == bpf_htons(ETH_P_IPV6);
}

/*
 * Link-scoped IPv6 destination: fe80::/10 unicast, or interface/link-local
 * multicast (ffX1::, ffX2::). A router never forwards these, so a packet
 * addressed there cannot leave the veth's link.
 */
static __always_inline bool veil_ipv6_link_scope(const __be32 *addr)
{
	__u32 first = bpf_ntohl(addr[0]);

	if ((first & 0xffc00000) == 0xfe800000)
		return true;
	return (first >> 24) == 0xff && ((first >> 16) & 0xf) <= 2;
}

/*
 * Neighbour discovery (router/neighbour solicitation and advertisement,
 * redirect: 133-137) and MLD (130-132, 143): the link's own plumbing. They
 * pass only where they cannot be forwarded:
 *   - addressed to a link-scoped destination (both directions), or
 *   - towards the pod (`to_pod`) with hop limit 255, which only the node
 *     itself can send: a forwarded packet has been decremented (RFC 4861 7.1.1
 *     makes receivers require 255 too). The node's unicast NUD probes to a
 *     pod's global address take this path.
 */
static __always_inline bool veil_link_control(const struct veil_packet *pkt, bool to_pod)
{
	__u8 t = pkt->icmp_type;
	bool nd = t >= 133 && t <= 137;
	bool mld = (t >= 130 && t <= 132) || t == 143;

	if (pkt->family != VEIL_AF_INET6 || pkt->protocol != IPPROTO_ICMPV6 || !pkt->has_icmp)
		return false;
	if (!nd && !mld)
		return false;
	if (veil_ipv6_link_scope(pkt->tuple.ipv6.daddr))
		return true;
	return to_pod && nd && pkt->hop_limit == 255;
}

/*
 * ICMP to or from an enrolled pod (neighbour discovery was let through
 * before). Errors keep path MTU discovery and unreachable reports working:
 * IPv4 destination unreachable (3, including fragmentation needed), time
 * exceeded (11), parameter problem (12); ICMPv6 1-4 (unreachable, packet too
 * big, time exceeded, parameter problem). Echo request/reply is a data
 * channel no policy sees, so it passes only with VEIL_ALLOW_ICMP_ECHO. Every
 * other type (timestamps, redirects, router advertisements from a pod, ...)
 * is dropped: fail closed. Returns 0 to pass, or a drop reason.
 */
static __always_inline int veil_icmp_reason(const struct veil_packet *pkt)
{
	__u8 t = pkt->icmp_type;
	bool echo;

	/* ICMPv4 inside IPv6, or ICMPv6 inside IPv4, is nothing a host sends. */
	if ((pkt->protocol == IPPROTO_ICMP) != (pkt->family == VEIL_AF_INET))
		return VEIL_DROP_PROTOCOL;
	/* A later fragment has no type to check; errors are never fragmented. */
	if (!pkt->has_icmp)
		return VEIL_DROP_FRAGMENT;
	if (pkt->protocol == IPPROTO_ICMP) {
		if (t == 3 || t == 11 || t == 12)
			return 0;
		echo = t == 0 || t == 8;
	} else {
		if (t >= 1 && t <= 4)
			return 0;
		echo = t == 128 || t == 129;
	}
#ifdef VEIL_ALLOW_ICMP_ECHO
	if (echo)
		return 0;
#else
	(void)echo;
#endif
	return VEIL_DROP_ICMP;
}

#endif /* VEIL_PACKET_H */
