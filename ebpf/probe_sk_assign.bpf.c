/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Preflight probe, never attached. agent/preflight.py loads it as a tc
 * program: the verifier rejects a helper the kernel does not know, so a
 * successful load proves bpf_skc_lookup_tcp() and bpf_sk_assign() (Linux
 * 5.7+) are usable from tc, which the data path depends on. It needs no
 * -D flags and touches no maps, so it also runs before anything is pinned.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

int veil_probe_sk_assign(struct __sk_buff *skb)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;

	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return TC_ACT_UNSPEC;
	bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return TC_ACT_UNSPEC;
}
