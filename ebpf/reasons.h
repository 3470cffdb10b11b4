/* Verdicts and the reasons behind them: shared with userspace.
 * Mirrored by dataplane/reasons.py; tests/unit/test_reasons.py checks that the two agree.
 * Append only: the numbers are in counters and flow logs. */
#ifndef ZT_REASONS_H
#define ZT_REASONS_H

enum zt_verdict {
	ZT_VERDICT_ALLOW = 0,
	ZT_VERDICT_BLOCK = 1,
	ZT_VERDICT_UNKNOWN = 2,   /* source is not an enabled device */
	ZT_VERDICT_MALFORMED = 3, /* the packet cannot be read */
	ZT_VERDICT_FRAGMENT = 4,  /* a non-first fragment: no ports to decide on */
	ZT_VERDICT_PASS = 5,      /* not IP (ARP on Ethernet devices): not policed */
	ZT_VERDICT__MAX
};

enum zt_reason {
	ZT_REASON_RULE = 0,               /* a rule matched */
	ZT_REASON_DEFAULT = 1,            /* no rule matched: the default action */
	ZT_REASON_UNKNOWN_SOURCE = 2,     /* source is no enabled device's tunnel address */
	ZT_REASON_BAD_VERSION = 3,        /* first nibble is neither 4 nor 6 */
	ZT_REASON_IPV4_SHORT = 4,         /* fewer than 20 bytes */
	ZT_REASON_IPV4_BAD_IHL = 5,       /* IHL below 5 */
	ZT_REASON_IPV4_BAD_LENGTH = 6,    /* total length below IHL x 4 */
	ZT_REASON_IPV4_TRUNCATED = 7,     /* total length above the bytes received */
	ZT_REASON_IPV4_FRAGMENT = 8,      /* fragment offset is not 0 */
	ZT_REASON_IPV6_SHORT = 9,         /* fewer than 40 bytes */
	ZT_REASON_IPV6_BAD_LENGTH = 10,   /* payload length 0 */
	ZT_REASON_IPV6_TRUNCATED = 11,    /* payload length above the bytes received */
	ZT_REASON_IPV6_EXT_TRUNCATED = 12,/* an extension header does not fit */
	ZT_REASON_IPV6_EXT_TOO_MANY = 13, /* a ninth extension header */
	ZT_REASON_IPV6_FRAGMENT = 14,     /* fragment header with offset not 0 */
	ZT_REASON_TCP_SHORT = 15,         /* fewer than 20 bytes of TCP header */
	ZT_REASON_TCP_BAD_OFFSET = 16,    /* data offset below 5 */
	ZT_REASON_TCP_TRUNCATED = 17,     /* data offset x 4 above the bytes present */
	ZT_REASON_UDP_SHORT = 18,         /* fewer than 8 bytes of UDP header */
	ZT_REASON_ETH_SHORT = 19,         /* Ethernet (or VLAN) header does not fit */
	ZT_REASON_NOT_IP = 20,            /* Ethernet frame that is not IPv4/IPv6: passed */
	ZT_REASON_INTERNAL = 21,          /* the tables are inconsistent: fail closed */
	ZT_REASON_ETH_VLAN_DEPTH = 22,    /* more VLAN tags than the parser walks */
	ZT_REASON_REPLY = 23,             /* from a connector: a reply of a tracked flow */
	ZT_REASON_NOT_REPLY = 24,         /* from a connector: no reply of a tracked flow */
	ZT_REASON_REVOKED = 25,           /* from a connector: a reply of a flow the policy no longer allows */
	ZT_REASON_KILLED = 26,            /* a packet of a flow ended by `ztgate flows kill` */
	ZT_REASON_FRAGMENT_FOLLOWS = 27,  /* a later fragment of a datagram whose first was allowed */
	ZT_REASON_FRAGMENT_OVERLAP = 28,  /* a later fragment that would overwrite the transport header */
	ZT_REASON_SESSION_EXPIRED = 29,   /* to or from a device whose session with the identity provider is over */
	ZT_REASON__MAX
};

#endif
