/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Same-node splice (sk_skb stream verdict, attached to splice_socks).
 *
 * Once the ztunnel has authorized a connection whose two ends both live on
 * this node, it puts its two sockets (accepted from pod A, connected to pod B)
 * into the sockhashes below and their cookies into splice_peers. From then on
 * every byte a spliced socket receives runs through veil_splice_verdict,
 * which hands it to the peer socket's send path inside the kernel: Python no
 * longer copies it.
 *
 * Two sockhashes, because a redirect fails (and the bytes would be dropped)
 * when the target is not in the map named by bpf_sk_redirect_hash: sockets go
 * into splice_targets (no program) first and into splice_socks (this
 * program) second, so by the time any byte of either socket meets the
 * verdict, both are valid targets.
 *
 * If the redirect still fails (the peer closed, or an entry is missing) the
 * verdict answers SK_PASS: the bytes stay on their own socket, where the
 * ztunnel sees them and resets the connection, instead of being lost silently.
 *
 * The verdict does not see FINs; the ztunnel forwards a half-close itself once
 * splice_peers' byte count says every redirected byte reached the peer's send
 * queue (see ztunnel/proxy/splice.py).
 */
#include <uapi/linux/bpf.h>

#include "veil_splice.h"

BPF_SOCKHASH(splice_socks, __u64, VEIL_SPLICE_MAX);
BPF_SOCKHASH(splice_targets, __u64, VEIL_SPLICE_MAX);
BPF_TABLE("hash", __u64, struct veil_splice_peer, splice_peers, VEIL_SPLICE_MAX);

int veil_splice_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct veil_splice_peer *entry = splice_peers.lookup(&cookie);
	__u32 len = skb->len;

	if (!entry)
		return SK_PASS;
	/*
	 * The FIN arrives as an skb without payload. Redirected, the kernel's
	 * send of 0 bytes reads as a broken pipe: it sets EPIPE on the peer and
	 * stops its transmit side. There is nothing to carry, and the ztunnel
	 * forwards the FIN itself, so drop it here.
	 */
	if (!len)
		return SK_DROP;
	/* flags 0: out of the peer socket (its send path), not into its receive queue. */
	if (splice_targets.sk_redirect_hash(skb, &entry->peer, 0) != SK_PASS)
		return SK_PASS;
	__sync_fetch_and_add(&entry->bytes, len);
	return SK_PASS;
}
