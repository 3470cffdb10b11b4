/* ztgate's XDP program: every packet on the ingress interface is parsed, identified and
 * decided by the policy, counted, and passed or dropped. Built by dataplane/program.py with
 * the capacities of dataplane/layout.py as -D flags; ZT_ETHERNET=1 for Ethernet devices
 * (frames start at the Ethernet header), 0 for tunnels (frames start at the IP header). */
#include <uapi/linux/bpf.h>

#include "maps.h"
#include "parse.h"

/* Map lookups stay in this file: bcc rewrites map calls only in the main source file. */

#define ZT_POOL_MASK ((1U << ZT_POOL_BITS) - 1)

struct zt_decision {
	__u32 rule;
	__u32 device;
	__u8 verdict;
	__u8 reason;
};

/* 1. Tunnel address -> identity. Pool addresses index an array; others probe a hash. */
static __always_inline struct zt_src *identify(const struct zt_pkt *p)
{
	__u32 idx;
	if (p->family == 4) {
		__u32 a = bpf_ntohl(p->src[0]);
		if ((a >> ZT_POOL_BITS) == (ZT_POOL4_BASE >> ZT_POOL_BITS)) {
			idx = a & ZT_POOL_MASK;
			return zt_pool4.lookup(&idx);
		}
	} else {
		__u32 a = bpf_ntohl(p->src[3]);
		if (p->src[0] == bpf_htonl(ZT_POOL6_BASE_0) && p->src[1] == bpf_htonl(ZT_POOL6_BASE_1) &&
		    p->src[2] == bpf_htonl(ZT_POOL6_BASE_2) &&
		    (a >> ZT_POOL_BITS) == (ZT_POOL6_BASE_3 >> ZT_POOL_BITS)) {
			idx = a & ZT_POOL_MASK;
			return zt_pool6.lookup(&idx);
		}
	}
	struct zt_src_key key = {.family = p->family};
	if (p->family == 4)
		__builtin_memcpy(&key.addr[12], &p->src[0], 4);
	else
		__builtin_memcpy(key.addr, p->src, 16);
	return zt_src_hash.lookup(&key);
}

/* 2. Destination -> class: a 16-8-8 trie for IPv4, 16-8-...-8 for IPv6. Returns -1 on an
 * inconsistent table (fail closed). */
static __always_inline __s64 dst_class(const struct zt_pkt *p)
{
	const __u8 *b = (const __u8 *)p->dst;
	__u32 key = (p->family == 4 ? ZT_V4_TOP : ZT_V6_TOP) + b[0];
	struct zt_node *node = zt_nodes.lookup(&key);
	if (!node)
		return -1;
	__u32 e = node->slot[b[1]];
	int last = p->family == 4 ? 4 : 16;
#pragma unroll
	for (int i = 2; i < 16; i++) {
		if (!(e & ZT_NODE_FLAG) || i >= last)
			break;
		key = e & ~ZT_NODE_FLAG;
		node = zt_nodes.lookup(&key);
		if (!node)
			return -1;
		e = node->slot[b[i]];
	}
	if (e & ZT_NODE_FLAG)
		return -1;
	return e;
}

/* 3. The service for (class, protocol, destination port): a fixed-step binary search over
 * the class's sorted port ranges. */
static __always_inline __s64 service_of(const struct zt_pkt *p, __u32 cid)
{
	struct zt_class *cls = zt_classes.lookup(&cid);
	if (!cls)
		return -1;
	__u32 table;
	if (p->proto == IPPROTO_TCP)
		table = cls->ports[0];
	else if (p->proto == IPPROTO_UDP)
		table = cls->ports[1];
	else if (p->proto == (p->family == 4 ? IPPROTO_ICMP : ZT_PROTO_ICMPV6))
		return cls->svc_icmp;
	else
		return cls->svc_other;
	struct zt_ports *pt = zt_port_tables.lookup(&table);
	if (!pt)
		return -1;
	__u32 i = 0, port = p->dport;
#pragma unroll
	for (__u32 step = ZT_PORT_SLOTS / 2; step > 0; step >>= 1) {
		if (pt->lo[(i + step) & (ZT_PORT_SLOTS - 1)] <= port)
			i += step;
	}
	return pt->svc[i & (ZT_PORT_SLOTS - 1)];
}

/* nwords is a power of two (dataplane/layout.py): the mask is the bound the verifier needs,
 * which clang's rewrite of (bit >> 6) * 8 would otherwise lose. */
static __always_inline int bit_set(const __u64 *words, __u32 nwords, __u32 bit)
{
	__u32 w = bit >> 6;
	if (w >= nwords)
		return 0;
	return (words[w & (nwords - 1)] >> (bit & 63)) & 1;
}

/* 4. Walk the service's candidates: the first whose conditions hold decides. */
static __always_inline int walk(struct zt_decision *d, const struct zt_pkt *p, __u32 svc_id,
				const struct zt_ident *who)
{
	struct zt_svc *svc = zt_services.lookup(&svc_id);
	if (!svc)
		return -1;
	struct zt_sport *sp = NULL;
	for (int i = 0; i < ZT_MAX_CANDS; i++) {
		struct zt_cand c = svc->c[i];
		if (c.who && !bit_set(who->w, ZT_WHO_WORDS, c.who))
			continue;
		if (c.sport) {
			if (!sp) {
				__u32 port = p->sport;
				sp = zt_sport.lookup(&port);
				if (!sp)
					return -1;
			}
			if (!bit_set(sp->w, ZT_SPORT_WORDS, c.sport))
				continue;
		}
		d->rule = c.rule;
		d->verdict = c.action;
		d->reason = c.rule ? ZT_REASON_RULE : ZT_REASON_DEFAULT;
		return 0;
	}
	return -1; /* the compiler always ends a list with an unconditional entry */
}

static __always_inline void decide(struct zt_decision *d, const struct zt_pkt *p)
{
	struct zt_src *src = identify(p);
	if (!src || !src->ident) {
		d->verdict = ZT_VERDICT_UNKNOWN;
		d->reason = ZT_REASON_UNKNOWN_SOURCE;
		return;
	}
	d->device = src->device;
	__u32 ident = src->ident;
	struct zt_ident *who = zt_idents.lookup(&ident);
	__s64 cid = dst_class(p);
	__s64 svc = cid < 0 ? -1 : service_of(p, cid);
	if (who && svc >= 0 && walk(d, p, svc, who) == 0)
		return;
	d->verdict = ZT_VERDICT_BLOCK;
	d->reason = ZT_REASON_INTERNAL;
}

#ifndef ZT_ETHERNET
#define ZT_ETHERNET 0
#endif

static __always_inline int verdict_of_reason(int reason)
{
	if (reason == ZT_REASON_IPV4_FRAGMENT || reason == ZT_REASON_IPV6_FRAGMENT)
		return ZT_VERDICT_FRAGMENT;
	if (reason == ZT_REASON_NOT_IP)
		return ZT_VERDICT_PASS;
	return ZT_VERDICT_MALFORMED;
}

/* The one exit: count the decision, remember it for test-run callers, and act on it. */
static __always_inline int record(const struct zt_decision *d, __u64 bytes)
{
	__u32 zero = 0;
	struct zt_cpu *cpu = zt_cpu_state.lookup(&zero);
	if (cpu) {
		__u32 r = d->reason < ZT_REASON__MAX ? d->reason : ZT_REASON_INTERNAL;
		cpu->reason[r].packets++;
		cpu->reason[r].bytes += bytes;
		cpu->last.rule = d->rule;
		cpu->last.device = d->device;
		cpu->last.verdict = d->verdict;
		cpu->last.reason = d->reason;
	}
	if (d->verdict == ZT_VERDICT_ALLOW || d->verdict == ZT_VERDICT_BLOCK) {
		__u32 rule = d->rule;
		struct zt_counter *c = zt_rule_stats.lookup(&rule);
		if (c) {
			c->packets++;
			c->bytes += bytes;
		}
	}
	return d->verdict == ZT_VERDICT_ALLOW || d->verdict == ZT_VERDICT_PASS ? XDP_PASS : XDP_DROP;
}

int xdp_ztgate(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct zt_decision d = {};
	struct zt_pkt p = {};

#if ZT_ETHERNET
	int parsed = parse_eth(&p, data, data_end);
#else
	int parsed = parse_ip(&p, data, data_end, 0);
#endif
	if (parsed != ZT_PARSED) {
		d.reason = parsed;
		d.verdict = verdict_of_reason(parsed);
	} else {
		decide(&d, &p);
	}
	return record(&d, data_end - data);
}
