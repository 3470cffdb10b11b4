"""The capacities compiled into the program: -D flags for ebpf/ztgate.c, chosen here from
what the compiled tables need. The C falls back on the defaults of these fields when a flag
is missing; tests/kernel/test_mirrors.py checks that they agree. The C's own constants and
struct layouts are mirrored in dataplane/mirrors.py."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

POOL_BITS = 20               # tunnel-address pool arrays: 2^20 slots per family (-DZT_POOL_BITS)


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


# The most candidates per service headroom gives: the walk's loop is verified iteration by
# iteration, and 96 exceed the verifier's complexity limit (E2BIG) where 64 pass, with hostnames
# and wide who-bits too (bcc 0.26, this project's kernel). A policy that needs more gets what it
# needs, and no room.
CANDS_HEADROOM_MAX = 64
WALK_CANDS = CANDS_HEADROOM_MAX   # candidates one walk checks in all, over a chain's services (ZT_WALK_CANDS)
HEADROOM_GRANULE = 4096      # big tables are rounded up to a multiple of this, not to a power of two


def chain_links(max_cands: int) -> int:
    """The services one candidate list may take in a program of this width (ZT_CHAIN_LINKS): a
    list that grows past the width in place goes on in other services (a chain, ebpf/maps.h),
    as many as keep a walk within WALK_CANDS candidates; one (no chain) past that."""
    return max(1, WALK_CANDS // max_cands)


def _headroom(n: int, floor: int) -> int:
    """Room for n entries and some growth (a policy change is written into the program in
    force while its tables fit). Small tables: a quarter more, to a power of two. Big ones:
    an eighth more, to a multiple of HEADROOM_GRANULE: each table is there twice (two banks),
    and a power of two would double some of them again (the bench's large deployment: 636 MiB
    of maps against 512 allowed)."""
    if n + n // 4 + 1 <= HEADROOM_GRANULE:
        return _pow2(n + n // 4 + 1, floor)
    return -(-(n + n // 8 + 1) // HEADROOM_GRANULE) * HEADROOM_GRANULE


@dataclass(frozen=True)
class Layout:
    """Capacities compiled into the program. Tables fit a program when every count is within."""

    max_rules: int = 1024        # rule ids 1..max_rules-1; 0 is 'no rule' (default action)
    max_nodes: int = 1024
    max_classes: int = 1024
    max_port_tables: int = 1024
    port_slots: int = 64         # power of two: the port search takes log2 steps
    max_services: int = 4096
    max_cands: int = 16          # candidates per service, the terminating entry included
    max_idents: int = 1024
    who_words: int = 4           # 64-bit words of who-bits per identity class (a power of two)
    sport_words: int = 1         # 64-bit words of source-port-set bits per port (a power of two)
    max_src_hash: int = 1024     # tunnel addresses outside the pools
    name_words: int = 0          # 64-bit words of name bits per learned address (a power of two); 0: no hostnames
    max_learned: int = 16384     # learned addresses (zt_learned; not preallocated)
    pool4_base: int = 0x64600000  # 100.96.0.0/12
    pool6_base: int = 0xFD00005A << 96   # fd00:5a::/108
    ethernet: bool = False       # frames start at the Ethernet header (else at the IP header)
    ct_entries: int = 65536      # conntrack's flows (LRU; shared by the builds of a gateway)
    ct_tcp_seconds: int = 3600   # a flow lives this long after its last packet
    ct_tcp_closing_seconds: int = 10   # after a FIN or RST
    ct_udp_seconds: int = 120
    ct_icmp_seconds: int = 30    # echo requests and their replies
    ct_flow_cache: bool = True   # the per-CPU flow cache in front of conntrack (off: the bench's comparison)

    def defines(self) -> list[str]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "pool6_base":
                out += [f"-DZT_POOL6_BASE_{i}=0x{(value >> (96 - 32 * i)) & 0xFFFFFFFF:08x}U" for i in range(4)]
            elif f.name == "pool4_base":
                out.append(f"-DZT_POOL4_BASE=0x{value:08x}U")
            else:
                out.append(f"-DZT_{f.name.upper()}={int(value)}")
        return out + [f"-DZT_POOL_BITS={POOL_BITS}"]

    def shortfalls(self, need: "Layout") -> list[str]:
        """What `need` asks for that this layout cannot hold."""
        out = []
        for f in fields(self):
            if f.name.startswith("ct_"):
                continue     # settings, not capacities
            if f.name in ("pool4_base", "pool6_base", "ethernet"):
                if getattr(self, f.name) != getattr(need, f.name):
                    out.append(f"{f.name} differs")
            elif getattr(need, f.name) > getattr(self, f.name):
                out.append(f"{f.name} {getattr(need, f.name)} > {getattr(self, f.name)}")
        return out

    def with_headroom(self) -> "Layout":
        """A layout for the program to load: what these tables need plus room to grow."""
        from .mirrors import FIRST_CHILD_NODE   # (mirrors needs numpy: the CLI reads POOL_BITS without it)

        return replace(
            self,
            max_rules=_headroom(self.max_rules, 64),
            max_nodes=_headroom(self.max_nodes, FIRST_CHILD_NODE * 2),
            max_classes=_headroom(self.max_classes, 64),
            max_port_tables=_headroom(self.max_port_tables, 64),
            max_services=_headroom(self.max_services, 64),
            # a rule added where others meet lengthens candidate lists: room for it, so that the
            # change fits the program in force (the walk stops at its first match). Few
            # services: room for many (1024 services x 64 candidates x 2 banks: 1 MiB; 50 rules
            # added on one destination fit), but never past what the verifier takes
            max_cands=max(self.max_cands, min(_headroom(self.max_cands, 64 if self.max_services <= 1024 else 8),
                                              CANDS_HEADROOM_MAX)),
            max_idents=_headroom(self.max_idents, 64),
            # powers of two: the kernel masks word indexes with them (the verifier needs a bound)
            who_words=_pow2(self.who_words, 1),
            sport_words=_pow2(self.sport_words, 1),
            max_src_hash=_headroom(self.max_src_hash, 64),
            name_words=_pow2(self.name_words, 1) if self.name_words else 0,   # 0: the lookup compiled out
            max_learned=_pow2(self.max_learned, 16384),   # learning writes in place: room for the table's bound
        )
