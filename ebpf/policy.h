/* The policy's decision: source -> identity, destination -> class -> service -> the first
 * candidate rule whose conditions hold. A fixed number of array lookups; no loop over rules,
 * users or devices (README.md, "The path of a packet"). */
#ifndef ZT_POLICY_H
#define ZT_POLICY_H

#include "decision.h"
#include "maps.h"
#include "parse.h"

#define ZT_POOL_MASK ((1U << ZT_POOL_BITS) - 1)

/* 1. Tunnel address -> identity. Pool addresses index an array; others probe a hash. */
static __always_inline struct zt_src *identify(__u8 family, const __u32 *addr, __u32 bank)
{
	__u32 idx;
	if (family == 4) {
		__u32 a = bpf_ntohl(addr[0]);
		if ((a >> ZT_POOL_BITS) == (ZT_POOL4_BASE >> ZT_POOL_BITS)) {
			idx = (a & ZT_POOL_MASK) | bank << ZT_POOL_BITS;
			return zt_pool4.lookup(&idx);
		}
	} else {
		__u32 a = bpf_ntohl(addr[3]);
		if (addr[0] == bpf_htonl(ZT_POOL6_BASE_0) && addr[1] == bpf_htonl(ZT_POOL6_BASE_1) &&
		    addr[2] == bpf_htonl(ZT_POOL6_BASE_2) &&
		    (a >> ZT_POOL_BITS) == (ZT_POOL6_BASE_3 >> ZT_POOL_BITS)) {
			idx = (a & ZT_POOL_MASK) | bank << ZT_POOL_BITS;
			return zt_pool6.lookup(&idx);
		}
	}
	struct zt_src_key key = {.family = family | bank << ZT_SRC_KEY_BANK};
	if (family == 4)
		__builtin_memcpy(&key.addr[12], &addr[0], 4);
	else
		__builtin_memcpy(key.addr, addr, 16);
	return zt_src_hash.lookup(&key);
}

/* 2. Destination -> class: a 16-8-8 trie for IPv4, 16-8-...-8 for IPv6. Returns -1 on an
 * inconsistent table (fail closed). */
static __always_inline __s64 dst_class(const struct zt_pkt *p, __u32 bank)
{
	const __u8 *b = (const __u8 *)p->dst;
	__u32 key = ZT_IN_BANK(bank, (p->family == 4 ? ZT_V4_TOP : ZT_V6_TOP) + b[0], ZT_MAX_NODES);
	struct zt_node *node = zt_nodes.lookup(&key);
	if (!node)
		return -1;
	__u32 e = node->slot[b[1]];
	int last = p->family == 4 ? 4 : 16;
#pragma unroll
	for (int i = 2; i < 16; i++) {
		if (!(e & ZT_NODE_FLAG) || i >= last)
			break;
		key = ZT_IN_BANK(bank, e & ~ZT_NODE_FLAG, ZT_MAX_NODES);
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
static __always_inline __s64 service_of(const struct zt_pkt *p, __u32 cid, __u32 bank)
{
	cid = ZT_IN_BANK(bank, cid, ZT_MAX_CLASSES);
	struct zt_class *cls = zt_classes.lookup(&cid);
	if (!cls)
		return -1;
	__u32 table;
	if (p->proto == IPPROTO_TCP)
		table = cls->ports[0];
	else if (p->proto == IPPROTO_UDP)
		table = cls->ports[1];
	else if (p->proto == icmp_proto(p->family))
		return cls->svc_icmp;
	else
		return cls->svc_other;
	table = ZT_IN_BANK(bank, table, ZT_MAX_PORT_TABLES);
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

/* The name bits of the destination (README.md, "Hostnames"): zero when it was learned for no
 * name. Copied out of the map: a scalar the walk tests like the who-bits, not a pointer that
 * may be NULL (whose two states the verifier would walk every candidate with). Returns
 * whether the destination was learned at all. The filter's slot answers alone unless more
 * than one address of this bank falls in it (zt_learned_filter, maps.h). */
static __always_inline int learned_names(const struct zt_pkt *p, __u32 bank, struct zt_names *out)
{
	struct zt_src_key key = {.family = p->family | bank << ZT_SRC_KEY_BANK};
	if (p->family == 4)
		__builtin_memcpy(&key.addr[12], &p->dst[0], 4);
	else
		__builtin_memcpy(key.addr, p->dst, 16);
	/* the filter's slot: the address's four words (IPv4: one, the rest zero) as loaded */
	__u32 slot = ((p->dst[0] ^ p->dst[1] ^ p->dst[2] ^ p->dst[3]) * ZT_LEARNED_FILTER_MUL) >>
		     (32 - ZT_LEARNED_FILTER_BITS);
	struct zt_learned_slot *s = zt_learned_filter.lookup(&slot);
	/* one 8-byte load: userspace writes both refs with one aligned store */
	__u64 refs = s ? *(volatile const zt_learned_count *)s->ref : 0;
	__u32 ref = bank ? (__u32)(refs >> 32) : (__u32)refs;
	int named = 0;
	if (ref == ZT_LEARNED_MANY) {
		struct zt_names *names = zt_learned.lookup(&key);
		if (names) {
			*out = *names;
			named = 1;
		}
	} else if (ref && s) {
		const struct zt_learned_one *one = &s->copy[(bank & 1) * 2 + ((ref - 1) & 1)];
		if (one->family == p->family && !((one->addr[0] ^ p->dst[0]) | (one->addr[1] ^ p->dst[1]) |
						  (one->addr[2] ^ p->dst[2]) | (one->addr[3] ^ p->dst[3]))) {
			*out = one->names;
			named = 1;
		}
	}
	return named;
}

/* 4. Walk the service's candidates: the first whose conditions hold decides. A program built
 * for a policy with hostnames reads the destination's learned names once, first (the filter,
 * and a hash probe when its slot is not empty), and walks the service's list without its name
 * candidates when the destination was learned for no name (zt_services, maps.h); one for a
 * policy without them has neither the lookup nor the test. A list that grew past the width in
 * place goes on in the service its last entry names (a chain, maps.h): only a walk that found
 * no candidate in a whole service gets past the inner loop, so a list that fits pays nothing
 * for chains (the chain entry's who-bit is never set: the loop skips it with its who test). */
static __always_inline int walk(struct zt_decision *d, const struct zt_pkt *p, __u32 svc_id,
				const struct zt_ident *who)
{
#if ZT_NAME_WORDS
	struct zt_names nb = {};
	int named = learned_names(p, d->bank, &nb);
	__u32 base = (d->bank * ZT_SVC_VARIANTS + !named) * ZT_MAX_SERVICES;
#else
	__u32 base = ZT_IN_BANK(d->bank, 0, ZT_MAX_SERVICES);
#endif
	__u32 key = base + svc_id;
	struct zt_sport *sp = NULL;
	for (int link = 0; link < ZT_CHAIN_LINKS; link++) {
		struct zt_svc *svc = zt_services.lookup(&key);
		if (!svc)
			return -1;
		for (int i = 0; i < ZT_MAX_CANDS; i++) {
			struct zt_cand c = svc->c[i];
			if (c.who && !bit_set(who->w, ZT_WHO_WORDS, c.who))
				continue;
#if ZT_NAME_WORDS
			if (c.name && !bit_set(nb.w, ZT_NAME_WORDS, c.name))
				continue;
#endif
			if (c.sport) {
				if (!sp) {
					__u32 port = ZT_IN_BANK(d->bank, p->sport, 65536);
					sp = zt_sport.lookup(&port);
					if (!sp)
						return -1;
				}
				if (!bit_set(sp->w, ZT_SPORT_WORDS, c.sport))
					continue;
			}
			d->rule = c.rule;
			d->name = c.name;
			d->verdict = c.action;
			d->reason = c.rule ? ZT_REASON_RULE : ZT_REASON_DEFAULT;
			return 0;
		}
		struct zt_cand last = svc->c[ZT_MAX_CANDS - 1];
		__u32 next = last.rule | (__u32)last.sport << 16;
		if (last.action != ZT_CAND_CHAIN || next >= ZT_MAX_SERVICES)
			return -1;
		key = base + next;
	}
	return -1; /* the compiler ends a list (its chain's last service) with an unconditional entry */
}

/* The policy's decision for a parsed packet: its source's identity (none: unknown source), then
 * the first candidate of its (destination class, protocol, port) that holds for it. Tables that
 * lead nowhere fail closed (internal). */
static __always_inline void decide(struct zt_decision *d, const struct zt_pkt *p)
{
	struct zt_src *entry = identify(p->family, p->src, d->bank);
	/* One 8-byte load: userspace rewrites a live entry with one aligned 8-byte store
	 * (Program.set_sources), so ident and device are always read from the same write. Map
	 * values are 8-byte aligned. */
	__u64 both = entry ? *(const __u64 *)entry : 0;
	struct zt_src src = {.ident = (__u32)both, .device = (__u32)(both >> 32)};
	if (!src.ident) {
		d->verdict = ZT_VERDICT_UNKNOWN;
		d->reason = ZT_REASON_UNKNOWN_SOURCE;
		return;
	}
	d->device = src.device;
	if (src.ident == ZT_IDENT_EXPIRED) {
		d->verdict = ZT_VERDICT_BLOCK;
		d->reason = ZT_REASON_SESSION_EXPIRED;
		return;
	}
	d->ident = src.ident;
	__u32 ident = ZT_IN_BANK(d->bank, src.ident, ZT_MAX_IDENTS);
	struct zt_ident *who = zt_idents.lookup(&ident);
	__s64 cid = dst_class(p, d->bank);
	__s64 svc = cid < 0 ? -1 : service_of(p, cid, d->bank);
	if (who && svc >= 0 && walk(d, p, svc, who) == 0)
		return;
	d->verdict = ZT_VERDICT_BLOCK;
	d->reason = ZT_REASON_INTERNAL;
}

#endif
