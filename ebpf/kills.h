/* Kills that outlast their flow's entry (zt_killed, maps.h). `ztgate flows kill` marks the
 * flow killed in zt_ct, which the established path and the connector side honour; but zt_ct is
 * an LRU and its entries time out, and a packet whose flow has no entry is decided by the
 * policy, which would open the flow again. So each kill is also written here, in a hash that
 * nothing evicts, for the hold userspace gives it (the protocol's conntrack timeout, from the
 * kill). It is read only by device packets that found no live zt_ct entry (about to take the
 * policy path), and only while some kill holds (zt_kills_until: one array slot, the latest
 * hold): the established path never reads it. The connector side needs it not: a reply with
 * no entry is dropped as not-reply, and no entry comes back while the kill holds. */
#ifndef ZT_KILLS_H
#define ZT_KILLS_H

#include "maps.h"

/* Does any kill hold at `now`? (One array read: no hash of the key while none does.) */
static __always_inline int kills_hold(__u64 now)
{
	__u32 zero = 0;
	__u64 *until = zt_kills_until.lookup(&zero);
	return until && now < *until;
}

/* The kill that holds on this flow's tuple at `now`, or NULL. (An expired record is left for
 * userspace to sweep at its next kill: no write on this path.) */
static __always_inline struct zt_kill *kill_of(struct zt_ct_key *key, __u64 now)
{
	if (!kills_hold(now))
		return NULL;
	struct zt_kill *k = zt_killed.lookup(key);
	return k && now < k->until_ns ? k : NULL;
}

/* A new connection on the tuple (a SYN the policy allowed): its kill is over. */
static __always_inline void kill_forget(struct zt_ct_key *key, __u64 now)
{
	if (kills_hold(now))
		zt_killed.delete(key);
}

#endif
