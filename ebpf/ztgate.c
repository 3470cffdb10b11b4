/* ztgate's XDP program: every packet on the ingress interface is parsed, identified and
 * decided by the policy, counted, and passed or dropped; on each connector interface, only the
 * replies of flows it allowed go back. Built by dataplane/program.py with the capacities of
 * dataplane/layout.py as -D flags (once per layout: the policy is data, in two banks); ZT_ETHERNET=1 for Ethernet devices (frames start at the
 * Ethernet header), 0 for tunnels (frames start at the IP header). README.md has the path of a
 * packet; each step lives in a header of its own:
 *   parse.h      reading a packet (the only code that reads packet bytes)
 *   policy.h     identify the source, classify the destination, walk the candidates
 *   conntrack.h  the established path and the flows the policy allowed (zt_ct)
 *   kills.h      kills that outlast their flow's entry (zt_killed)
 *   fcache.h     the per-CPU flow cache in front of zt_ct
 *   fragments.h  later fragments follow their datagram's first
 *   events.h     flow events and their limiter
 *   decision.h   what a decision is, and how it is counted and remembered
 *   epoch.h      the coarse clock and the epoch
 *   reply.h      the connector side
 *   maps.h       the maps and the structs userspace shares; reasons.h the verdicts and reasons */
#include <uapi/linux/bpf.h>

#include "maps.h"
#include "parse.h"
#include "epoch.h"
#include "decision.h"
#include "policy.h"
#include "fragments.h"
#include "fcache.h"
#include "events.h"
#include "conntrack.h"
#include "reply.h"

/* Report an allowed or dropped packet the policy decided: every drop is an event; an allowed
 * packet writes its flow into conntrack, and a new flow is an event. */
static __always_inline void report(struct zt_cpu *cpu, const struct zt_decision *d, const struct zt_pkt *p,
				   __u64 bytes)
{
	if (d->verdict == ZT_VERDICT_PASS)
		return;
	__u64 now = coarse_now(cpu);
	if (d->verdict == ZT_VERDICT_ALLOW)
		ct_track(cpu, d, p, bytes, now);
	else
		event(cpu, d, p, bytes, now);
}

/* The one exit: count the decision, remember it for test-run callers, report it (conntrack
 * and events, unless the established path decided), and act on it. */
static __always_inline int record(struct zt_cpu *cpu, const struct zt_decision *d, const struct zt_pkt *p,
				  __u64 bytes, int dry)
{
	if (!cpu)
		return XDP_DROP;
	account(cpu, d, bytes, dry);
	if (dry)
		return xdp_action(d);
	count_rule(d, bytes);
	if (!d->fast)
		report(cpu, d, p, bytes);
	return xdp_action(d);
}

int xdp_ztgate(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* The epoch first: a packet decided by the tables of before a change must not carry the
	 * epoch of after it into conntrack (see Kernel._next_epoch). */
	struct zt_decision d = {.epoch = epoch_now()};
	bank_now(&d);   /* the bank in force, once: every table this packet reads is of it */
	struct zt_pkt p = {};
	__u64 bytes = data_end - data;
	int dry = dry_run(ctx);
	struct zt_cpu *cpu = cpu_state();

	int parsed = parse_frame(&p, data, data_end);
	if (parsed != ZT_PARSED) {
		/* unreadable: dropped with its reason, unless a later fragment follows its first */
		d.reason = parsed;
		d.verdict = verdict_of_reason(parsed);
		if (p.frag_offset && cpu)
			later_fragment(&d, &p, d.epoch, coarse_now(cpu));
	} else if (!cpu || !established(&d, &p, cpu, bytes, dry)) {
		/* not a packet of an established flow: the policy decides */
		decide(&d, &p);
	}
	/* One copy of record() for every path: without this barrier clang specialises it (and
	 * report()) for each constant decision above, which made the program 3.5 times longer and
	 * every packet ~70 ns slower (instruction cache). bcc 0.26 cannot load BPF-to-BPF calls,
	 * so noinline is no way out. */
	asm volatile("" : : "r"(&d), "r"(&p) : "memory");
	return record(cpu, &d, &p, bytes, dry);
}

/* The connector side (reply.h). Deciding a flow again is a tail call into
 * xdp_ztgate_redecide, not inline code: inlined, its presence alone cost the common path
 * (epoch unchanged) ~40 ns a packet, and bcc 0.26 has no BPF-to-BPF calls. So is an ICMP
 * error (xdp_ztgate_icmp_error): reading its quote inline cost every reply ~7 ns. */
int xdp_ztgate_reply(struct xdp_md *ctx)
{
	struct zt_reply r = {};
	if (!reply_open(ctx, &r))
		return XDP_DROP;
	if (r.parsed != ZT_PARSED) {
		reply_unparsed(&r.d, &r.p, r.parsed, r.now);
	} else if (is_icmp_error(&r.p)) {
		zt_reply_slow.call(ctx, ZT_SLOW_ICMP_ERROR);
		r.d.reason = ZT_REASON_INTERNAL;   /* the tail call failed: fail closed */
	} else {
		struct zt_ct_key key = {};
		struct zt_ct *ct = reply_key(&key, &r.p) ? zt_ct.lookup(&key) : NULL;
		if (ct && ct_alive(ct, r.p.proto, r.now)) {
			if (ct->state == ZT_CT_KILLED) {
				r.d.reason = ZT_REASON_KILLED;
			} else if (same_policy(ct->epoch, epoch_now())) {
				reply_passes(&r.d, ct, &r.p, r.now, ctx->data_end - ctx->data, ct->epoch, r.dry);
			} else {
				zt_reply_slow.call(ctx, ZT_SLOW_REDECIDE);
				r.d.reason = ZT_REASON_INTERNAL;   /* the tail call failed: fail closed */
			}
		}
		/* (No entry: dropped as not-reply, a killed flow's reply too once its entry is gone;
		 * the entry cannot come back without its device's SYN: kills.h. Naming the drop
		 * `killed` here cost every not-reply drop ~3 ns, scripts/bench.) */
	}
	return reply_record(ctx, &r);
}

/* The epoch moved since this flow was last allowed: decide it again. */
int xdp_ztgate_redecide(struct xdp_md *ctx)
{
	struct zt_reply r = {};
	struct zt_ct_key key = {};
	if (!reply_open(ctx, &r) || r.parsed != ZT_PARSED || !reply_key(&key, &r.p))
		return XDP_DROP;   /* (xdp_ztgate_reply read it fine: unreachable) */
	struct zt_ct *ct = zt_ct.lookup(&key);
	if (ct && ct_alive(ct, r.p.proto, r.now) && ct->state != ZT_CT_KILLED)
		decide_again(&r.d, ct, &key, &r.p, r.now, ctx->data_end - ctx->data, r.dry);
	return reply_record(ctx, &r);
}

/* An ICMP error towards a device: it passes when it quotes a flow (reply.h). */
int xdp_ztgate_icmp_error(struct xdp_md *ctx)
{
	struct zt_reply r = {};
	if (!reply_open(ctx, &r) || r.parsed != ZT_PARSED || !is_icmp_error(&r.p))
		return XDP_DROP;   /* (xdp_ztgate_reply read it fine: unreachable) */
	icmp_error_of_flow(&r.d, &r.p, (void *)(long)ctx->data, (void *)(long)ctx->data_end, r.now);
	return reply_record(ctx, &r);
}
