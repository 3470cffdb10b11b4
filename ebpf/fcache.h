/* The flow cache (zt_fcache, maps.h): per CPU, direct-mapped by a cheap mix of the 5-tuple, in
 * front of zt_ct on the established path. A slot holds one flow that zt_ct showed alive and
 * allowed in this epoch and build; its packets are allowed by the slot alone until its next
 * check. Built without it (ZT_CT_FLOW_CACHE=0), the program has none of this code. */
#ifndef ZT_FCACHE_H
#define ZT_FCACHE_H

#include "maps.h"
#include "parse.h"

#if ZT_CT_FLOW_CACHE
/* The last 8 bytes of a flow's key (struct zt_ct_key: ports, family, protocol, padding) as
 * one word, laid out as the struct lays them out (on either byte order). */
static __always_inline __u64 ct_key_tail(const struct zt_pkt *p)
{
	union {
		struct {
			__u16 sport;
			__u16 dport;
			__u8 family;
			__u8 proto;
			__u16 pad;
		} f;
		__u64 word;
	} t = {.f = {.sport = p->icmp_echo == ZT_ICMP_ECHO_REQUEST ? p->icmp_id : p->sport,
		     .dport = p->dport, .family = p->family, .proto = p->proto}};
	return t.word;
}

/* The flow cache's slot for a packet's flow: a cheap mix of its key's words (not a strong
 * hash: a collision costs a zt_ct lookup, never a wrong decision, since the whole key is
 * compared). Read from the packet, so that a hit builds no key. */
static __always_inline __u32 fcache_index(const struct zt_pkt *p, __u64 tail)
{
	__u32 h = (p->src[0] ^ p->src[1] ^ p->src[2] ^ p->src[3]) * 0x9E3779B1U;
	h ^= p->dst[0] ^ p->dst[1] ^ p->dst[2] ^ p->dst[3] ^ (__u32)tail ^ (__u32)(tail >> 32);
	return (h * 0x85EBCA6BU) >> (32 - ZT_FCACHE_BITS);
}

static __always_inline int fcache_holds(const struct zt_fslot *slot, const struct zt_pkt *p, __u64 tail)
{
	const __u64 *k = (const __u64 *)&slot->key, *s = (const __u64 *)p->src, *t = (const __u64 *)p->dst;
	return !((k[0] ^ s[0]) | (k[1] ^ s[1]) | (k[2] ^ t[0]) | (k[3] ^ t[1]) | (k[4] ^ tail));
}

/* The zt_ct way decided the packet's flow: the slot's counts go to their flow's entry (the flow
 * it held may be another one, or gone: an entry created since is another flow on the same
 * tuple; added atomically, as another CPU may be adding its own), and the slot takes this flow
 * until its next check (the key last: a slot is never half another flow's). */
static __always_inline void fcache_fill(struct zt_fslot *slot, int holds, const struct zt_ct_key *key,
					struct zt_ct *ct, __u64 epoch, __u32 build, __u64 now, __u64 report_ns)
{
	if (slot->packets) {
		struct zt_ct *held = holds ? ct : zt_ct.lookup(&slot->key);
		if (held && held->created_ns <= slot->checked_ns) {
			__sync_fetch_and_add(&held->packets, slot->packets);
			__sync_fetch_and_add(&held->bytes, slot->bytes);
		}
	}
	__u64 until = now + ZT_FCACHE_NS;
	slot->epoch = epoch;
	slot->checked_ns = now;
	slot->until_ns = until < report_ns ? until : report_ns;
	slot->build = build;
	slot->rule = ct->rule;
	slot->device = ct->device;
	slot->ident = ct->ident;
	slot->packets = 0;
	slot->bytes = 0;
	slot->key = *key;
}
/* May the slot allow this packet? It must hold the packet's flow, checked in this epoch and
 * build, recently. (A FIN or RST, and a first fragment, take the zt_ct way: they change the
 * flow's state.) */
static __always_inline int fcache_allows(const struct zt_fslot *slot, int holds, const struct zt_pkt *p,
					 __u64 epoch, __u32 build, __u64 now)
{
	int keep = !(p->tcp_flags & (ZT_TCP_FIN | ZT_TCP_RST)) && !(p->frag & ZT_FRAG_MORE);
	return keep && holds && slot->epoch == epoch && slot->build == build && now < slot->until_ns;
}
#endif

#endif
