/* Flow events: one struct zt_event (maps.h) in the ring buffer zt_events for every drop and
 * every new allowed flow, under a per-CPU limiter. The program never waits for the reader. */
#ifndef ZT_EVENTS_H
#define ZT_EVENTS_H

#include "decision.h"
#include "maps.h"
#include "parse.h"

/* The event limiter (see struct zt_cpu): may one more event go now? */
static __always_inline int event_allowed(struct zt_cpu *cpu, __u64 now)
{
	__u64 tat = cpu->ev_tat > now ? cpu->ev_tat : now;
	if (tat - now > ZT_EVENT_BURST_NS) {
		cpu->ev_limited++;
		return 0;
	}
	cpu->ev_tat = tat + ZT_EVENT_INTERVAL_NS;
	return 1;
}

/* Write one event; 0 when the ring buffer had no room (counted). Never waits. */
static __always_inline int emit(struct zt_cpu *cpu, const struct zt_decision *d, const struct zt_pkt *p,
				__u32 len)
{
	struct zt_event *e = zt_events.ringbuf_reserve(sizeof(struct zt_event));
	if (!e) {
		cpu->ev_full++;
		return 0;
	}
	e->time_ns = bpf_ktime_get_ns();
	e->build = d->build;
	e->device = d->device;
	e->ident = d->ident;
	e->rule = d->rule;
	e->len = len;
	e->sport = p->sport;
	e->dport = p->dport;
	__builtin_memcpy(e->src, p->src, 16);
	__builtin_memcpy(e->dst, p->dst, 16);
	e->family = p->family;
	e->proto = p->proto;
	e->verdict = d->verdict;
	e->reason = d->reason;
	e->name = d->name;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	zt_events.ringbuf_submit(e, 0);
	cpu->ev_sent++;
	return 1;
}

/* An event, when the limiter lets one go now. */
static __always_inline void event(struct zt_cpu *cpu, const struct zt_decision *d, const struct zt_pkt *p,
				  __u32 len, __u64 now)
{
	if (event_allowed(cpu, now))
		emit(cpu, d, p, len);
}

#endif
