/* What a decision is, and how one is kept: the per-CPU counters by reason and the last
 * decision, which BPF_PROG_TEST_RUN callers read back. Shared by the entries. */
#ifndef ZT_DECISION_H
#define ZT_DECISION_H

#include "maps.h"
#include "reasons.h"

_Static_assert(ZT_REASON__MAX <= ZT_REASON_SLOTS, "zt_cpu.reason has no room: raise ZT_REASON_SLOTS "
					       "(which changes the pinned zt_cpu_state)");

struct zt_decision {
	__u64 epoch; /* zt_epoch as the packet arrived, read before any table */
	__u32 bank;  /* zt_bank as the packet arrived, read once, right after the epoch */
	__u32 build; /* the build that bank holds */
	__u8 fast;   /* decided without the policy (conntrack, a followed fragment): nothing to report */
	__u8 ct_absent; /* the established path found no zt_ct entry: ct_track need not probe again */
	__u32 rule;
	__u32 device;
	__u32 ident;
	__u8 verdict;
	__u8 reason;
	__u8 name; /* the deciding candidate's name token (0: no learned name decided) */
};

static __always_inline struct zt_cpu *cpu_state(void)
{
	__u32 zero = 0;
	return zt_cpu_state.lookup(&zero);
}

/* A dry run (`ztgate trace`: BPF_PROG_TEST_RUN with ZT_DRY_RUN_MAGIC as 4 bytes of metadata)
 * decides and tells its caller, but counts nothing, reports nothing and tracks no flow: a
 * traced packet is no traffic. Real packets carry no metadata here (data_meta == data). */
static __always_inline int dry_run(struct xdp_md *ctx)
{
	void *meta = (void *)(long)ctx->data_meta;
	void *data = (void *)(long)ctx->data;
	if (meta + sizeof(__u32) > data)
		return 0;
	return *(__u32 *)meta == ZT_DRY_RUN_MAGIC;
}

/* The verdict of a packet the parser refused (a parse reason). */
static __always_inline int verdict_of_reason(int reason)
{
	if (reason == ZT_REASON_IPV4_FRAGMENT || reason == ZT_REASON_IPV6_FRAGMENT)
		return ZT_VERDICT_FRAGMENT;
	if (reason == ZT_REASON_NOT_IP)
		return ZT_VERDICT_PASS;
	return ZT_VERDICT_MALFORMED;
}

/* The established path's verdict: the flow's allowing decision, again (its rule, or the
 * default action when rule is 0), without the policy walk. */
static __always_inline void allow_as_before(struct zt_decision *d, __u32 rule, __u32 device, __u32 ident)
{
	d->verdict = ZT_VERDICT_ALLOW;
	d->rule = rule;
	d->reason = rule ? ZT_REASON_RULE : ZT_REASON_DEFAULT;
	d->device = device;
	d->ident = ident;
	d->fast = 1;
}

static __always_inline int xdp_action(const struct zt_decision *d)
{
	return d->verdict == ZT_VERDICT_ALLOW || d->verdict == ZT_VERDICT_PASS ? XDP_PASS : XDP_DROP;
}

/* Remember the decision for test-run callers and, unless it is a dry run, count it by reason. */
static __always_inline void account(struct zt_cpu *cpu, const struct zt_decision *d, __u64 bytes, int dry)
{
	cpu->last.rule = d->rule;
	cpu->last.device = d->device;
	cpu->last.verdict = d->verdict;
	cpu->last.reason = d->reason;
	cpu->last.name = d->name;
	if (dry)
		return;
	__u32 r = d->reason < ZT_REASON__MAX ? d->reason : ZT_REASON_INTERNAL;
	cpu->reason[r].packets++;
	cpu->reason[r].bytes += bytes;
}

/* A decision the policy (or the flow it allowed) made is counted by its rule too: rule ids
 * belong to one build, and rule 0 counts the default action. */
static __always_inline void count_rule(const struct zt_decision *d, __u64 bytes)
{
	if (d->reason != ZT_REASON_RULE && d->reason != ZT_REASON_DEFAULT)
		return;
	__u32 rule = ZT_IN_BANK(d->bank, d->rule, ZT_MAX_RULES);
	struct zt_counter *c = zt_rule_stats.lookup(&rule);
	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

#endif
