/* Reading a packet as spec/POLICY.md says. The only code that reads packet bytes.
 * Every helper checks bounds against data_end (for the verifier) and against the IP length
 * (for the spec: bytes past it are padding), and returns ZT_PARSED or a drop reason. */
#ifndef ZT_PARSE_H
#define ZT_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "reasons.h"

#define ZT_PARSED 0
#define ZT_MAX_EXT_HEADERS 8
#define ZT_VLAN_DEPTH 2

#define ZT_PROTO_ICMPV6 58
#define ZT_NH_HOP 0
#define ZT_NH_ROUTING 43
#define ZT_NH_FRAGMENT 44
#define ZT_NH_AUTH 51
#define ZT_NH_DSTOPTS 60

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
};

#define ZT_FRAG_PART 1 /* a fragment: the first (offset 0, more to come) or a later one */
#define ZT_FRAG_MORE 2 /* more fragments follow */

#define ZT_ICMP_ECHO_REQUEST 1
#define ZT_ICMP_ECHO_REPLY 2

/* TCP/UDP header checks and ports. l4 is where the transport header starts; present is how
 * many bytes of it the IP length covers (never more than data_end allows). */
static __always_inline int parse_l4(struct zt_pkt *p, void *l4, void *data_end, __u32 present)
{
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
		p->tcp_flags = ((__u8 *)th)[13];
		p->l4_len = th->doff * 4;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if (present < sizeof(*uh) || (void *)(uh + 1) > data_end)
			return ZT_REASON_UDP_SHORT;
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
		p->l4_len = sizeof(*uh);
	} else if (p->proto == IPPROTO_ICMP || p->proto == ZT_PROTO_ICMPV6) {
		/* Only conntrack reads this (an echo's id pairs a reply with its request); the
		 * policy decides ICMP by protocol alone, so a short ICMP header is no error. */
		__u8 *ic = l4;
		if (present >= 8 && (void *)(ic + 8) <= data_end) {
			p->l4_len = 8;
			__u8 request = p->proto == IPPROTO_ICMP ? 8 : 128, reply = p->proto == IPPROTO_ICMP ? 0 : 129;
			if (ic[0] == request || ic[0] == reply) {
				p->icmp_echo = ic[0] == request ? ZT_ICMP_ECHO_REQUEST : ZT_ICMP_ECHO_REPLY;
				p->icmp_id = ((__u16)ic[4] << 8) | ic[5];
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
	if (iph->frag_off & bpf_htons(0x3fff)) { /* more fragments, or an offset */
		p->frag = ZT_FRAG_PART | (iph->frag_off & bpf_htons(0x2000) ? ZT_FRAG_MORE : 0);
		p->frag_id = iph->id;
		p->frag_offset = bpf_ntohs(iph->frag_off) & 0x1fff;
		if (p->frag_offset)
			return ZT_REASON_IPV4_FRAGMENT;   /* no ports: conntrack may know its datagram */
	}
	/* ihl <= 60: options are skipped, never read */
	p->l4_off += ihl & 0x3c;
	return parse_l4(p, ip + (ihl & 0x3c), data_end, total - ihl);
}

static __always_inline int is_ext_header(__u8 nh)
{
	return nh == ZT_NH_HOP || nh == ZT_NH_ROUTING || nh == ZT_NH_FRAGMENT ||
	       nh == ZT_NH_AUTH || nh == ZT_NH_DSTOPTS;
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
	__u8 nh = ip6->nexthdr;

#pragma unroll
	for (int i = 0; i < ZT_MAX_EXT_HEADERS; i++) {
		if (!is_ext_header(nh))
			break;
		__u32 size = 8;
		__u8 *h = ip + (off & 0xffff);
		if (nh != ZT_NH_FRAGMENT) {
			if (end - off < 2 || (void *)(h + 2) > data_end)
				return ZT_REASON_IPV6_EXT_TRUNCATED;
			size = nh == ZT_NH_AUTH ? ((__u32)h[1] + 2) * 4 : ((__u32)h[1] + 1) * 8;
		}
		if (size > end - off)
			return ZT_REASON_IPV6_EXT_TRUNCATED;
		if (nh == ZT_NH_FRAGMENT) {
			if ((void *)(h + 8) > data_end)
				return ZT_REASON_IPV6_EXT_TRUNCATED;
			__u16 fo = bpf_ntohs(*(__be16 *)(h + 2));
			p->frag = ZT_FRAG_PART | (fo & 1 ? ZT_FRAG_MORE : 0);
			p->frag_id = *(__u32 *)(h + 4);
			p->frag_offset = fo >> 3;
			if (p->frag_offset) { /* no ports: conntrack may know its datagram */
				p->family = 6;
				p->proto = h[0];
				__builtin_memcpy(p->src, &ip6->saddr, 16);
				__builtin_memcpy(p->dst, &ip6->daddr, 16);
				return ZT_REASON_IPV6_FRAGMENT;
			}
		}
		nh = h[0];
		off += size;
	}
	if (is_ext_header(nh))
		return ZT_REASON_IPV6_EXT_TOO_MANY;

	p->family = 6;
	p->proto = nh;
	__builtin_memcpy(p->src, &ip6->saddr, 16);
	__builtin_memcpy(p->dst, &ip6->daddr, 16);
	p->l4_off += off & 0xffff;
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

#endif
