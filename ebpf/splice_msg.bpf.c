/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Benchmark alternative to sockmap.bpf.c (sk_msg verdict, attached to
 * msg_socks); perf/bench_splice.py loads it, the agent does not.
 *
 * This is the "socket to socket" redirect Cilium and Merbridge use: the
 * APPLICATIONS' sockets sit in the sockhash and every sendmsg() is moved
 * straight into the receive queue of the peer application's socket
 * (BPF_F_INGRESS), skipping TCP on loopback altogether. A node proxy owns
 * neither of those sockets (they would have to be collected by a sockops
 * program on the pods' cgroups), which is why the ztunnel splices its own two
 * sockets with sk_skb instead; the benchmark measures what that costs.
 */
#include <uapi/linux/bpf.h>

#include "veil_splice.h"

BPF_SOCKHASH(msg_socks, __u64, VEIL_SPLICE_MAX);  /* same port keys */
BPF_TABLE("hash", __u64, struct veil_splice_peer, msg_peers, VEIL_SPLICE_MAX);

int veil_splice_msg(struct sk_msg_md *msg)
{
	/*
	 * sk_msg programs may not call bpf_get_socket_cookie(), so sockets are
	 * keyed by their ports: local port (host order) << 32 | remote port as
	 * the context holds it (network order). Unique on the benchmark's
	 * loopback pair, which is all this file is for.
	 */
	__u64 key = ((__u64)msg->local_port << 32) | msg->remote_port;
	struct veil_splice_peer *entry = msg_peers.lookup(&key);
	__u64 len = (long)msg->data_end - (long)msg->data;

	if (!entry)
		return SK_PASS;
	if (msg_socks.msg_redirect_hash(msg, &entry->peer, BPF_F_INGRESS) != SK_PASS)
		return SK_PASS;
	__sync_fetch_and_add(&entry->bytes, len);
	return SK_PASS;
}
