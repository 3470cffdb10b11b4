/* The connector side: packets from a private network towards devices. Only replies of flows
 * the ingress program allowed (TCP, UDP and ICMP echo, by zt_ct, within the protocol's
 * timeout) pass, with the ICMP errors about them, and only while the policy allows the flow:
 * when the epoch has moved since the flow was last allowed, xdp_ztgate_redecide decides the
 * flow again (its device's packet, as the ingress program would see it) by this build's
 * tables. Everything else is dropped, counted and reported, with the device it was sent to. */
#ifndef ZT_REPLY_H
#define ZT_REPLY_H

#include "conntrack.h"
#include "decision.h"
#include "epoch.h"
#include "events.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"

/* A packet on the connector side, as both its entries begin with it: the per-CPU state, the
 * time, whether this is a dry run, the packet parsed (the parser's result in `parsed`), and a
 * decision that drops it as not-reply until a flow says otherwise. */
struct zt_reply {
	struct zt_decision d;
	struct zt_pkt p;
	struct zt_cpu *cpu;
	__u64 now;
	int dry;
	int parsed;
};

/* The opening both connector-side entries share; 0: no per-CPU state (drop). */
static __always_inline int reply_open(struct xdp_md *ctx, struct zt_reply *r)
{
	r->d.verdict = ZT_VERDICT_BLOCK;
	r->d.reason = ZT_REASON_NOT_REPLY;
	bank_now(&r->d);   /* (whose build a drop's event names, and whose sources name its device) */
	r->cpu = cpu_state();
	if (!r->cpu)
		return 0;
	r->now = coarse_now(r->cpu);
	r->dry = dry_run(ctx);
	r->parsed = parse_frame(&r->p, (void *)(long)ctx->data, (void *)(long)ctx->data_end);
	return 1;
}

/* The conntrack key of the flow a packet from the private side answers; 0 if it answers none.
 * A reply never opens a connection: a TCP SYN without ACK from the server's side answers no
 * flow (the device opened it; it listens on none of its ports through a connector). */
static __always_inline int reply_key(struct zt_ct_key *key, const struct zt_pkt *p)
{
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP && p->icmp_echo != ZT_ICMP_ECHO_REPLY)
		return 0;
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (ZT_TCP_SYN | ZT_TCP_ACK)) == ZT_TCP_SYN)
		return 0;
	key->family = p->family;
	key->proto = p->proto;
	__builtin_memcpy(key->src, p->dst, 16);
	__builtin_memcpy(key->dst, p->src, 16);
	key->sport = p->icmp_echo ? p->icmp_id : p->dport;
	key->dport = p->sport;
	return 1;
}

/* A packet the parser refused: dropped with its reason (not IP too: the Ethernet build passes
 * ARP on ingress; nothing unparsed passes here), unless it is a later fragment of a reply that
 * passed. */
static __always_inline void reply_unparsed(struct zt_decision *d, const struct zt_pkt *p, int parsed, __u64 now)
{
	d->reason = parsed;
	d->verdict = parsed == ZT_REASON_NOT_IP ? ZT_VERDICT_BLOCK : verdict_of_reason(parsed);
	if (p->frag_offset)
		later_fragment(d, p, epoch_now(), now);
}

static __always_inline int is_icmp_error(const struct zt_pkt *p)
{
	return (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) && !p->icmp_echo;
}

/* An ICMP error passes when the packet it quotes is the device's own packet of a live flow of
 * this epoch (path MTU discovery needs "fragmentation needed" and "packet too big"); the
 * quoted packet must come from where the error is going. Who sent it: the routers between the
 * connector and the server are not known here (WireGuard admits only sources in the
 * connector's routes, so it is at least a host of that network), so an error from any other
 * address than the flow's server is taken for a router's, and may say only what a router
 * says about the way (network or host unreachable, fragmentation needed, time exceeded in
 * transit, parameter problem); what only the server knows (its port or protocol is closed,
 * its reassembly timed out: errors that end a connection attempt at once) must come from the
 * server. It does not keep the flow alive. */
static __always_inline void icmp_error_of_flow(struct zt_decision *d, const struct zt_pkt *p, void *data,
					       void *data_end, __u64 now)
{
	struct zt_pkt quoted = {};
	int kind = parse_icmp_quote(&quoted, p, data, data_end);
	if (!kind)
		return;
	if (quoted.src[0] != p->dst[0] ||
	    (p->family != 4 && (quoted.src[1] != p->dst[1] || quoted.src[2] != p->dst[2] || quoted.src[3] != p->dst[3])))
		return;
	if (kind == ZT_QUOTE_END &&
	    (quoted.dst[0] != p->src[0] ||
	     (p->family != 4 && (quoted.dst[1] != p->src[1] || quoted.dst[2] != p->src[2] || quoted.dst[3] != p->src[3]))))
		return;
	struct zt_ct_key key = {};
	ct_key_of(&key, &quoted);
	struct zt_ct *ct = zt_ct.lookup(&key);
	if (ct && ct_alive(ct, key.proto, now) && ct->state != ZT_CT_KILLED && same_policy(ct->epoch, epoch_now())) {
		d->verdict = ZT_VERDICT_ALLOW;
		d->reason = ZT_REASON_REPLY;
	}
}

/* A reply of a live flow passes: the flow lives on and counts it; a first fragment's later
 * fragments will follow it. */
static __always_inline void reply_passes(struct zt_decision *d, struct zt_ct *ct, const struct zt_pkt *p, __u64 now,
					 __u64 bytes, __u64 epoch, int dry)
{
	d->verdict = ZT_VERDICT_ALLOW;
	d->reason = ZT_REASON_REPLY;
	if (dry)
		return;
	ct_touch(ct, p, now);
	ct->reply_packets++;
	ct->reply_bytes += bytes;
	frag_track(p, epoch, now);
}

/* The epoch moved since the flow `ct` was last allowed: decide its device's packet again by
 * this build's tables. Still allowed: the flow takes this epoch and the reply passes. Not: the
 * flow ends and the reply is dropped as revoked, naming the rule. */
static __always_inline void decide_again(struct zt_decision *d, struct zt_ct *ct, struct zt_ct_key *key,
					 const struct zt_pkt *p, __u64 now, __u64 bytes, int dry)
{
	struct zt_pkt fwd = {.family = p->family, .proto = p->proto};
	__builtin_memcpy(fwd.src, p->dst, 16);
	__builtin_memcpy(fwd.dst, p->src, 16);
	if (!p->icmp_echo) {   /* ICMP is decided without ports */
		fwd.sport = p->dport;
		fwd.dport = p->sport;
	}
	struct zt_decision again = {};
	__u64 epoch = epoch_now();   /* read before deciding: a change after it is seen next time */
	bank_now(&again);
	decide(&again, &fwd);
	d->bank = again.bank;
	d->build = again.build;
	if (again.verdict == ZT_VERDICT_ALLOW) {
		if (!dry) {
			/* (the build is left alone: the device's next packet brings it and the rule up
			 * to date, on the policy path) */
			ct->epoch = epoch;
		}
		reply_passes(d, ct, p, now, bytes, epoch, dry);
	} else {
		if (!dry)
			zt_ct.delete(key);
		d->reason = again.reason == ZT_REASON_SESSION_EXPIRED ? ZT_REASON_SESSION_EXPIRED : ZT_REASON_REVOKED;
		d->rule = again.rule;
	}
}

/* The connector side's one exit: count, remember for test-run callers, report drops (with the
 * device they were sent to). */
static __always_inline int reply_record(struct xdp_md *ctx, struct zt_reply *r)
{
	struct zt_decision *d = &r->d;
	const struct zt_pkt *p = &r->p;
	__u64 bytes = ctx->data_end - ctx->data;
	if (d->verdict != ZT_VERDICT_ALLOW && d->verdict != ZT_VERDICT_PASS && p->family) {
		struct zt_src *to = identify(p->family, p->dst, d->bank);
		__u64 both = to ? *(const __u64 *)to : 0;
		d->ident = (__u32)both;
		d->device = (__u32)(both >> 32);
		/* (on the drop path only: a reply towards a device whose session is over, once
		 * its flow is gone, is named for the session, not as not-reply) */
		if (d->ident == ZT_IDENT_EXPIRED && d->reason == ZT_REASON_NOT_REPLY)
			d->reason = ZT_REASON_SESSION_EXPIRED;
	}
	account(r->cpu, d, bytes, r->dry);
	if (d->verdict == ZT_VERDICT_ALLOW || d->verdict == ZT_VERDICT_PASS)
		return XDP_PASS;
	if (!r->dry)
		event(r->cpu, d, p, bytes, r->now);
	return XDP_DROP;
}

#endif
