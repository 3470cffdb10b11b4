/* ztgate's XDP program: every packet on the ingress interface is parsed, identified and
 * decided by the policy, counted, and passed or dropped. Built by dataplane/program.py with
 * the capacities of dataplane/layout.py as -D flags; ZT_ETHERNET=1 for Ethernet devices
 * (frames start at the Ethernet header), 0 for tunnels (frames start at the IP header). */
#include <uapi/linux/bpf.h>

#include "maps.h"
#include "parse.h"

/* Map lookups stay in this file: bcc rewrites map calls only in the main source file. */

#define ZT_POOL_MASK ((1U << ZT_POOL_BITS) - 1)

_Static_assert(ZT_REASON__MAX <= ZT_REASON_SLOTS, "zt_cpu.reason has no room: raise ZT_REASON_SLOTS "
					       "(which changes the pinned zt_cpu_state)");

struct zt_decision {
	__u64 epoch; /* zt_epoch as the packet arrived, read before any table */
	__u8 fast;   /* decided by the established path (conntrack), not by the policy */
	__u32 rule;
	__u32 device;
	__u32 ident;
	__u8 verdict;
	__u8 reason;
};

/* 1. Tunnel address -> identity. Pool addresses index an array; others probe a hash. */
static __always_inline struct zt_src *identify(__u8 family, const __u32 *addr)
{
	__u32 idx;
	if (family == 4) {
		__u32 a = bpf_ntohl(addr[0]);
		if ((a >> ZT_POOL_BITS) == (ZT_POOL4_BASE >> ZT_POOL_BITS)) {
			idx = a & ZT_POOL_MASK;
			return zt_pool4.lookup(&idx);
		}
	} else {
		__u32 a = bpf_ntohl(addr[3]);
		if (addr[0] == bpf_htonl(ZT_POOL6_BASE_0) && addr[1] == bpf_htonl(ZT_POOL6_BASE_1) &&
		    addr[2] == bpf_htonl(ZT_POOL6_BASE_2) &&
		    (a >> ZT_POOL_BITS) == (ZT_POOL6_BASE_3 >> ZT_POOL_BITS)) {
			idx = a & ZT_POOL_MASK;
			return zt_pool6.lookup(&idx);
		}
	}
	struct zt_src_key key = {.family = family};
	if (family == 4)
		__builtin_memcpy(&key.addr[12], &addr[0], 4);
	else
		__builtin_memcpy(key.addr, addr, 16);
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
	struct zt_src *entry = identify(p->family, p->src);
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
	d->ident = src.ident;
	__u32 ident = src.ident;
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

#define ZT_TCP_SYN 0x02
#define ZT_TCP_ACK 0x10

/* The coarse clock (CLOCK_MONOTONIC_COARSE, which moves once a tick): enough for the event
 * limiter and the flow window. Reading it costs ~15 ns here, reading jiffies ~1 ns, so it is
 * read once per tick and CPU and kept in the per-CPU state. */
static __always_inline __u64 coarse_now(struct zt_cpu *cpu)
{
	__u64 j = bpf_jiffies64();
	if (j != cpu->clock_jiffies) {
		cpu->clock_jiffies = j;
		cpu->clock_ns = bpf_ktime_get_coarse_ns();
	}
	return cpu->clock_ns;
}

/* The event limiter (see struct zt_cpu): may one more event go now? */
static __always_inline int event_allowed(struct zt_cpu *cpu, __u64 now)
{
	__u64 tat = cpu->ev_tat > now ? cpu->ev_tat : now;
	if (tat - now > ZT_EVENT_BURST_NS) {
		cpu->ev_limited++;
		return 0;
	}
	cpu->ev_tat = tat + ZT_EVENT_INTERVAL_NS;
	return 1;
}

/* Write one event; 0 when the ring buffer had no room (counted). Never waits. */
static __always_inline int emit(struct zt_cpu *cpu, const struct zt_decision *d, const struct zt_pkt *p,
				__u32 len)
{
	struct zt_event *e = zt_events.ringbuf_reserve(sizeof(struct zt_event));
	if (!e) {
		cpu->ev_full++;
		return 0;
	}
	e->time_ns = bpf_ktime_get_ns();
	e->build = ZT_BUILD;
	e->device = d->device;
	e->ident = d->ident;
	e->rule = d->rule;
	e->len = len;
	e->sport = p->sport;
	e->dport = p->dport;
	__builtin_memcpy(e->src, p->src, 16);
	__builtin_memcpy(e->dst, p->dst, 16);
	e->family = p->family;
	e->proto = p->proto;
	e->verdict = d->verdict;
	e->reason = d->reason;
	e->pad = 0;
	zt_events.ringbuf_submit(e, 0);
	cpu->ev_sent++;
	return 1;
}

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

/* ------------------------------------------------------------------------------------------
 * Conntrack (zt_ct): every allowed packet's flow, by its 5-tuple as the device sent it (an
 * ICMP echo's id stands in the source port). It lets the flow's replies back through the
 * connector side, and it lets the flow's later packets through here with one lookup while
 * nothing has changed (the epoch and the build are the ones that allowed it). */

#define ZT_TCP_FIN 0x01
#define ZT_TCP_RST 0x04

static __always_inline void ct_key_of(struct zt_ct_key *key, const struct zt_pkt *p)
{
	__builtin_memcpy(key->src, p->src, 16);
	__builtin_memcpy(key->dst, p->dst, 16);
	key->sport = p->icmp_echo == ZT_ICMP_ECHO_REQUEST ? p->icmp_id : p->sport;
	key->dport = p->dport;
	key->family = p->family;
	key->proto = p->proto;
}

/* Is the flow still alive at `now`? An expired entry is not honoured even before eviction. */
static __always_inline int ct_alive(const struct zt_ct *ct, __u8 proto, __u64 now)
{
	__u64 s = ct->state == ZT_CT_CLOSING ? ZT_CT_TCP_CLOSING_SECONDS
		  : proto == IPPROTO_TCP     ? ZT_CT_TCP_SECONDS
		  : proto == IPPROTO_UDP     ? ZT_CT_UDP_SECONDS
					     : ZT_CT_ICMP_SECONDS;
	/* (Another CPU's clock reading may be a tick ahead of this one's: no subtraction.) */
	return now < ct->seen_ns + s * 1000000000ULL;
}

/* A packet of the flow went by (either way): it lives on; a FIN or RST starts its close. */
static __always_inline void ct_touch(struct zt_ct *ct, const struct zt_pkt *p, __u64 now)
{
	if (ct->seen_ns != now) /* once a tick at most: no cache line written on every packet */
		ct->seen_ns = now;
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (ZT_TCP_FIN | ZT_TCP_RST)) && ct->state == ZT_CT_OPEN)
		ct->state = ZT_CT_CLOSING;
}

/* Fragments. The first fragment of a datagram (offset 0, more to come) is decided like any
 * packet, from its ports; if it passes, zt_frags remembers the datagram, and its later
 * fragments (which carry no ports) follow that decision for ZT_FRAG_SECONDS, in the same
 * epoch. A later fragment whose first was never seen (or was dropped) stays dropped, and one
 * that would overlap the transport header the first carried is dropped as an attack (RFC
 * 1858: a fragment that rewrites the ports or the TCP flags after the decision). */
static __always_inline void frag_key_of(struct zt_frag_key *key, const struct zt_pkt *p)
{
	__builtin_memcpy(key->src, p->src, 16);
	__builtin_memcpy(key->dst, p->dst, 16);
	key->id = p->frag_id;
	key->family = p->family;
	key->proto = p->proto;
}

/* A first fragment passed: remember its datagram. */
static __always_inline void frag_track(const struct zt_pkt *p, __u64 epoch, __u64 now)
{
	if ((p->frag & ZT_FRAG_MORE) && !p->frag_offset) {
		struct zt_frag_key key = {};
		frag_key_of(&key, p);
		struct zt_frag f = {.seen_ns = now, .epoch = epoch, .l4_len = p->l4_len};
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
	if (!f || !same_policy(f->epoch, epoch) || now >= f->seen_ns + ZT_FRAG_SECONDS * 1000000000ULL)
		return 0;
	if ((__u32)p->frag_offset * 8 < f->l4_len)
		return ZT_REASON_FRAGMENT_OVERLAP;
	return ZT_REASON_FRAGMENT_FOLLOWS;
}

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
					struct zt_ct *ct, __u64 epoch, __u64 now, __u64 report_ns)
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
	slot->build = ZT_BUILD;
	slot->rule = ct->rule;
	slot->device = ct->device;
	slot->ident = ct->ident;
	slot->packets = 0;
	slot->bytes = 0;
	slot->key = *key;
}
#endif

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

/* The established path: a TCP segment without SYN, a UDP datagram or an ICMP echo request of a
 * live flow that this build allowed in this epoch is allowed again by that decision, and a
 * killed flow's packet is dropped. One lookup: the flow cache's slot on this CPU, or zt_ct
 * when the slot holds another flow or is due for its check (which refills it). A SYN (a new
 * connection) and everything else is decided by the policy. Returns 1 when it decided. */
static __always_inline int established(struct zt_decision *d, const struct zt_pkt *p, struct zt_cpu *cpu,
				       __u64 bytes, int dry)
{
	if (p->proto == IPPROTO_TCP) {
		if (p->tcp_flags & ZT_TCP_SYN)
			return 0;
	} else if (p->proto != IPPROTO_UDP && p->icmp_echo != ZT_ICMP_ECHO_REQUEST) {
		return 0;
	}
	__u64 now = coarse_now(cpu);
#if ZT_CT_FLOW_CACHE
	__u64 tail = ct_key_tail(p);
	__u32 i = fcache_index(p, tail);
	struct zt_fslot *slot = zt_fcache.lookup(&i);
	if (!slot)
		return 0;
	/* (A FIN or RST, and a first fragment, take the zt_ct way: they change the flow's state.) */
	int keep = !(p->tcp_flags & (ZT_TCP_FIN | ZT_TCP_RST)) && !(p->frag & ZT_FRAG_MORE);
	int holds = fcache_holds(slot, p, tail);
	if (keep && holds && slot->epoch == d->epoch && slot->build == ZT_BUILD && now < slot->until_ns) {
		allow_as_before(d, slot->rule, slot->device, slot->ident);
		if (!dry) {
			slot->packets++;
			slot->bytes += bytes;
			cpu->ct_hits++;
		}
		return 1;
	}
#endif
	struct zt_ct_key key = {};
	ct_key_of(&key, p);
	struct zt_ct *ct = zt_ct.lookup(&key);
	if (!ct || !ct_alive(ct, p->proto, now))
		return 0;
	if (ct->state == ZT_CT_KILLED) {
		d->device = ct->device;
		d->ident = ct->ident;
		d->verdict = ZT_VERDICT_BLOCK;
		d->reason = ZT_REASON_KILLED;
		return 1;
	}
	/* another epoch or build: decided again; a non-TCP flow due to be reported: reported */
	__u64 report_ns = p->proto == IPPROTO_TCP ? ~0ULL : ct->event_ns + ZT_FLOW_EVENT_NS;
	if (!same_policy(ct->epoch, d->epoch) || ct->build != ZT_BUILD || now >= report_ns)
		return 0;
	allow_as_before(d, ct->rule, ct->device, ct->ident);
	if (dry)
		return 1;
	ct_touch(ct, p, now);
	ct->packets++;
	ct->bytes += bytes;
	cpu->ct_hits++;
	frag_track(p, d->epoch, now);
#if ZT_CT_FLOW_CACHE
	fcache_fill(slot, holds, &key, ct, d->epoch, now, report_ns);
#endif
	return 1;
}

/* Events: every drop, and each new allowed flow. A TCP flow is new at its SYN (without ACK);
 * other protocols by conntrack: a flow is reported when it is not there, when its last report
 * is older than ZT_FLOW_EVENT_NS, or when another build or rule decided it.
 * Conntrack: a packet the policy allowed writes its flow's entry (created, or brought up to
 * this decision). A drop writes nothing: the way back of a flow the policy no longer allows
 * closes on the connector side, which decides it again when the epoch has moved. */
static __always_inline void report(struct zt_cpu *cpu, const struct zt_decision *d, const struct zt_pkt *p,
				   __u64 bytes)
{
	if (d->verdict == ZT_VERDICT_PASS)
		return;
	__u64 now = coarse_now(cpu);
	if (d->verdict != ZT_VERDICT_ALLOW) {
		if (event_allowed(cpu, now))
			emit(cpu, d, p, bytes);
		return;
	}
	struct zt_ct_key key = {};
	ct_key_of(&key, p);
	struct zt_ct *ct = zt_ct.lookup(&key);
	int syn = p->proto == IPPROTO_TCP && (p->tcp_flags & (ZT_TCP_SYN | ZT_TCP_ACK)) == ZT_TCP_SYN;
	/* A killed flow stays killed (this packet raced the kill: it passes, as one in flight
	 * would, but revives nothing) unless its tuple opens a new connection (a SYN). */
	if (ct && ct->state == ZT_CT_KILLED && !syn && ct_alive(ct, p->proto, now))
		return;
	/* an entry that timed out, or a killed flow's tuple opened again, starts anew */
	if (ct && (!ct_alive(ct, p->proto, now) || ct->state == ZT_CT_KILLED)) {
		zt_ct.delete(&key);
		ct = NULL;
	}
	frag_track(p, d->epoch, now);
	int new_flow;
	if (p->proto == IPPROTO_TCP)
		new_flow = syn;
	else
		new_flow = !ct || now >= ct->event_ns + ZT_FLOW_EVENT_NS || ct->build != ZT_BUILD ||
			   ct->rule != d->rule;
	if (new_flow && event_allowed(cpu, now))
		emit(cpu, d, p, bytes);
	if (!ct) {
		struct zt_ct flow = {.seen_ns = now,
				     .created_ns = now,
				     .epoch = d->epoch,
				     .packets = 1,
				     .bytes = bytes,
				     .build = ZT_BUILD,
				     .rule = d->rule,
				     .device = d->device,
				     .ident = d->ident};
		/* (An event the limiter held back is counted as lost, and the flow's next report is
		 * a window later: under a flood, unreported flows must not keep their packets off
		 * the established path.) */
		flow.event_ns = now;
		ct_touch(&flow, p, now);
		zt_ct.update(&key, &flow);
		return;
	}
	ct_touch(ct, p, now);
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & ZT_TCP_SYN))
		ct->state = ZT_CT_OPEN;   /* the tuple's new connection */
	ct->packets++;
	ct->bytes += bytes;
	if (p->proto != IPPROTO_TCP && new_flow)
		ct->event_ns = now;   /* (two CPUs may both report a flow: no harm) */
	ct->epoch = d->epoch;
	ct->build = ZT_BUILD;
	ct->rule = d->rule;
	ct->device = d->device;
	ct->ident = d->ident;
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

/* The one exit: count the decision, remember it for test-run callers, report it (conntrack
 * and events, unless the established path decided), and act on it. */
static __always_inline int record(struct zt_cpu *cpu, const struct zt_decision *d, const struct zt_pkt *p,
				  __u64 bytes, int dry)
{
	if (!cpu)
		return XDP_DROP;
	cpu->last.rule = d->rule;
	cpu->last.device = d->device;
	cpu->last.verdict = d->verdict;
	cpu->last.reason = d->reason;
	if (dry)
		return d->verdict == ZT_VERDICT_ALLOW || d->verdict == ZT_VERDICT_PASS ? XDP_PASS : XDP_DROP;
	__u32 r = d->reason < ZT_REASON__MAX ? d->reason : ZT_REASON_INTERNAL;
	cpu->reason[r].packets++;
	cpu->reason[r].bytes += bytes;
	if (d->reason == ZT_REASON_RULE || d->reason == ZT_REASON_DEFAULT) {
		__u32 rule = d->rule;
		struct zt_counter *c = zt_rule_stats.lookup(&rule);
		if (c) {
			c->packets++;
			c->bytes += bytes;
		}
	}
	if (!d->fast)
		report(cpu, d, p, bytes);
	return d->verdict == ZT_VERDICT_ALLOW || d->verdict == ZT_VERDICT_PASS ? XDP_PASS : XDP_DROP;
}

int xdp_ztgate(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* The epoch first: a packet decided by the tables of before a change must not carry the
	 * epoch of after it into conntrack (see Kernel._next_epoch). */
	struct zt_decision d = {.epoch = epoch_now()};
	struct zt_pkt p = {};
	__u64 bytes = data_end - data;
	int dry = dry_run(ctx);
	__u32 zero = 0;
	struct zt_cpu *cpu = zt_cpu_state.lookup(&zero);

#if ZT_ETHERNET
	int parsed = parse_eth(&p, data, data_end);
#else
	int parsed = parse_ip(&p, data, data_end, 0);
#endif
	if (parsed != ZT_PARSED) {
		d.reason = parsed;
		d.verdict = verdict_of_reason(parsed);
		if (p.frag_offset && cpu) {
			int follows = frag_follows(&p, d.epoch, coarse_now(cpu));
			if (follows) {
				d.reason = follows;
				d.verdict = follows == ZT_REASON_FRAGMENT_FOLLOWS ? ZT_VERDICT_ALLOW : ZT_VERDICT_FRAGMENT;
				d.fast = follows == ZT_REASON_FRAGMENT_FOLLOWS;   /* its datagram was reported */
			}
		}
	} else if (!cpu || !established(&d, &p, cpu, bytes, dry)) {
		decide(&d, &p);
	}
	/* One copy of record() for every path: without this barrier clang specialises it (and
	 * report()) for each constant decision above, which made the program 3.5 times longer and
	 * every packet ~70 ns slower (instruction cache). bcc 0.26 cannot load BPF-to-BPF calls,
	 * so noinline is no way out. */
	asm volatile("" : : "r"(&d), "r"(&p) : "memory");
	return record(cpu, &d, &p, bytes, dry);
}

/* ------------------------------------------------------------------------------------------
 * The connector side: packets from a private network towards devices. Only replies of flows
 * the ingress program allowed (TCP, UDP and ICMP echo, by zt_ct, within the protocol's
 * timeout) pass, and only while the policy allows the flow: when the epoch has moved since the
 * flow was last allowed, xdp_ztgate_redecide decides the flow again (its device's packet, as
 * the ingress program would see it) by this build's tables. Everything else is dropped,
 * counted and reported, with the device it was sent to.
 *
 * The decision again is a tail call, not inline code: inlined, its presence alone cost the
 * common path (epoch unchanged) ~40 ns a packet, and bcc 0.26 has no BPF-to-BPF calls. */
BPF_PROG_ARRAY(zt_reply_slow, 1);

static __always_inline int reply_parse(struct zt_pkt *p, void *data, void *data_end)
{
#if ZT_ETHERNET
	return parse_eth(p, data, data_end);
#else
	return parse_ip(p, data, data_end, 0);
#endif
}

/* The conntrack key of the flow a packet from the private side answers; 0 if it answers none. */
static __always_inline int reply_key(struct zt_ct_key *key, const struct zt_pkt *p)
{
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP && p->icmp_echo != ZT_ICMP_ECHO_REPLY)
		return 0;
	key->family = p->family;
	key->proto = p->proto;
	__builtin_memcpy(key->src, p->dst, 16);
	__builtin_memcpy(key->dst, p->src, 16);
	key->sport = p->icmp_echo ? p->icmp_id : p->dport;
	key->dport = p->sport;
	return 1;
}

/* A reply of a live flow that passes: the flow lives on and counts it; a first fragment's
 * later fragments will follow it. */
static __always_inline void reply_passes(struct zt_ct *ct, const struct zt_pkt *p, __u64 now, __u64 bytes,
					 __u64 epoch, int dry)
{
	if (dry)
		return;
	ct_touch(ct, p, now);
	ct->reply_packets++;
	ct->reply_bytes += bytes;
	frag_track(p, epoch, now);
}

/* An ICMP error from the private side (ICMP: unreachable, fragmentation needed, time
 * exceeded, parameter problem; ICMPv6: the same and packet too big) quotes the packet that
 * caused it: the device's own, whose 5-tuple is its flow's conntrack key. 1 if it does, and
 * the quoted packet came from the device the error goes to. */
static __always_inline int icmp_error_key(struct zt_ct_key *key, const struct zt_pkt *p, void *data,
					  void *data_end)
{
	__u8 *ic = data + (p->l4_off & 0x3ff);
	__u8 *q = ic + 8;
	if ((void *)(q + 20) > data_end)   /* the shortest quote: an IPv4 header */
		return 0;
	__u32 hdr;
	if (p->family == 4) {
		if (!(ic[0] == 3 || ic[0] == 11 || ic[0] == 12) || (q[0] >> 4) != 4)
			return 0;
		hdr = (q[0] & 0x0f) * 4;
		key->proto = q[9];
		__builtin_memcpy(key->src, q + 12, 4);
		__builtin_memcpy(key->dst, q + 16, 4);
	} else {
		if (ic[0] < 1 || ic[0] > 4 || (q[0] >> 4) != 6 || (void *)(q + 40) > data_end)
			return 0;
		hdr = 40;
		key->proto = q[6];
		__builtin_memcpy(key->src, q + 8, 16);
		__builtin_memcpy(key->dst, q + 24, 16);
	}
	if (hdr < 20 || hdr > 40)      /* (IPv4 options beyond 20 bytes: not followed) */
		return 0;
	__u8 *l4 = q + hdr;
	if ((void *)(l4 + 8) > data_end)
		return 0;
	if (key->proto == IPPROTO_TCP || key->proto == IPPROTO_UDP) {
		key->sport = ((__u16)l4[0] << 8) | l4[1];
		key->dport = ((__u16)l4[2] << 8) | l4[3];
	} else if (key->proto == (p->family == 4 ? IPPROTO_ICMP : ZT_PROTO_ICMPV6) &&
		   l4[0] == (p->family == 4 ? 8 : 128)) {
		key->sport = ((__u16)l4[4] << 8) | l4[5];   /* a quoted echo request: its id */
	} else {
		return 0;
	}
	key->family = p->family;
	/* the quoted packet is the device's: it must come from where the error is going */
	__u32 quoted[4];
	__builtin_memcpy(quoted, key->src, 16);
	if (quoted[0] != p->dst[0])
		return 0;
	return p->family == 4 || (quoted[1] == p->dst[1] && quoted[2] == p->dst[2] && quoted[3] == p->dst[3]);
}

/* Count, remember for test-run callers, report drops (with the device they were sent to). */
static __always_inline int reply_record(struct xdp_md *ctx, struct zt_cpu *cpu, struct zt_decision *d,
					const struct zt_pkt *p, __u64 now, int dry)
{
	__u64 bytes = ctx->data_end - ctx->data;
	if (d->verdict != ZT_VERDICT_ALLOW && d->verdict != ZT_VERDICT_PASS && p->family) {
		struct zt_src *to = identify(p->family, p->dst);
		__u64 both = to ? *(const __u64 *)to : 0;
		d->ident = (__u32)both;
		d->device = (__u32)(both >> 32);
	}
	__u32 r = d->reason < ZT_REASON__MAX ? d->reason : ZT_REASON_INTERNAL;
	if (!dry) {
		cpu->reason[r].packets++;
		cpu->reason[r].bytes += bytes;
	}
	cpu->last.rule = d->rule;
	cpu->last.device = d->device;
	cpu->last.verdict = d->verdict;
	cpu->last.reason = d->reason;
	if (d->verdict == ZT_VERDICT_ALLOW || d->verdict == ZT_VERDICT_PASS)
		return XDP_PASS;
	if (!dry && event_allowed(cpu, now))
		emit(cpu, d, p, bytes);
	return XDP_DROP;
}

int xdp_ztgate_reply(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct zt_decision d = {.verdict = ZT_VERDICT_BLOCK, .reason = ZT_REASON_NOT_REPLY};
	struct zt_pkt p = {};
	__u32 zero = 0;
	struct zt_cpu *cpu = zt_cpu_state.lookup(&zero);
	if (!cpu)
		return XDP_DROP;
	__u64 now = coarse_now(cpu);
	int parsed = reply_parse(&p, data, data_end);
	struct zt_ct_key key = {};
	if (parsed != ZT_PARSED) {
		d.reason = parsed;
		/* (not IP: the Ethernet build passes ARP on ingress; nothing unparsed passes here) */
		d.verdict = parsed == ZT_REASON_NOT_IP ? ZT_VERDICT_BLOCK : verdict_of_reason(parsed);
		if (p.frag_offset) {   /* a later fragment of a reply that passed follows it */
			int follows = frag_follows(&p, epoch_now(), now);
			if (follows) {
				d.reason = follows;
				d.verdict = follows == ZT_REASON_FRAGMENT_FOLLOWS ? ZT_VERDICT_ALLOW : ZT_VERDICT_FRAGMENT;
			}
		}
	} else if ((p.proto == IPPROTO_ICMP || p.proto == ZT_PROTO_ICMPV6) && !p.icmp_echo) {
		/* an error about a live flow of this epoch passes with it (path MTU discovery
		 * needs "fragmentation needed" and "packet too big"); it does not keep it alive */
		if (icmp_error_key(&key, &p, data, data_end)) {
			struct zt_ct *ct = zt_ct.lookup(&key);
			if (ct && ct_alive(ct, key.proto, now) && ct->state != ZT_CT_KILLED && same_policy(ct->epoch, epoch_now())) {
				d.verdict = ZT_VERDICT_ALLOW;
				d.reason = ZT_REASON_REPLY;
			}
		}
	} else if (reply_key(&key, &p)) {
		struct zt_ct *ct = zt_ct.lookup(&key);
		if (ct && ct_alive(ct, p.proto, now)) {
			if (ct->state == ZT_CT_KILLED) {
				d.reason = ZT_REASON_KILLED;
			} else if (same_policy(ct->epoch, epoch_now())) {
				d.verdict = ZT_VERDICT_ALLOW;
				d.reason = ZT_REASON_REPLY;
				reply_passes(ct, &p, now, ctx->data_end - ctx->data, ct->epoch, dry_run(ctx));
			} else {
				zt_reply_slow.call(ctx, 0);
				d.reason = ZT_REASON_INTERNAL;   /* the tail call failed: fail closed */
			}
		}
	}
	return reply_record(ctx, cpu, &d, &p, now, dry_run(ctx));
}

/* The epoch moved since this flow was last allowed: decide it again. */
int xdp_ztgate_redecide(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct zt_decision d = {.verdict = ZT_VERDICT_BLOCK, .reason = ZT_REASON_NOT_REPLY};
	struct zt_pkt p = {};
	__u32 zero = 0;
	struct zt_cpu *cpu = zt_cpu_state.lookup(&zero);
	if (!cpu)
		return XDP_DROP;
	__u64 now = coarse_now(cpu);
	int dry = dry_run(ctx);
	struct zt_ct_key key = {};
	if (reply_parse(&p, data, data_end) != ZT_PARSED || !reply_key(&key, &p))
		return XDP_DROP;   /* (xdp_ztgate_reply parsed it fine: unreachable) */
	struct zt_ct *ct = zt_ct.lookup(&key);
	if (ct && ct_alive(ct, p.proto, now) && ct->state != ZT_CT_KILLED) {
		struct zt_pkt fwd = {.family = p.family, .proto = p.proto};
		__builtin_memcpy(fwd.src, p.dst, 16);
		__builtin_memcpy(fwd.dst, p.src, 16);
		if (!p.icmp_echo) {   /* ICMP is decided without ports */
			fwd.sport = p.dport;
			fwd.dport = p.sport;
		}
		struct zt_decision again = {};
		__u64 epoch = epoch_now();   /* read before deciding: a change after it is seen next time */
		decide(&again, &fwd);
		if (again.verdict == ZT_VERDICT_ALLOW) {
			if (!dry) {
				/* (the build is left alone: the device's next packet brings it and the
				 * rule up to date, on the policy path) */
				ct->epoch = epoch;
			}
			d.verdict = ZT_VERDICT_ALLOW;
			d.reason = ZT_REASON_REPLY;
			reply_passes(ct, &p, now, ctx->data_end - ctx->data, epoch, dry);
		} else {
			if (!dry)
				zt_ct.delete(&key);
			d.reason = ZT_REASON_REVOKED;
			d.rule = again.rule;
		}
	}
	return reply_record(ctx, cpu, &d, &p, now, dry);
}
