/* The maps of the decision, in the order a packet meets them, and the structs userspace
 * shares (dataplane/ mirrors them). Filled from control/compiler.py's tables by dataplane's
 * Program.load; ebpf/README.md explains the layout and why. Capacities are
 * compile-time #defines chosen by the compiler (dataplane/layout.py), defaults below. The big
 * arrays are BPF_F_MMAPABLE so userspace fills them with one memory copy. */
#ifndef ZT_MAPS_H
#define ZT_MAPS_H

#include "reasons.h"

#ifndef ZT_POOL_BITS
#define ZT_POOL_BITS 20
#endif
#ifndef ZT_POOL4_BASE
#define ZT_POOL4_BASE 0x64600000U /* 100.96.0.0/12 */
#endif
#ifndef ZT_POOL6_BASE_0
#define ZT_POOL6_BASE_0 0xfd00005aU /* fd00:5a::/108 */
#define ZT_POOL6_BASE_1 0U
#define ZT_POOL6_BASE_2 0U
#define ZT_POOL6_BASE_3 0U
#endif
#ifndef ZT_MAX_RULES
#define ZT_MAX_RULES 1024
#endif
#ifndef ZT_MAX_NODES
#define ZT_MAX_NODES 1024
#endif
#ifndef ZT_MAX_CLASSES
#define ZT_MAX_CLASSES 1024
#endif
#ifndef ZT_MAX_PORT_TABLES
#define ZT_MAX_PORT_TABLES 1024
#endif
#ifndef ZT_PORT_SLOTS
#define ZT_PORT_SLOTS 64 /* a power of two */
#endif
#ifndef ZT_MAX_SERVICES
#define ZT_MAX_SERVICES 4096
#endif
#ifndef ZT_MAX_CANDS
#define ZT_MAX_CANDS 16
#endif
#ifndef ZT_MAX_IDENTS
#define ZT_MAX_IDENTS 1024
#endif
#ifndef ZT_WHO_WORDS
#define ZT_WHO_WORDS 4
#endif
#ifndef ZT_SPORT_WORDS
#define ZT_SPORT_WORDS 1
#endif
#ifndef ZT_MAX_SRC_HASH
#define ZT_MAX_SRC_HASH 1024
#endif

#define ZT_NODE_FLAG 0x80000000U
#define ZT_V4_TOP 0
#define ZT_V6_TOP 256

/* A tunnel address's identity: ident indexes zt_idents (0: no enabled device), device is for
 * counters and flow events. */
struct zt_src {
	__u32 ident;
	__u32 device;
};
/* The ident of a device whose session is over (or whose user was deprovisioned): its packets
 * drop as session-expired, naming the device; no identity class has this id. */
#define ZT_IDENT_EXPIRED 0xFFFFFFFFU

/* Tunnel addresses outside the pools. family first so that v4 and v6 keys never collide; the
 * bank in its bits 16 and up (ZT_SRC_KEY_BANK). */
#define ZT_SRC_KEY_BANK 16
struct zt_src_key {
	__u32 family;
	__u8 addr[16]; /* IPv4 in the last four bytes */
};

/* A multibit-trie node: 256 slots, each a destination class or ZT_NODE_FLAG | child node. */
struct zt_node {
	__u32 slot[256];
};

/* A destination class: every address in it is matched by the same rules. */
struct zt_class {
	__u32 ports[2]; /* port table for tcp, udp */
	__u32 svc_icmp;
	__u32 svc_other;
};

/* Sorted destination-port ranges of one class and protocol: range i is [lo[i], lo[i+1]). */
struct zt_ports {
	__u32 lo[ZT_PORT_SLOTS]; /* padded with 0x10000 */
	__u32 svc[ZT_PORT_SLOTS];
};

/* A rule that may decide: it does when its who-bit, source-port bit and name bit are set
 * (0 = none needed). A service's list always ends with an entry needing none. rule 0: default. */
struct zt_cand {
	__u16 rule;
	__u16 who;
	__u16 sport;
	__u8 action; /* ZT_VERDICT_ALLOW or ZT_VERDICT_BLOCK */
	__u8 name;   /* name token: the destination must be learned for one of a rule's hostnames */
};

struct zt_svc {
	struct zt_cand c[ZT_MAX_CANDS];
};

/* A chain (README.md, "Changes in place"): a list longer than ZT_MAX_CANDS, written in place,
 * continues in other services of its bank. Its service's last entry is then a chain entry:
 * action ZT_CAND_CHAIN, who ZT_WHO_NEVER (a who-token never given, so the walk's test skips it
 * with no test of its own), the next service's bank-relative id in rule (low 16 bits) and sport
 * (high 16 bits), name 0. A walk follows at most ZT_CHAIN_LINKS services, so that it checks at
 * most ZT_WALK_CANDS candidates in all: the verifier walks every iteration (96 hit E2BIG). */
#define ZT_CAND_CHAIN 0xFF
#define ZT_WHO_NEVER 0xFFFF
#ifndef ZT_WALK_CANDS
#define ZT_WALK_CANDS 64
#endif
#define ZT_CHAIN_LINKS (ZT_WALK_CANDS / ZT_MAX_CANDS > 1 ? ZT_WALK_CANDS / ZT_MAX_CANDS : 1)

/* Who-bits of an identity class: bit t set when who-token t (a rule's principals and source
 * prefixes) holds for the addresses of that class. */
struct zt_ident {
	__u64 w[ZT_WHO_WORDS];
};

/* Source-port bits: bit s set when the port lies in source-port set s. */
struct zt_sport {
	__u64 w[ZT_SPORT_WORDS];
};

struct zt_counter {
	__u64 packets;
	__u64 bytes;
};

/* The last decision on this CPU: what BPF_PROG_TEST_RUN callers read back. */
struct zt_last {
	__u32 rule;
	__u32 device;
	__u8 verdict;
	__u8 reason;
	__u16 name; /* the name token of the deciding candidate: 0 unless a learned name decided */
	__u32 pad2;
};

/* ------------------------------------------------------------------------------------------
 * Flow events and the state that outlives a build.
 *
 * zt_events, zt_cpu_state and zt_ct are shared by every build of one gateway: with
 * ZT_PIN_DIR they are pinned there (bcc creates and pins them when the path is absent and
 * reuses them when present), so counters, the token bucket and unread events survive a
 * program swap and a controller restart. Their shapes must therefore not change between
 * builds: nothing in them depends on the Layout, and the reason counters have room for
 * reasons appended later (ZT_REASON_SLOTS). dataplane/program.py refuses a pinned map whose
 * shape differs from what a build expects. */

#define ZT_DRY_RUN_MAGIC 0x5a544452U /* "ZTDR" as metadata of a test run: see dry_run() */

#ifndef ZT_EVENT_RING_BYTES
#define ZT_EVENT_RING_BYTES (1 << 20) /* a power of two, a multiple of the page: ~13k events */
#endif
#ifndef ZT_EVENT_RATE
#define ZT_EVENT_RATE 10000 /* events per second per CPU, sustained */
#endif
#ifndef ZT_EVENT_BURST
#define ZT_EVENT_BURST 1000 /* events per CPU at once after a quiet spell */
#endif
#ifndef ZT_FLOW_EVENT_NS
#define ZT_FLOW_EVENT_NS 60000000000ULL /* an allowed non-TCP flow is reported again after this */
#endif
#ifndef ZT_CT_ENTRIES
#define ZT_CT_ENTRIES 65536 /* flows tracked (LRU): the least recently used goes when it is full */
#endif
/* How long a flow's replies may come back after its last packet (either way), by protocol. An
 * older entry is not honoured even before the LRU evicts it. */
#ifndef ZT_CT_TCP_SECONDS
#define ZT_CT_TCP_SECONDS 3600
#endif
#ifndef ZT_CT_UDP_SECONDS
#define ZT_CT_UDP_SECONDS 120
#endif
#ifndef ZT_CT_ICMP_SECONDS
#define ZT_CT_ICMP_SECONDS 30
#endif
#ifndef ZT_FRAG_ENTRIES
#define ZT_FRAG_ENTRIES 16384 /* fragmented datagrams in flight (LRU) */
#endif
#ifndef ZT_FRAG_SECONDS
#define ZT_FRAG_SECONDS 10 /* a datagram's later fragments follow its first this long */
#endif
#ifndef ZT_CT_TCP_CLOSING_SECONDS
#define ZT_CT_TCP_CLOSING_SECONDS 10
#endif
#define ZT_EVENT_INTERVAL_NS (1000000000ULL / ZT_EVENT_RATE)
#define ZT_EVENT_BURST_NS ((ZT_EVENT_BURST - 1) * ZT_EVENT_INTERVAL_NS)
#define ZT_REASON_SLOTS 32

/* One flow event: a drop, or a new allowed flow. 72 bytes; dataplane/events.py reads it.
 * Addresses are as on the wire; IPv4 in the first four bytes, the other twelve zero
 * (not v4-mapped). family 0: the packet was unreadable before its addresses (no addresses,
 * no ports). Ports are 0 unless TCP or UDP. */
struct zt_event {
	__u64 time_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 build;   /* the build that decided (zt_bank's, read as the packet arrived) */
	__u32 device;  /* 0: none (unknown source, unreadable packet) */
	__u32 ident;   /* identity class; 0: none */
	__u32 rule;    /* 0: no rule (default action, or no decision) */
	__u32 len;     /* bytes of the frame as XDP saw it */
	__u16 sport;   /* host order */
	__u16 dport;
	__u8 src[16];
	__u8 dst[16];
	__u8 family; /* 4, 6 or 0 */
	__u8 proto;
	__u8 verdict;
	__u8 reason;
	/* the deciding candidate's name token (zt_decision.name): 0 unless a learned name decided.
	 * A byte of what was the trailing __u32 pad: the record keeps its 72 bytes and its
	 * alignment, so readers and builds sharing the pinned ring buffer agree on its shape, and
	 * an older build's events (pad written 0) read as "no name". */
	__u8 name;
	__u8 pad[3];
};

/* Per CPU: counters by reason, the last decision, and the event limiter. The limiter is a
 * token bucket kept as one timestamp (GCRA): ev_tat is when the bucket would be full again;
 * an event may go while ev_tat - now <= ZT_EVENT_BURST_NS, and each one moves ev_tat on by
 * ZT_EVENT_INTERVAL_NS. Events not emitted are counted, never waited for. */
struct zt_cpu {
	struct zt_counter reason[ZT_REASON_SLOTS];
	struct zt_last last;
	__u64 clock_jiffies; /* the coarse clock as read at this jiffy (see coarse_now()) */
	__u64 clock_ns;
	__u64 ev_tat;
	__u64 ev_sent;    /* events written to zt_events */
	__u64 ev_limited; /* events not written: over the rate */
	__u64 ev_full;    /* events not written: the ring buffer was full */
	__u64 ct_hits;    /* packets allowed by conntrack (an established flow), without the policy walk */
};

/* An allowed flow, by its 5-tuple as the device sent it (src: the device; an ICMP echo's id
 * in sport). */
struct zt_ct_key {
	__u8 src[16] __attribute__((aligned(8)));
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 proto;
	__u16 pad;
};

enum zt_ct_state {
	ZT_CT_OPEN = 0,
	ZT_CT_CLOSING = 1, /* a FIN or RST went by: ZT_CT_TCP_CLOSING_SECONDS left */
	ZT_CT_KILLED = 2,  /* ended by `ztgate flows kill`: its packets drop (zt_killed holds the kill
			    * when the entry is gone) */
};

struct zt_ct {
	__u64 seen_ns;    /* its last packet, either way (coarse clock): it lives until this is old */
	__u64 event_ns;   /* when its last event was due (emitted, or held back by the limiter) */
	__u64 created_ns;
	__u64 epoch;      /* zt_epoch when the policy last allowed it: decided again when it moved */
	__u64 packets;    /* from the device (counted without atomics: near enough under races) */
	__u64 bytes;
	__u64 reply_packets;
	__u64 reply_bytes;
	__u32 build;      /* the build and rule that last allowed it (rule ids belong to a build) */
	__u32 rule;
	__u32 device;     /* and whose flow it is, in that build's numbering */
	__u32 ident;
	__u8 state;       /* enum zt_ct_state */
	__u8 pad[7];
};

/* A ring buffer whose map is pinned at _path: BPF_RINGBUF_OUTPUT of bcc's helpers.h with the
 * pin suffix that bcc's BPF_TABLE_PINNED puts on other maps' sections. */
#define ZT_RINGBUF_PINNED(_name, _bytes, _path)                                                \
	struct _name##_table_t {                                                               \
		int key;                                                                       \
		u32 leaf;                                                                      \
		int (*ringbuf_output)(void *, u64, u64);                                       \
		void *(*ringbuf_reserve)(u64);                                                 \
		void (*ringbuf_discard)(void *, u64);                                          \
		void (*ringbuf_submit)(void *, u64);                                           \
		u32 max_entries;                                                               \
	};                                                                                     \
	__attribute__((section("maps/ringbuf:" _path))) struct _name##_table_t _name = {      \
		.max_entries = (_bytes)}

#ifdef ZT_PIN_DIR
#define ZT_SHARED_TABLE(_type, _key, _leaf, _name, _entries)                                   \
	BPF_TABLE_PINNED(_type, _key, _leaf, _name, _entries, ZT_PIN_DIR "/" #_name)
#define ZT_SHARED_RINGBUF(_name, _bytes) ZT_RINGBUF_PINNED(_name, _bytes, ZT_PIN_DIR "/" #_name)
#else
#define ZT_SHARED_TABLE(_type, _key, _leaf, _name, _entries)                                   \
	BPF_TABLE(_type, _key, _leaf, _name, _entries)
#define ZT_SHARED_RINGBUF(_name, _bytes) BPF_RINGBUF_OUTPUT(_name, (_bytes) / PAGE_SIZE)
#endif

/* The policy's two banks. Every policy map below holds two copies of its table, bank 0 at
 * entries [0, capacity) and bank 1 at [capacity, 2 * capacity) (the source hash: the bank in
 * its key); zt_bank says which bank is in force and the build its tables are. A packet reads
 * zt_bank once, as it arrives, and every table it reads after is of that bank: it is decided
 * wholly by one build. Userspace writes a new build into the bank not in force, then flips
 * zt_bank with one aligned 8-byte store (dataplane/tables.py), then moves the epoch: a policy
 * change without a new program (README.md, "Changes in place"). */
#define ZT_BANKS 2
struct zt_bank {
	__u32 bank;  /* 0 or 1 */
	__u32 build; /* the build the bank holds: events, conntrack and the flow cache carry it */
};
BPF_F_TABLE("array", __u32, struct zt_bank, zt_bank, 1, BPF_F_MMAPABLE);
#define ZT_IN_BANK(bank, idx, capacity) ((idx) + (bank) * (capacity))

/* 1. source -> identity */
BPF_F_TABLE("array", __u32, struct zt_src, zt_pool4, ZT_BANKS << ZT_POOL_BITS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct zt_src, zt_pool6, ZT_BANKS << ZT_POOL_BITS, BPF_F_MMAPABLE);
BPF_HASH(zt_src_hash, struct zt_src_key, struct zt_src, ZT_BANKS * ZT_MAX_SRC_HASH);
BPF_F_TABLE("array", __u32, struct zt_ident, zt_idents, ZT_BANKS * ZT_MAX_IDENTS, BPF_F_MMAPABLE);
/* 2. destination -> class -> 3. port table -> service */
BPF_F_TABLE("array", __u32, struct zt_node, zt_nodes, ZT_BANKS * ZT_MAX_NODES, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct zt_class, zt_classes, ZT_BANKS * ZT_MAX_CLASSES, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct zt_ports, zt_port_tables, ZT_BANKS * ZT_MAX_PORT_TABLES, BPF_F_MMAPABLE);
/* 4. service -> candidates, and the source-port bits some candidates test */
/* A build for a policy with hostnames holds each bank's services twice, as two halves of
 * the bank's rows: the lists as compiled, then the same lists without their name candidates
 * (ZT_SVC_VARIANTS), which a packet whose destination was learned for no name walks: the name
 * candidates cannot hold for it, so it walks what the policy without hostnames walks
 * (README.md, "Hostnames"). Entry (bank * ZT_SVC_VARIANTS + variant) * ZT_MAX_SERVICES + svc. */
#ifndef ZT_NAME_WORDS
#define ZT_NAME_WORDS 0
#endif
#define ZT_SVC_VARIANTS (ZT_NAME_WORDS ? 2 : 1)
BPF_F_TABLE("array", __u32, struct zt_svc, zt_services, ZT_BANKS * ZT_SVC_VARIANTS * ZT_MAX_SERVICES, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct zt_sport, zt_sport, ZT_BANKS * 65536, BPF_F_MMAPABLE);
/* 4b. hostnames: a learned address -> its name bits (bit t: learned for a name that name
 * token t matches; see README.md, "Hostnames"). Written in place by userspace as names are
 * learned and expire; read by walk() for a destination whose filter slot (below) holds more
 * than one learned address: the others are answered by the slot. ZT_NAME_WORDS 0 (a policy
 * without hostnames): never read. Not preallocated: capacity costs nothing until
 * learned. Key as zt_src_hash's, the bank in its family (the bits are of that bank's build). */
#ifndef ZT_MAX_LEARNED
#define ZT_MAX_LEARNED 16384
#endif
struct zt_names {
	__u64 w[ZT_NAME_WORDS > 0 ? ZT_NAME_WORDS : 1];
};
BPF_F_TABLE("hash", struct zt_src_key, struct zt_names, zt_learned, ZT_BANKS * ZT_MAX_LEARNED, BPF_F_NO_PREALLOC);
/* In front of it, per slot of a hash of the address (learned_names()), per bank: which of
 * that bank's learned addresses fall there. ref[bank] 0: none (the destination was learned for
 * no name: one array lookup, no probe that misses); 1 or 2: exactly one, whose address and
 * bits are copy[2 * bank + ref - 1] (the same lookup: no probe either); ZT_LEARNED_MANY: more than
 * one, probe zt_learned. Userspace writes a copy that no packet reads (the other one; reused
 * 2 ms after it was last unlinked at the earliest), then both refs with one aligned 8-byte
 * store; an address is in zt_learned before a ref says MANY, and leaves it after the ref
 * stopped saying so (dataplane/learned.py). One slot in a build without hostnames. */
#define ZT_LEARNED_FILTER_BITS 16
#define ZT_LEARNED_FILTER_MUL 0x9E3779B1U
#define ZT_LEARNED_MANY 0xFFFFFFFFU
typedef __u64 zt_learned_count; /* both refs: ref[0] in the low half */
struct zt_learned_one {
	__u32 family;
	__u32 addr[4]; /* as zt_pkt holds it: IPv4 in addr[0], the rest zero */
	__u32 pad;
	struct zt_names names;
};
struct zt_learned_slot {
	__u32 ref[ZT_BANKS];
	struct zt_learned_one copy[ZT_BANKS * 2]; /* bank b's two: 2b, 2b + 1 (one dimension: bcc's
						   * Python mirror of a map value reads one) */
};
BPF_F_TABLE("array", __u32, struct zt_learned_slot, zt_learned_filter,
	    ZT_NAME_WORDS ? 1 << ZT_LEARNED_FILTER_BITS : 1, BPF_F_MMAPABLE);
/* 5. counters: per rule of each bank (rule ids belong to the bank's build), and the shared
 * per-CPU state */
BPF_PERCPU_ARRAY(zt_rule_stats, struct zt_counter, ZT_BANKS * ZT_MAX_RULES);
ZT_SHARED_TABLE("percpu_array", __u32, struct zt_cpu, zt_cpu_state, 1);
/* 6. flow events, and the allowed flows (whose replies the connector side lets back) */
ZT_SHARED_RINGBUF(zt_events, ZT_EVENT_RING_BYTES);
ZT_SHARED_TABLE("lru_hash", struct zt_ct_key, struct zt_ct, zt_ct, ZT_CT_ENTRIES);

/* The flow cache: per CPU, direct-mapped by a hash of the 5-tuple, in front of zt_ct on the
 * established path. A slot holds a flow that zt_ct showed alive and allowed in this epoch and
 * build: for ZT_FCACHE_NS after that check, its packets are allowed by the slot alone (an array
 * slot on this CPU: no hashing of a 40-byte key, no shared cache line), their counts kept in
 * the slot until the next check adds them to zt_ct (Program.flows() adds what is still here).
 * ZT_FCACHE_NS is at most a quarter of the shortest timeout, and each check refreshes the flow in
 * zt_ct, so a slot never outlives its flow's timeout; anything that must end a flow sooner moves
 * the epoch (a change, a device disabled, `flows kill`), which every slot was checked in. (A
 * flow the LRU evicts from a full zt_ct may keep its slot until the slot's check: it was allowed
 * in this epoch and build, by the policy in force.) */
#ifndef ZT_CT_FLOW_CACHE
#define ZT_CT_FLOW_CACHE 1 /* 0: every packet misses it (scripts/bench's comparison) */
#endif
#ifndef ZT_FCACHE_BITS
#define ZT_FCACHE_BITS 12
#endif
#define ZT_MIN2(a, b) ((a) < (b) ? (a) : (b))
#define ZT_CT_MIN_SECONDS                                                                      \
	ZT_MIN2(ZT_MIN2(ZT_CT_TCP_SECONDS, ZT_CT_TCP_CLOSING_SECONDS), ZT_MIN2(ZT_CT_UDP_SECONDS, ZT_CT_ICMP_SECONDS))
#define ZT_FCACHE_NS ZT_MIN2(500000000ULL, ZT_CT_MIN_SECONDS * 250000000ULL)

struct zt_fslot {
	struct zt_ct_key key;
	__u64 epoch;      /* checked against zt_ct in this epoch and build */
	__u64 checked_ns; /* when (coarse clock): its counts belong to a zt_ct entry created by then */
	__u64 until_ns;   /* trusted until then */
	__u32 build;
	__u32 rule;
	__u32 device;
	__u32 ident;
	__u64 packets;    /* this CPU's packets of the flow since the check: not in zt_ct yet */
	__u64 bytes;
};

ZT_SHARED_TABLE("percpu_array", __u32, struct zt_fslot, zt_fcache, 1 << ZT_FCACHE_BITS);
/* A fragmented datagram whose first fragment was allowed (or, from a connector, passed as a
 * reply): its later fragments, which carry no ports, follow that decision. */
struct zt_frag_key {
	__u8 src[16];
	__u8 dst[16];
	__u32 id; /* the identification, as on the wire (IPv4: 16 bits) */
	__u8 family;
	__u8 proto; /* the protocol every fragment's header names (zt_pkt.frag_nh): IPv6's Fragment
		     * header names the first header of the fragmentable part, which a later fragment
		     * cannot change (RFC 8200: the receiver takes the first fragment's) */
	__u16 pad;
};

struct zt_frag {
	__u64 seen_ns; /* its first fragment (coarse clock): later ones follow for ZT_FRAG_SECONDS */
	__u64 epoch;   /* decided in this epoch: after a change, its later fragments drop */
	/* Where the first fragment's headers end in the fragmentable part (IPv6: the extension
	 * headers after the Fragment header, then the transport header; IPv4: the transport
	 * header): a later fragment may not overlap them. */
	__u16 l4_end;
	__u8 proto;    /* the transport protocol the first fragment was decided on */
	__u8 pad[5];
};

ZT_SHARED_TABLE("lru_hash", struct zt_frag_key, struct zt_frag, zt_frags, ZT_FRAG_ENTRIES);

/* The epoch: userspace moves it on after every change it makes to the kernel's policy or
 * identities (a new build attached, a device written), so conntrack knows which flows were
 * allowed before the change and must be decided again. Its low ZT_KILL_BITS count the kills
 * (`ztgate flows kill`) since: a kill must reach every CPU's flow cache, whose slots compare
 * the whole value, but it changes no decision, so conntrack, fragments and the connector side
 * compare only the bits above (same_policy). */
#define ZT_KILL_BITS 16
ZT_SHARED_TABLE("array", __u32, __u64, zt_epoch, 1);

/* Kills that outlast their flow's entry (kills.h): the tuple (as zt_ct keys it) -> until when
 * the kill holds. A hash, not an LRU: nothing evicts a kill. Userspace writes it (the only
 * writer but for a SYN that reopens the tuple, which deletes its record), sweeps the expired
 * records before each kill, and refuses a kill that does not fit: at most ZT_KILL_ENTRIES
 * unexpired kills at once. zt_kills_until holds the latest until_ns of any kill written, so
 * that packets read zt_killed only while some kill holds. */
#ifndef ZT_KILL_ENTRIES
#define ZT_KILL_ENTRIES 65536
#endif

struct zt_kill {
	__u64 until_ns; /* coarse clock: the kill holds while now < until_ns */
	__u32 device;   /* whose flow it was (zt_ct's device and identity class at the kill) */
	__u32 ident;
};

ZT_SHARED_TABLE("hash", struct zt_ct_key, struct zt_kill, zt_killed, ZT_KILL_ENTRIES);
ZT_SHARED_TABLE("array", __u32, __u64, zt_kills_until, 1);

/* The connector side's tail calls (see xdp_ztgate_reply): into xdp_ztgate_redecide when a
 * flow must be decided again, into xdp_ztgate_icmp_error for an ICMP error. Slots in the order
 * of dataplane/program.py's TAIL_CALLS. */
#define ZT_SLOW_REDECIDE 0
#define ZT_SLOW_ICMP_ERROR 1
BPF_PROG_ARRAY(zt_reply_slow, 2);

#endif
