/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket steering: hand a packet to an existing socket, or to one of the
 * ztunnel's transparent listeners, with bpf_sk_assign().
 *
 * bpf_sk_assign() only sets skb->sk; the packet must still be routed to local
 * input, which is why every assigned packet also gets VEIL_MARK_REDIRECT: the
 * agent installs `ip rule fwmark MARK_REDIRECT/MARK_MASK lookup T` and
 * `ip route add local 0.0.0.0/0 dev lo table T` (and the same with `ip -6`
 * and ::/0 for IPv6). Without the mark the packet
 * would be forwarded to its original destination and the socket ignored.
 *
 * Verifier notes: every socket returned by bpf_skc_lookup_tcp() holds a
 * reference that must be released on every path, including after a
 * successful bpf_sk_assign() (which takes its own reference). Reading ->mark
 * needs a full socket, hence bpf_sk_fullsock() on the listener.
 */
#ifndef VEIL_STEER_H
#define VEIL_STEER_H

#include "veil_codes.h"
#include "veil_config.h"
#include "veil_maps.h"
#include "veil_packet.h"

/* Results of the helpers below (besides negative drop reasons). */
#define VEIL_STEER_NONE 0
#define VEIL_STEER_ASSIGNED 1

static __always_inline void veil_mark_redirect(struct __sk_buff *skb)
{
	skb->mark = (skb->mark & ~VEIL_MARK_MASK) | VEIL_MARK_REDIRECT;
}

/*
 * Assign the packet to the socket that owns its exact 4-tuple, if any:
 * replies to the ztunnel's transparent connections, later packets of
 * connections already accepted by a listener, handshakes in progress.
 *
 * A listener that happens to match the original destination (say sshd on
 * the node's 0.0.0.0:22) is not this flow's socket: assigning it would let a
 * pod reach a node service around the ztunnel, so listeners are skipped.
 * For a SYN, a TIME_WAIT socket is skipped too: the kernel answers a SYN on a
 * TIME_WAIT socket by looking up a listener for the ORIGINAL destination
 * port, which again could be a node service rather than the ztunnel.
 */
static __always_inline int veil_assign_established(struct __sk_buff *skb,
						    struct veil_packet *pkt)
{
	struct bpf_sock *sk;
	long err;

	/* The tuple size tells the helper the family; it must be a constant per call. */
	if (pkt->family == VEIL_AF_INET6)
		sk = bpf_skc_lookup_tcp(skb, &pkt->tuple, sizeof(pkt->tuple.ipv6),
					BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_skc_lookup_tcp(skb, &pkt->tuple, sizeof(pkt->tuple.ipv4),
					BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return VEIL_STEER_NONE;
	if (sk->state == BPF_TCP_LISTEN || (pkt->syn_only && sk->state == BPF_TCP_TIME_WAIT)) {
		bpf_sk_release(sk);
		return VEIL_STEER_NONE;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return -VEIL_DROP_ASSIGN_FAILED;
	veil_mark_redirect(skb);
	return VEIL_STEER_ASSIGNED;
}

/*
 * Assign a new connection to the ztunnel listener on `port`.
 *
 * The listeners are bound to 0.0.0.0 / [::] with IP_TRANSPARENT /
 * IPV6_TRANSPARENT, so the lookup asks for the tuple (saddr, sport) ->
 * (0.0.0.0 or ::, port): a wildcard destination only matches wildcard-bound
 * listeners (see DESIGN.md "Facts verified"). A [::] listener without
 * IPV6_V6ONLY also answers the IPv4 lookup.
 * The accepted socket's getsockname() is still the original destination.
 *
 * Only a listener carrying the ztunnel mark (SO_MARK) qualifies; any other
 * process that binds the port would otherwise receive every pod's traffic.
 * No listener, or a foreign one, is a drop: fail closed, never pass.
 */
static __always_inline int veil_assign_listener(struct __sk_buff *skb, struct veil_packet *pkt,
						 __u16 port)
{
	struct bpf_sock_tuple ln = {};
	struct bpf_sock *sk;
	struct bpf_sock *full;
	long err;

	if (pkt->family == VEIL_AF_INET6) {
		/* daddr stays :: (zeroed above): only a [::]-bound listener matches. */
		__builtin_memcpy(ln.ipv6.saddr, pkt->tuple.ipv6.saddr, sizeof(ln.ipv6.saddr));
		ln.ipv6.sport = pkt->sport;
		ln.ipv6.dport = bpf_htons(port);
		sk = bpf_skc_lookup_tcp(skb, &ln, sizeof(ln.ipv6), BPF_F_CURRENT_NETNS, 0);
	} else {
		ln.ipv4.saddr = pkt->tuple.ipv4.saddr;
		ln.ipv4.sport = pkt->sport;
		ln.ipv4.daddr = 0;
		ln.ipv4.dport = bpf_htons(port);
		sk = bpf_skc_lookup_tcp(skb, &ln, sizeof(ln.ipv4), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return -VEIL_DROP_NO_LISTENER;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -VEIL_DROP_NO_LISTENER;
	}
	full = bpf_sk_fullsock(sk);
	if (!full || (full->mark & VEIL_MARK_MASK) != VEIL_MARK_ZTUNNEL) {
		bpf_sk_release(sk);
		return -VEIL_DROP_FOREIGN_LISTENER;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return -VEIL_DROP_ASSIGN_FAILED;
	veil_mark_redirect(skb);
	return VEIL_STEER_ASSIGNED;
}

/*
 * The whole TCP decision shared by the pod and uplink programs: an existing
 * socket first, else a new connection (SYN) to `port`, else drop. Success
 * counters go to `c`, the row of the pod the packet comes from or goes to
 * (may be NULL).
 *
 * Returns TC_ACT_OK when the packet was steered, or a negative drop reason:
 * the caller drops through its own helper, which counts the drop and reports
 * it to the drop stream (a map call, so it must live in the main source; see
 * veil_events.h).
 *
 * A non-SYN packet without a socket is dropped rather than passed, so a pod
 * cannot slip data past the ztunnel by never sending a SYN.
 */
static __always_inline int veil_steer_tcp(struct __sk_buff *skb, struct veil_packet *pkt,
					  __u16 port, struct veil_counters *c, bool inbound)
{
	int ret;

	/* A fragmented TCP segment has no reliable tuple to look up. */
	if (pkt->fragment || !pkt->has_ports)
		return -VEIL_DROP_FRAGMENT;

	ret = veil_assign_established(skb, pkt);
	if (ret < 0)
		return ret;
	if (ret == VEIL_STEER_ASSIGNED) {
		if (c)
			c->established += 1;
		return TC_ACT_OK;
	}
	if (!pkt->syn_only)
		return -VEIL_DROP_NO_SOCKET;

	ret = veil_assign_listener(skb, pkt, port);
	if (ret < 0)
		return ret;
	if (c) {
		if (inbound)
			c->inbound_redirected += 1;
		else
			c->outbound_redirected += 1;
	}
	/* TC_ACT_OK, not UNSPEC: the decision is final, and a later classifier
	 * must not redirect a packet that now belongs to a ztunnel socket. */
	return TC_ACT_OK;
}

#endif /* VEIL_STEER_H */
