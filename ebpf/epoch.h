/* Time and the epoch, which every entry reads before it decides anything. */
#ifndef ZT_EPOCH_H
#define ZT_EPOCH_H

#include "decision.h"
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

/* The bank in force and its build (zt_bank): one 8-byte load, so both come from the same write
 * (userspace flips them with one aligned store). Read once per packet, after the epoch: a
 * packet that reads the epoch of after a flip reads the bank of after it too. */
static __always_inline void bank_now(struct zt_decision *d)
{
	__u32 zero = 0;
	struct zt_bank *b = zt_bank.lookup(&zero);
	__u64 both = b ? *(const __u64 *)b : 0;
	d->bank = (__u32)both & 1;
	d->build = (__u32)(both >> 32);
}

/* Two epochs of one policy: they differ at most in their kills (see zt_epoch). */
static __always_inline int same_policy(__u64 a, __u64 b)
{
	return !((a ^ b) >> ZT_KILL_BITS);
}

#endif
