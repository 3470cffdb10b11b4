/* The maps of the decision, in the order a packet meets them. Filled by control/compiler.py
 * through dataplane/tables.py; ebpf/README.md explains the layout and why. Capacities are
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

/* Tunnel addresses outside the pools. family first so that v4 and v6 keys never collide. */
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

/* A rule that may decide: it does when its who-bit and source-port bit are set (0 = none
 * needed). A service's list always ends with an entry needing neither. rule 0: default. */
struct zt_cand {
	__u16 rule;
	__u16 who;
	__u16 sport;
	__u8 action; /* ZT_VERDICT_ALLOW or ZT_VERDICT_BLOCK */
	__u8 pad;
};

struct zt_svc {
	struct zt_cand c[ZT_MAX_CANDS];
};

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
	__u16 pad;
	__u32 pad2;
};

struct zt_cpu {
	struct zt_counter reason[ZT_REASON__MAX];
	struct zt_last last;
};

/* 1. source -> identity */
BPF_F_TABLE("array", __u32, struct zt_src, zt_pool4, 1 << ZT_POOL_BITS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct zt_src, zt_pool6, 1 << ZT_POOL_BITS, BPF_F_MMAPABLE);
BPF_HASH(zt_src_hash, struct zt_src_key, struct zt_src, ZT_MAX_SRC_HASH);
BPF_F_TABLE("array", __u32, struct zt_ident, zt_idents, ZT_MAX_IDENTS, BPF_F_MMAPABLE);
/* 2. destination -> class -> 3. port table -> service */
BPF_F_TABLE("array", __u32, struct zt_node, zt_nodes, ZT_MAX_NODES, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct zt_class, zt_classes, ZT_MAX_CLASSES, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct zt_ports, zt_port_tables, ZT_MAX_PORT_TABLES, BPF_F_MMAPABLE);
/* 4. service -> candidates, and the source-port bits some candidates test */
BPF_F_TABLE("array", __u32, struct zt_svc, zt_services, ZT_MAX_SERVICES, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct zt_sport, zt_sport, 65536, BPF_F_MMAPABLE);
/* 5. counters */
BPF_PERCPU_ARRAY(zt_rule_stats, struct zt_counter, ZT_MAX_RULES);
BPF_PERCPU_ARRAY(zt_cpu_state, struct zt_cpu, 1);

#endif
