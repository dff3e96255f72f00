/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Same-node splice: the layout shared by ebpf/sockmap.bpf.c, the agent that
 * pins it (agent/bpf/splice.py) and the ztunnel that fills it
 * (ztunnel/proxy/splice.py, through raw bpf(2) calls). Change a struct here
 * only together with both Python mirrors; the sizes are part of the on-node
 * ABI (the agent checks them against the pins).
 *
 * Every key is a socket cookie (SO_COOKIE), which the kernel never reuses
 * while the machine runs, so a stale entry cannot name a newer socket.
 */
#ifndef VEIL_SPLICE_H
#define VEIL_SPLICE_H

#if !defined(VEIL_SPLICE_MAX)
#error "VEIL_SPLICE_MAX (spliced sockets per node) must be passed as a -D flag"
#endif

/* splice_peers: own cookie -> where my bytes go and how many went. */
struct veil_splice_peer {
	__u64 peer;   /* cookie of the socket that sends my received bytes on */
	__u64 bytes;  /* bytes the verdict redirected from me to peer */
};

#endif /* VEIL_SPLICE_H */
