/* Time and the epoch, which every entry reads before it decides anything. */
#ifndef ZT_EPOCH_H
#define ZT_EPOCH_H

#include "maps.h"

#define ZT_NSEC_PER_SEC 1000000000ULL

/* The coarse clock (CLOCK_MONOTONIC_COARSE, which moves once a tick): enough for timeouts, the
 * event limiter and the flow window. Reading it costs ~15 ns here, reading jiffies ~1 ns, so it
 * is read once per tick and CPU and kept in the per-CPU state. */
static __always_inline __u64 coarse_now(struct zt_cpu *cpu)
{
	__u64 j = bpf_jiffies64();
	if (j != cpu->clock_jiffies) {
		cpu->clock_jiffies = j;
		cpu->clock_ns = bpf_ktime_get_coarse_ns();
	}
	return cpu->clock_ns;
}

/* zt_epoch: moved on by the controller after every change it makes to the kernel. */
static __always_inline __u64 epoch_now(void)
{
	__u32 zero = 0;
	__u64 *e = zt_epoch.lookup(&zero);
	return e ? *e : 0;
}

/* Two epochs of one policy: they differ at most in their kills (see zt_epoch). */
static __always_inline int same_policy(__u64 a, __u64 b)
{
	return !((a ^ b) >> ZT_KILL_BITS);
}

#endif
