/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The drop stream: one record per dropped packet (reason, pod, tuple) in a
 * pinned ring buffer, read by the agent and fanned out to `veilctl monitor`.
 *
 * Cost control: the per-pod counters (veil_maps.h) count every drop; the
 * stream is a sample for humans. A per-CPU token bucket (veil_drop_limit)
 * lets at most VEIL_DROP_EVENT_BURST records through at once and
 * VEIL_DROP_EVENT_RATE per second per CPU after that, so a flood costs one
 * map lookup and a compare per packet. Records the bucket swallowed are
 * counted and reported in the next record of that CPU (`suppressed`), so the
 * reader knows what it did not see. A full ring buffer (no reader) makes
 * bpf_ringbuf_output fail, which is just as cheap.
 *
 * bcc rewrites map calls only in the main source (see veil_maps.h), so this
 * header only decides and fills the record; each program's own drop helper
 * does the lookup of the bucket and the ringbuf_output:
 *
 *     if (veil_drop_event_take(veil_drop_limit.lookup(&zero), pkt, ifindex,
 *                              reason, VEIL_PROG_..., &ev))
 *             veil_drop_events.ringbuf_output(&ev, sizeof(ev), 0);
 *
 * Layout (struct veil_drop_event, struct veil_drop_bucket, the map sizes) is
 * mirrored by agent/bpf/events.py; changing it changes the pinned layout.
 */
#ifndef VEIL_EVENTS_H
#define VEIL_EVENTS_H

#include "veil_codes.h"
#include "veil_config.h"
#include "veil_maps.h"
#include "veil_packet.h"

#if !defined(VEIL_DROP_EVENTS_BYTES) || !defined(VEIL_DROP_EVENT_RATE) || \
	!defined(VEIL_DROP_EVENT_BURST)
#error "VEIL_DROP_EVENTS_BYTES, VEIL_DROP_EVENT_RATE and VEIL_DROP_EVENT_BURST must be -D flags"
#endif

/* Which program dropped (struct veil_drop_event.program). */
#define VEIL_PROG_POD_INGRESS 1
#define VEIL_PROG_UPLINK_INGRESS 2
#define VEIL_PROG_POD_EGRESS 3

/* Nanoseconds per token; at least 1 so the division below is defined. */
#define VEIL_DROP_EVENT_INTERVAL_NS \
	(VEIL_DROP_EVENT_RATE > 0 ? 1000000000ULL / VEIL_DROP_EVENT_RATE : 1000000000ULL)

struct veil_drop_event {
	__u64 timestamp_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 ifindex;      /* the pod's host-side veth: the counter row charged */
	__u32 suppressed;   /* records this CPU's bucket swallowed since its previous record */
	__u8 reason;        /* enum veil_drop_reason */
	__u8 family;        /* VEIL_AF_INET or VEIL_AF_INET6; 0 when the header was unreadable */
	__u8 protocol;      /* L4 protocol */
	__u8 program;       /* VEIL_PROG_* */
	__be16 sport;       /* network order; 0 without ports */
	__be16 dport;
	__be32 saddr[4];    /* IPv4 in saddr[0], the rest zero */
	__be32 daddr[4];
};

/* One per CPU (percpu array, key 0). */
struct veil_drop_bucket {
	__u64 last_ns;    /* when tokens were last refilled */
	__u64 tokens;
	__u64 suppressed; /* swallowed since the last record written */
};

/* BPF_RINGBUF_OUTPUT with a pin: bcc reuses the map pinned at the path after
 * the ':' (or creates and pins it), as BPF_TABLE_PINNED does for the others. */
struct veil_drop_events_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" VEIL_PIN_DIR "/drop_events")))
struct veil_drop_events_table_t veil_drop_events = { .max_entries = VEIL_DROP_EVENTS_BYTES };

BPF_TABLE_PINNED("percpu_array", __u32, struct veil_drop_bucket, veil_drop_limit, 1,
		 VEIL_PIN_DIR "/drop_limit");

/* Take a token from this CPU's bucket; false (and one more suppressed) when empty. */
static __always_inline bool veil_drop_bucket_take(struct veil_drop_bucket *b, __u64 now)
{
	__u64 refill;

	if (!b)
		return false;
	refill = (now - b->last_ns) / VEIL_DROP_EVENT_INTERVAL_NS;
	if (refill >= VEIL_DROP_EVENT_BURST) {
		b->tokens = VEIL_DROP_EVENT_BURST;
		b->last_ns = now;
	} else if (refill) {
		b->tokens += refill;
		if (b->tokens > VEIL_DROP_EVENT_BURST)
			b->tokens = VEIL_DROP_EVENT_BURST;
		/* Keep the remainder of the interval: a steady trickle gets its full rate. */
		b->last_ns += refill * VEIL_DROP_EVENT_INTERVAL_NS;
	}
	if (!b->tokens) {
		b->suppressed += 1;
		return false;
	}
	b->tokens -= 1;
	return true;
}

/* Decide whether this drop is recorded and, if so, fill `ev`. */
static __always_inline bool veil_drop_event_take(struct veil_drop_bucket *b,
						 const struct veil_packet *pkt, __u32 ifindex,
						 int reason, __u8 program,
						 struct veil_drop_event *ev)
{
	__u64 now = bpf_ktime_get_ns();

	if (!veil_drop_bucket_take(b, now))
		return false;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->timestamp_ns = now;
	ev->ifindex = ifindex;
	ev->suppressed = b->suppressed > 0xffffffffULL ? 0xffffffffU : (__u32)b->suppressed;
	b->suppressed = 0;
	ev->reason = reason;
	ev->family = pkt->family;
	ev->protocol = pkt->protocol;
	ev->program = program;
	if (pkt->has_ports) {
		ev->sport = pkt->sport;
		ev->dport = pkt->dport;
	}
	if (pkt->family == VEIL_AF_INET6) {
		__builtin_memcpy(ev->saddr, pkt->tuple.ipv6.saddr, sizeof(ev->saddr));
		__builtin_memcpy(ev->daddr, pkt->tuple.ipv6.daddr, sizeof(ev->daddr));
	} else if (pkt->family == VEIL_AF_INET) {
		ev->saddr[0] = pkt->tuple.ipv4.saddr;
		ev->daddr[0] = pkt->tuple.ipv4.daddr;
	}
	return true;
}

#endif /* VEIL_EVENTS_H */
