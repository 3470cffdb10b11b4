/* Conntrack (zt_ct): every allowed packet's flow, by its 5-tuple as the device sent it (an
 * ICMP echo's id stands in the source port). It lets the flow's replies back through the
 * connector side, and it lets the flow's later packets through the ingress program with one
 * lookup while nothing has changed (the epoch and the build are the ones that allowed it). */
#ifndef ZT_CONNTRACK_H
#define ZT_CONNTRACK_H

#include "decision.h"
#include "epoch.h"
#include "events.h"
#include "fcache.h"
#include "fragments.h"
#include "kills.h"
#include "maps.h"
#include "parse.h"

static __always_inline void ct_key_of(struct zt_ct_key *key, const struct zt_pkt *p)
{
	__builtin_memcpy(key->src, p->src, 16);
	__builtin_memcpy(key->dst, p->dst, 16);
	key->sport = p->icmp_echo == ZT_ICMP_ECHO_REQUEST ? p->icmp_id : p->sport;
	key->dport = p->dport;
	key->family = p->family;
	key->proto = p->proto;
}

/* Is the flow still alive at `now`? An expired entry is not honoured even before eviction. */
static __always_inline int ct_alive(const struct zt_ct *ct, __u8 proto, __u64 now)
{
	__u64 s = ct->state == ZT_CT_CLOSING ? ZT_CT_TCP_CLOSING_SECONDS
		  : proto == IPPROTO_TCP     ? ZT_CT_TCP_SECONDS
		  : proto == IPPROTO_UDP     ? ZT_CT_UDP_SECONDS
					     : ZT_CT_ICMP_SECONDS;
	/* (Another CPU's clock reading may be a tick ahead of this one's: no subtraction.) */
	return now < ct->seen_ns + s * ZT_NSEC_PER_SEC;
}

/* A packet of the flow went by (either way): it lives on; a FIN or RST starts its close. */
static __always_inline void ct_touch(struct zt_ct *ct, const struct zt_pkt *p, __u64 now)
{
	if (ct->seen_ns != now) /* once a tick at most: no cache line written on every packet */
		ct->seen_ns = now;
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (ZT_TCP_FIN | ZT_TCP_RST)) && ct->state == ZT_CT_OPEN)
		ct->state = ZT_CT_CLOSING;
}

/* Was the flow reported within ZT_FLOW_EVENT_NS? (A TCP entry that no SYN opened has event_ns
 * 0: no report was due, so its tuple's first SYN is reported.) */
static __always_inline int ct_reported_since(const struct zt_ct *ct, __u64 now)
{
	return ct->event_ns && now < ct->event_ns + ZT_FLOW_EVENT_NS;
}

/* A killed flow's packet: dropped, named as its device's. */
static __always_inline void killed(struct zt_decision *d, __u32 device, __u32 ident)
{
	d->device = device;
	d->ident = ident;
	d->verdict = ZT_VERDICT_BLOCK;
	d->reason = ZT_REASON_KILLED;
}

/* The established path: a TCP segment without SYN, a UDP datagram or an ICMP echo request of a
 * live flow that this build allowed in this epoch is allowed again by that decision, and a
 * killed flow's packet is dropped (also once its entry is gone: kills.h). One lookup: the
 * flow cache's slot on this CPU, or zt_ct when the slot holds another flow or is due for its
 * check (which refills it). A SYN (a new connection) and everything else is decided by the
 * policy; a tuple zt_ct does not hold is remembered (d->ct_absent), so that ct_track does not
 * probe it again. Returns 1 when it decided. */
static __always_inline int established(struct zt_decision *d, const struct zt_pkt *p, struct zt_cpu *cpu,
				       __u64 bytes, int dry)
{
	if (p->proto == IPPROTO_TCP) {
		if (p->tcp_flags & ZT_TCP_SYN)
			return 0;
	} else if (p->proto != IPPROTO_UDP && p->icmp_echo != ZT_ICMP_ECHO_REQUEST) {
		return 0;
	}
	__u64 now = coarse_now(cpu);
#if ZT_CT_FLOW_CACHE
	__u64 tail = ct_key_tail(p);
	__u32 i = fcache_index(p, tail);
	struct zt_fslot *slot = zt_fcache.lookup(&i);
	if (!slot)
		return 0;
	int holds = fcache_holds(slot, p, tail);
	if (fcache_allows(slot, holds, p, d->epoch, d->build, now)) {
		allow_as_before(d, slot->rule, slot->device, slot->ident);
		if (!dry) {
			slot->packets++;
			slot->bytes += bytes;
			cpu->ct_hits++;
		}
		return 1;
	}
#endif
	struct zt_ct_key key = {};
	ct_key_of(&key, p);
	struct zt_ct *ct = zt_ct.lookup(&key);
	if (!ct || !ct_alive(ct, p->proto, now)) {
		/* no live entry: the policy decides, unless a kill outlived the entry (kills.h) */
		struct zt_kill *k = kill_of(&key, now);
		if (!k) {
			d->ct_absent = !ct;
			return 0;
		}
		killed(d, k->device, k->ident);
		return 1;
	}
	if (ct->state == ZT_CT_KILLED) {
		killed(d, ct->device, ct->ident);
		return 1;
	}
	/* another epoch or build: decided again; a non-TCP flow due to be reported: reported */
	__u64 report_ns = p->proto == IPPROTO_TCP ? ~0ULL : ct->event_ns + ZT_FLOW_EVENT_NS;
	if (!same_policy(ct->epoch, d->epoch) || ct->build != d->build || now >= report_ns)
		return 0;
	allow_as_before(d, ct->rule, ct->device, ct->ident);
	if (dry)
		return 1;
	ct_touch(ct, p, now);
	ct->packets++;
	ct->bytes += bytes;
	cpu->ct_hits++;
	frag_track(p, d->epoch, now);
#if ZT_CT_FLOW_CACHE
	fcache_fill(slot, holds, &key, ct, d->epoch, d->build, now, report_ns);
#endif
	return 1;
}

/* A packet the policy allowed writes its flow's entry: created, or brought up to this decision.
 * A new flow is reported (an event): any flow when zt_ct did not hold it open, its last report
 * is older than ZT_FLOW_EVENT_NS, or another build or rule decided it; a TCP flow only at a SYN
 * (without ACK): a retransmitted SYN of a flow reported in this window is no new flow. (A drop
 * writes nothing: the way back of a flow the policy no longer allows closes on the connector
 * side, which decides it again when the epoch has moved.) */
static __always_inline void ct_track(struct zt_cpu *cpu, const struct zt_decision *d, const struct zt_pkt *p,
				     __u64 bytes, __u64 now)
{
	/* Only an echo request opens an ICMP flow: another ICMP message carries no id, and its
	 * entry (id 0) would let echo replies with id 0 back. It is reported, as a new flow. */
	if ((p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) && p->icmp_echo != ZT_ICMP_ECHO_REQUEST) {
		frag_track(p, d->epoch, now);
		event(cpu, d, p, bytes, now);
		return;
	}
	struct zt_ct_key key = {};
	ct_key_of(&key, p);
	struct zt_ct *ct = d->ct_absent ? NULL : zt_ct.lookup(&key);
	int syn = p->proto == IPPROTO_TCP && (p->tcp_flags & (ZT_TCP_SYN | ZT_TCP_ACK)) == ZT_TCP_SYN;
	/* A killed flow stays killed (this packet raced the kill: it passes, as one in flight
	 * would, but revives nothing) unless its tuple opens a new connection (a SYN). */
	if (ct && ct->state == ZT_CT_KILLED && !syn && ct_alive(ct, p->proto, now))
		return;
	/* Nor once the killed flow's entry is gone (evicted, timed out: kills.h), while the kill
	 * holds; a SYN ends the kill. (A live entry that is not killed has no kill that holds:
	 * nothing writes one for a tuple with a kill but a SYN, which ends it.) */
	if (!ct || !ct_alive(ct, p->proto, now) || ct->state == ZT_CT_KILLED) {
		if (syn)
			kill_forget(&key, now);
		else if (kill_of(&key, now))
			return;
	}
	/* an entry that timed out, or a killed flow's tuple opened again, starts anew */
	if (ct && (!ct_alive(ct, p->proto, now) || ct->state == ZT_CT_KILLED)) {
		zt_ct.delete(&key);
		ct = NULL;
	}
	frag_track(p, d->epoch, now);
	int new_flow;
	if (p->proto == IPPROTO_TCP)   /* a SYN, unless it retransmits a flow reported in this window */
		new_flow = syn && (!ct || ct->state != ZT_CT_OPEN || !ct_reported_since(ct, now) ||
				   ct->build != d->build || ct->rule != d->rule);
	else
		new_flow = !ct || now >= ct->event_ns + ZT_FLOW_EVENT_NS || ct->build != d->build ||
			   ct->rule != d->rule;
	if (new_flow)   /* (reported before the entry is written: the other order made a new flow's
			 * first packet ~70 ns slower, scripts/bench --against-source) */
		event(cpu, d, p, bytes, now);
	if (!ct) {
		struct zt_ct flow = {.seen_ns = now,
				     .created_ns = now,
				     .epoch = d->epoch,
				     .packets = 1,
				     .bytes = bytes,
				     .build = d->build,
				     .rule = d->rule,
				     .device = d->device,
				     .ident = d->ident};
		/* (An event the limiter held back is counted as lost, and the flow's next report is
		 * a window later: under a flood, unreported flows must not keep their packets off
		 * the established path.) */
		flow.event_ns = p->proto != IPPROTO_TCP || syn ? now : 0;   /* (TCP: no SYN, no report due) */
		ct_touch(&flow, p, now);
		zt_ct.update(&key, &flow);
		return;
	}
	ct_touch(ct, p, now);
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & ZT_TCP_SYN))
		ct->state = ZT_CT_OPEN;   /* the tuple's new connection */
	ct->packets++;
	ct->bytes += bytes;
	if (new_flow)
		ct->event_ns = now;   /* (two CPUs may both report a flow: no harm) */
	ct->epoch = d->epoch;
	ct->build = d->build;
	ct->rule = d->rule;
	ct->device = d->device;
	ct->ident = d->ident;
}

#endif
