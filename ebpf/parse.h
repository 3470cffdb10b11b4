/* Reading a packet as docs/policy.md says. The only code that reads packet bytes.
 * Every helper checks bounds against data_end (for the verifier) and against the IP length
 * (for the spec: bytes past it are padding), and returns ZT_PARSED or a drop reason. */
#ifndef ZT_PARSE_H
#define ZT_PARSE_H

#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "reasons.h"

#define ZT_PARSED 0
#define ZT_MAX_EXT_HEADERS 8
#define ZT_VLAN_DEPTH 2

/* IPv4's frag_off (host order): more fragments, and the offset in 8-byte units (the kernel's
 * IP_MF and IP_OFFSET live in net/ip.h, outside uapi). */
#define ZT_IP_MF 0x2000
#define ZT_IP_OFFSET 0x1fff

/* IPv6's fragment header (the kernel's struct frag_hdr and IP6_MF/IP6_OFFSET live in
 * net/ipv6.h, outside uapi). */
struct zt_ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset in 8-byte units in the top 13 bits; ZT_IP6_MF the lowest */
	__be32 identification;
};
#define ZT_IP6_MF 0x0001
#define ZT_IP6_OFFSET_SHIFT 3

/* The TCP flags byte (CWR ECE URG ACK PSH RST SYN FIN), after the data offset: kept whole in
 * zt_pkt.tcp_flags, which conntrack and the established path test. */
#define ZT_TCP_FLAGS_BYTE 13
#define ZT_TCP_FIN 0x01
#define ZT_TCP_SYN 0x02
#define ZT_TCP_RST 0x04
#define ZT_TCP_ACK 0x10

/* What the decision reads of a packet. Addresses in network order, IPv4 in [0]. */
struct zt_pkt {
	__u32 src[4] __attribute__((aligned(8)));
	__u32 dst[4];
	__u16 sport; /* host order; 0 unless TCP or UDP */
	__u16 dport;
	__u8 family; /* 4 or 6 */
	__u8 proto;
	__u8 tcp_flags; /* flags byte of the TCP header; 0 unless TCP */
	__u8 icmp_echo; /* ZT_ICMP_ECHO_REQUEST or _REPLY (ICMP or ICMPv6), with its id; else 0 */
	__u16 icmp_id;  /* host order */
	__u8 l4_len;    /* bytes of the TCP/UDP/ICMP header read (a first fragment must hold it) */
	__u8 frag;      /* ZT_FRAG_* bits: part of a fragmented datagram */
	__u32 frag_id;  /* its identification (IPv4: 16 bits), as on the wire */
	__u16 frag_offset; /* in 8-byte units */
	__u16 l4_off;   /* where the transport header starts, from the start of the frame */
	__u16 frag_skip; /* a fragment: bytes of its fragmentable part before the transport header
			  * (IPv6: the extension headers after the Fragment header; IPv4: none) */
	__u8 frag_nh;   /* a fragment: the protocol its header names, as every fragment of the
			 * datagram carries it (IPv4: the protocol; IPv6: the Fragment header's next
			 * header, the first header of the fragmentable part) */
	__u8 pad;
	__u32 l4_present; /* bytes from the transport header to the end of the IP payload */
};

#define ZT_FRAG_PART 1 /* a fragment: the first (offset 0, more to come) or a later one */
#define ZT_FRAG_MORE 2 /* more fragments follow */
#define ZT_FRAG_UNIT 8 /* bytes per unit of frag_offset */

#define ZT_ICMP_ECHO_REQUEST 1
#define ZT_ICMP_ECHO_REPLY 2

/* ICMP for this address family: IPPROTO_ICMP or IPPROTO_ICMPV6. */
static __always_inline __u8 icmp_proto(__u8 family)
{
	return family == 4 ? IPPROTO_ICMP : IPPROTO_ICMPV6;
}

/* TCP/UDP header checks and ports. l4 is where the transport header starts; present is how
 * many bytes of it the IP length covers (never more than data_end allows). */
static __always_inline int parse_l4(struct zt_pkt *p, void *l4, void *data_end, __u32 present)
{
	p->l4_present = present;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if (present < sizeof(*th) || (void *)(th + 1) > data_end)
			return ZT_REASON_TCP_SHORT;
		if (th->doff < 5)
			return ZT_REASON_TCP_BAD_OFFSET;
		if ((__u32)th->doff * 4 > present)
			return ZT_REASON_TCP_TRUNCATED;
		p->sport = bpf_ntohs(th->source);
		p->dport = bpf_ntohs(th->dest);
		__u8 flags = ((__u8 *)th)[ZT_TCP_FLAGS_BYTE];
		/* (read here, under the bound just checked: clang would otherwise sink the read to
		 * where the flags are tested, through a pointer it computes again, which the verifier
		 * knows no bound of) */
		asm volatile("" : "+r"(flags));
		p->tcp_flags = flags;
		p->l4_len = th->doff * 4;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if (present < sizeof(*uh) || (void *)(uh + 1) > data_end)
			return ZT_REASON_UDP_SHORT;
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
		p->l4_len = sizeof(*uh);
	} else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		/* Only conntrack reads this (an echo's id pairs a reply with its request); the
		 * policy decides ICMP by protocol alone, so a short ICMP header is no error. An
		 * ICMPv6 echo has ICMP's layout (type, code, checksum, id, sequence). */
		struct icmphdr *ic = l4;
		if (present >= sizeof(*ic) && (void *)(ic + 1) <= data_end) {
			__u8 type = ic->type;
			__be16 id = ic->un.echo.id;   /* (read at once, while the verifier knows the bound) */
			p->l4_len = sizeof(*ic);
			__u8 request = p->proto == IPPROTO_ICMP ? ICMP_ECHO : ICMPV6_ECHO_REQUEST;
			__u8 reply = p->proto == IPPROTO_ICMP ? ICMP_ECHOREPLY : ICMPV6_ECHO_REPLY;
			if (type == request || type == reply) {
				p->icmp_echo = type == request ? ZT_ICMP_ECHO_REQUEST : ZT_ICMP_ECHO_REPLY;
				p->icmp_id = bpf_ntohs(id);
			}
		}
	}
	return ZT_PARSED;
}

static __always_inline int parse_ipv4(struct zt_pkt *p, void *ip, void *data_end)
{
	struct iphdr *iph = ip;
	__u32 received = data_end - ip;

	if ((void *)(iph + 1) > data_end)
		return ZT_REASON_IPV4_SHORT;
	__u32 ihl = iph->ihl * 4;
	__u32 total = bpf_ntohs(iph->tot_len);
	if (ihl < sizeof(*iph))
		return ZT_REASON_IPV4_BAD_IHL;
	if (total < ihl)
		return ZT_REASON_IPV4_BAD_LENGTH;
	if (total > received)
		return ZT_REASON_IPV4_TRUNCATED;
	p->family = 4;
	p->proto = iph->protocol;
	p->src[0] = iph->saddr;
	p->dst[0] = iph->daddr;
	if (iph->frag_off & bpf_htons(ZT_IP_MF | ZT_IP_OFFSET)) { /* more fragments, or an offset */
		p->frag = ZT_FRAG_PART | (iph->frag_off & bpf_htons(ZT_IP_MF) ? ZT_FRAG_MORE : 0);
		p->frag_id = iph->id;
		p->frag_nh = iph->protocol;
		p->frag_offset = bpf_ntohs(iph->frag_off) & ZT_IP_OFFSET;
		if (p->frag_offset)
			return ZT_REASON_IPV4_FRAGMENT;   /* no ports: conntrack may know its datagram */
	}
	/* ihl <= 60: options are skipped, never read */
	p->l4_off += ihl & 0x3c;
	return parse_l4(p, ip + (ihl & 0x3c), data_end, total - ihl);
}

static __always_inline int is_ext_header(__u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_FRAGMENT ||
	       nh == IPPROTO_AH || nh == IPPROTO_DSTOPTS;
}

static __always_inline int parse_ipv6(struct zt_pkt *p, void *ip, void *data_end)
{
	struct ipv6hdr *ip6 = ip;
	__u32 received = data_end - ip;

	if ((void *)(ip6 + 1) > data_end)
		return ZT_REASON_IPV6_SHORT;
	__u32 payload = bpf_ntohs(ip6->payload_len);
	if (payload == 0)
		return ZT_REASON_IPV6_BAD_LENGTH;
	if (payload > received - sizeof(*ip6))
		return ZT_REASON_IPV6_TRUNCATED;
	__u32 end = sizeof(*ip6) + payload; /* <= 65575 */
	__u32 off = sizeof(*ip6);
	__u32 fragmentable = 0; /* where the fragmentable part starts: after the Fragment header */
	__u8 nh = ip6->nexthdr;

#pragma unroll
	for (int i = 0; i < ZT_MAX_EXT_HEADERS; i++) {
		if (!is_ext_header(nh))
			break;
		__u32 size = sizeof(struct zt_ipv6_frag);
		struct ipv6_opt_hdr *h = ip + (off & 0xffff);
		if (nh != IPPROTO_FRAGMENT) {
			if (end - off < sizeof(*h) || (void *)(h + 1) > data_end)
				return ZT_REASON_IPV6_EXT_TRUNCATED;
			/* hdrlen counts 4-byte words beyond the first two for AH (RFC 4302),
			 * 8-byte units beyond the first for the others (RFC 8200) */
			size = nh == IPPROTO_AH ? ((__u32)h->hdrlen + 2) * 4 : ((__u32)h->hdrlen + 1) * 8;
		}
		if (size > end - off)
			return ZT_REASON_IPV6_EXT_TRUNCATED;
		if (nh == IPPROTO_FRAGMENT) {
			struct zt_ipv6_frag *fh = (void *)h;
			if ((void *)(fh + 1) > data_end)
				return ZT_REASON_IPV6_EXT_TRUNCATED;
			__u16 fo = bpf_ntohs(fh->frag_off);
			p->frag = ZT_FRAG_PART | (fo & ZT_IP6_MF ? ZT_FRAG_MORE : 0);
			p->frag_id = fh->identification;
			p->frag_nh = fh->nexthdr;
			p->frag_offset = fo >> ZT_IP6_OFFSET_SHIFT;
			fragmentable = off + size;
			if (p->frag_offset) { /* no ports: conntrack may know its datagram */
				p->family = 6;
				p->proto = fh->nexthdr;
				__builtin_memcpy(p->src, &ip6->saddr, 16);
				__builtin_memcpy(p->dst, &ip6->daddr, 16);
				return ZT_REASON_IPV6_FRAGMENT;
			}
		}
		nh = h->nexthdr;
		off += size;
	}
	if (is_ext_header(nh))
		return ZT_REASON_IPV6_EXT_TOO_MANY;

	p->family = 6;
	p->proto = nh;
	__builtin_memcpy(p->src, &ip6->saddr, 16);
	__builtin_memcpy(p->dst, &ip6->daddr, 16);
	p->l4_off += off & 0xffff;
	if (fragmentable)
		p->frag_skip = off - fragmentable;
	return parse_l4(p, ip + (off & 0xffff), data_end, end - off);
}

/* The IP header starts at `ip`; the first nibble says which version. */
static __always_inline int parse_ip(struct zt_pkt *p, void *ip, void *data_end, int want)
{
	__u8 *first = ip;
	if ((void *)(first + 1) > data_end)
		return ZT_REASON_BAD_VERSION;
	__u8 version = *first >> 4;
	if (want && version != want)
		return ZT_REASON_BAD_VERSION;
	if (version == 4)
		return parse_ipv4(p, ip, data_end);
	if (version == 6)
		return parse_ipv6(p, ip, data_end);
	return ZT_REASON_BAD_VERSION;
}

/* Ethernet devices: skip the Ethernet header and up to two VLAN tags. Frames that are not IP
 * carry nothing the policy speaks of: ZT_REASON_NOT_IP (passed). */
static __always_inline int parse_eth(struct zt_pkt *p, void *data, void *data_end)
{
	struct ethhdr *eth = data;
	void *cur = eth + 1;
	if (cur > data_end)
		return ZT_REASON_ETH_SHORT;
	__be16 type = eth->h_proto;
#pragma unroll
	for (int i = 0; i < ZT_VLAN_DEPTH; i++) {
		if (type != bpf_htons(ETH_P_8021Q) && type != bpf_htons(ETH_P_8021AD))
			break;
		__be16 *tag = cur;
		if ((void *)(tag + 2) > data_end)
			return ZT_REASON_ETH_SHORT;
		type = tag[1];
		cur = tag + 2;
	}
	if (type == bpf_htons(ETH_P_8021Q) || type == bpf_htons(ETH_P_8021AD))
		return ZT_REASON_ETH_VLAN_DEPTH;
	p->l4_off = cur - data;   /* the IP header's offset; parse_ipv4/6 add theirs */
	if (type == bpf_htons(ETH_P_IP))
		return parse_ip(p, cur, data_end, 4);
	if (type == bpf_htons(ETH_P_IPV6))
		return parse_ip(p, cur, data_end, 6);
	return ZT_REASON_NOT_IP;
}

#ifndef ZT_ETHERNET
#define ZT_ETHERNET 0
#endif

/* A frame as this build's devices carry it: from the Ethernet header (ZT_ETHERNET=1) or from
 * the IP header (tunnels). */
static __always_inline int parse_frame(struct zt_pkt *p, void *data, void *data_end)
{
#if ZT_ETHERNET
	return parse_eth(p, data, data_end);
#else
	return parse_ip(p, data, data_end, 0);
#endif
}

/* Where a transport header can lie, from the start of the frame: at most two VLAN tags, the
 * IPv6 header and 8 extension headers of at most 2048 bytes each (22 + 40 + 8 * 2048 = 16446).
 * A mask of it keeps the verifier's bound on l4_off without folding any real offset back. */
#define ZT_L4_OFF_MASK 0x7fff

/* What an ICMP error says, and so who may send it (see icmp_error_of_flow). */
#define ZT_QUOTE_PATH 1 /* the way to the destination failed: a router on it may say so */
#define ZT_QUOTE_END 2  /* the destination itself refused (port or protocol unreachable, its
			 * reassembly timed out): only the destination knows that */

static __always_inline int icmp_error_kind(__u8 family, __u8 type, __u8 code)
{
	if (family == 4) {
		if (type == ICMP_DEST_UNREACH)
			return code == ICMP_PROT_UNREACH || code == ICMP_PORT_UNREACH ? ZT_QUOTE_END : ZT_QUOTE_PATH;
		if (type == ICMP_TIME_EXCEEDED)
			return code == ICMP_EXC_FRAGTIME ? ZT_QUOTE_END : ZT_QUOTE_PATH;
		return type == ICMP_PARAMETERPROB ? ZT_QUOTE_PATH : 0;
	}
	if (type == ICMPV6_DEST_UNREACH)
		return code == ICMPV6_PORT_UNREACH ? ZT_QUOTE_END : ZT_QUOTE_PATH;
	if (type == ICMPV6_TIME_EXCEED)
		return code == ICMPV6_EXC_FRAGTIME ? ZT_QUOTE_END : ZT_QUOTE_PATH;
	return type == ICMPV6_PKT_TOOBIG || type == ICMPV6_PARAMPROB ? ZT_QUOTE_PATH : 0;
}

/* An ICMP error (ICMP: destination unreachable, time exceeded, parameter problem; ICMPv6: the
 * same and packet too big), parsed as `p`, quotes the start of the packet that caused it.
 * Its kind (ZT_QUOTE_PATH or ZT_QUOTE_END) if it is such an error and the quote can be read
 * within the IP payload (bytes past the IP length are padding, as everywhere); then `quoted`
 * holds that packet's family, protocol, addresses and ports (TCP, UDP) or echo id (an echo
 * request), as parse_l4 reads them; IPv4 options beyond 20 bytes are not followed. 0 else. */
static __always_inline int parse_icmp_quote(struct zt_pkt *quoted, const struct zt_pkt *p, void *data,
					    void *data_end)
{
	struct icmphdr *ic = data + (p->l4_off & ZT_L4_OFF_MASK);
	void *q = ic + 1;   /* the quote follows the 8-byte header (ICMPv6's is as long) */
	__u32 present = p->l4_present;
	/* the shortest quote: an IPv4 header */
	if (q + sizeof(struct iphdr) > data_end || present < sizeof(*ic) + sizeof(struct iphdr))
		return 0;
	int kind = icmp_error_kind(p->family, ic->type, ic->code);
	__u32 hdr;
	if (p->family == 4) {
		struct iphdr *iph = q;
		if (!kind || iph->version != 4)
			return 0;
		hdr = iph->ihl * 4;
		quoted->proto = iph->protocol;
		quoted->src[0] = iph->saddr;
		quoted->dst[0] = iph->daddr;
	} else {
		struct ipv6hdr *ip6 = q;
		if (!kind || ip6->version != 6 || (void *)(ip6 + 1) > data_end)
			return 0;
		hdr = sizeof(*ip6);
		quoted->proto = ip6->nexthdr;
		__builtin_memcpy(quoted->src, &ip6->saddr, 16);
		__builtin_memcpy(quoted->dst, &ip6->daddr, 16);
	}
	if (hdr < sizeof(struct iphdr) || hdr > sizeof(struct ipv6hdr))
		return 0;
	void *l4 = q + hdr;
	/* 8 bytes: ports, or an echo's id */
	if (l4 + sizeof(struct icmphdr) > data_end || present < sizeof(*ic) + hdr + sizeof(struct icmphdr))
		return 0;
	quoted->family = p->family;
	if (quoted->proto == IPPROTO_TCP || quoted->proto == IPPROTO_UDP) {
		struct udphdr *ports = l4;   /* (TCP's ports are where UDP's are) */
		quoted->sport = bpf_ntohs(ports->source);
		quoted->dport = bpf_ntohs(ports->dest);
		return kind;
	}
	struct icmphdr *echo = l4;
	if (quoted->proto == icmp_proto(p->family) &&
	    echo->type == (p->family == 4 ? ICMP_ECHO : ICMPV6_ECHO_REQUEST)) {
		quoted->icmp_echo = ZT_ICMP_ECHO_REQUEST;
		quoted->icmp_id = bpf_ntohs(echo->un.echo.id);
		return kind;
	}
	return 0;
}

#endif
