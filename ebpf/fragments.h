/* Fragments. The first fragment of a datagram (offset 0, more to come) is decided like any
 * packet, from its ports; if it passes, zt_frags remembers the datagram, and its later
 * fragments (which carry no ports) follow that decision for ZT_FRAG_SECONDS, in the same
 * epoch. A later fragment whose first was never seen (or was dropped) stays dropped, and one
 * that would overlap the headers the first carried is dropped as an attack (RFC 1858: a
 * fragment that rewrites the ports or the TCP flags after the decision). Offsets count from
 * the start of the fragmentable part: IPv4's payload; in IPv6 what follows the Fragment
 * header, extension headers included, so the headers end after those (zt_pkt.frag_skip). A
 * datagram is known by the protocol its fragments' headers name (IPv6: the Fragment header's
 * next header), which a receiver takes from the first fragment: a later fragment that names
 * another is no part of it. */
#ifndef ZT_FRAGMENTS_H
#define ZT_FRAGMENTS_H

#include "decision.h"
#include "epoch.h"
#include "maps.h"
#include "parse.h"

static __always_inline void frag_key_of(struct zt_frag_key *key, const struct zt_pkt *p)
{
	__builtin_memcpy(key->src, p->src, 16);
	__builtin_memcpy(key->dst, p->dst, 16);
	key->id = p->frag_id;
	key->family = p->family;
	key->proto = p->frag_nh;
}

/* A first fragment passed: remember its datagram. */
static __always_inline void frag_track(const struct zt_pkt *p, __u64 epoch, __u64 now)
{
	if ((p->frag & ZT_FRAG_MORE) && !p->frag_offset) {
		struct zt_frag_key key = {};
		frag_key_of(&key, p);
		struct zt_frag f = {.seen_ns = now, .epoch = epoch, .l4_end = p->frag_skip + p->l4_len,
				    .proto = p->proto};
		zt_frags.update(&key, &f);
	}
}

/* A later fragment: ZT_REASON_FRAGMENT_FOLLOWS if its datagram's first passed (in this
 * epoch, recently), ZT_REASON_FRAGMENT_OVERLAP if it reaches into the header the first held,
 * else 0 (it stays dropped as a fragment). */
static __always_inline int frag_follows(const struct zt_pkt *p, __u64 epoch, __u64 now)
{
	struct zt_frag_key key = {};
	frag_key_of(&key, p);
	struct zt_frag *f = zt_frags.lookup(&key);
	if (!f || !same_policy(f->epoch, epoch) || now >= f->seen_ns + ZT_FRAG_SECONDS * ZT_NSEC_PER_SEC)
		return 0;
	if ((__u32)p->frag_offset * ZT_FRAG_UNIT < f->l4_end)
		return ZT_REASON_FRAGMENT_OVERLAP;
	return ZT_REASON_FRAGMENT_FOLLOWS;
}

/* A later fragment (the parser's reason for it is in d): it follows its datagram's first, or
 * is dropped as an overlap, or stays dropped as a fragment. */
static __always_inline void later_fragment(struct zt_decision *d, const struct zt_pkt *p, __u64 epoch, __u64 now)
{
	int follows = frag_follows(p, epoch, now);
	if (!follows)
		return;
	d->reason = follows;
	d->verdict = follows == ZT_REASON_FRAGMENT_FOLLOWS ? ZT_VERDICT_ALLOW : ZT_VERDICT_FRAGMENT;
	d->fast = follows == ZT_REASON_FRAGMENT_FOLLOWS;   /* its datagram was reported */
}

#endif
