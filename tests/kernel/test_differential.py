"""The kernel agrees with the spec: hypothesis draws identities, policies and packets aimed at
the policies' own edges; the kernel's verdict, rule and reason must equal the reference's."""
import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.compiler import compile_policy
from dataplane.reasons import Reason
from control.model import ICMP, ICMPV6, TCP, UDP, Device, Identities, Packet, Policy, Principal, Rule, User
from control.packets import build_raw, fragment_of
from control.probe import kernel_verdicts, reference_verdicts
from control.reference import decide, later_fragment

from tests.programs import TEST_LAYOUT

GROUPS = ["dev", "ops", "staff", "Staff"]
# Prefixes that nest and overlap, in both families, so that classes have edges to test.
V4_NETS = ["10.0.0.0/8", "10.20.0.0/16", "10.20.0.0/24", "10.20.0.128/25", "10.20.0.10/32", "10.20.0.11/32",
           "10.20.1.0/24", "10.21.0.0/16", "10.255.255.255/32", "0.0.0.0/0", "10.20.0.0/23", "192.168.0.0/16",
           "100.96.0.0/12", "100.96.0.0/30"]
V6_NETS = ["fd20::/16", "fd20::/64", "fd20::/120", "fd20::10/128", "fd20:0:0:1::/64", "::/0", "fd00:5a::/108",
           "fd20::8000:0/97"]
PORT_EDGES = [0, 1, 21, 22, 23, 79, 80, 443, 1023, 1024, 8000, 8080, 32768, 65534, 65535]
DEV_V4 = ["100.96.0.2", "100.96.0.3", "100.96.0.4", "100.111.255.254", "10.99.0.1", "100.96.1.0"]
DEV_V6 = ["fd00:5a::2", "fd00:5a::3", "fd00:5a::f:ffff", "fd99::1", "fd00:5a::1:0"]

nets = st.sampled_from(V4_NETS + V6_NETS).map(ipaddress.ip_network)


@st.composite
def port_items(draw):
    lo = draw(st.sampled_from(PORT_EDGES))
    if draw(st.booleans()):
        return (lo, lo)
    hi = draw(st.sampled_from([p for p in PORT_EDGES if p >= lo]))
    return (lo, hi)


@st.composite
def identities(draw):
    users = [User(f"u{i}@example.com", tuple(draw(st.sets(st.sampled_from(GROUPS), max_size=3))))
             for i in range(draw(st.integers(1, 4)))]
    v4 = draw(st.lists(st.sampled_from(DEV_V4), min_size=1, max_size=5, unique=True))
    v6 = draw(st.lists(st.sampled_from(DEV_V6), min_size=len(v4), max_size=len(v4), unique=True)) \
        if len(v4) <= len(DEV_V6) else [None] * len(v4)
    devices = []
    for i, a4 in enumerate(v4):
        a6 = v6[i] if draw(st.booleans()) else None
        devices.append(Device(f"d{i}", draw(st.sampled_from(users)).key, ipaddress.IPv4Address(a4),
                              ipaddress.IPv6Address(a6) if a6 else None, None,
                              draw(st.sampled_from([True, True, True, False]))))
    return Identities(tuple(users), tuple(devices))


@st.composite
def policies(draw, ids: Identities):
    principal = st.one_of(
        st.sampled_from(ids.users).map(lambda u: Principal("user", u.key)),
        st.sampled_from(GROUPS + ["nobody"]).map(lambda g: Principal("group", g)),
        st.sampled_from([d.name for d in ids.devices] + ["ghost"]).map(lambda n: Principal("device", n)),
    )
    maybe = lambda s: st.one_of(st.none(), s)
    rules = []
    for i in range(draw(st.integers(0, 10))):
        protocols = draw(maybe(st.frozensets(st.sampled_from(["tcp", "udp", "icmp"]), max_size=3)))
        ports_ok = protocols is None or bool(protocols & {"tcp", "udp"})
        rules.append(Rule(
            name=f"r{i}", precedence=draw(st.integers(1, 1000)) * 100 + i,
            action=draw(st.sampled_from(["allow", "block"])), enabled=draw(st.sampled_from([True, True, True, False])),
            principals=tuple(draw(st.lists(principal, max_size=3))), protocols=protocols,
            src_cidrs=draw(maybe(st.lists(nets, min_size=1, max_size=2).map(tuple))) if draw(st.integers(0, 3)) == 0 else None,
            src_ports=draw(maybe(st.lists(port_items(), min_size=1, max_size=2).map(tuple))) if ports_ok and draw(st.integers(0, 2)) == 0 else None,
            dst_cidrs=draw(maybe(st.lists(nets, min_size=1, max_size=3).map(tuple))),
            dst_except=draw(maybe(st.lists(nets, min_size=1, max_size=2).map(tuple))) if draw(st.integers(0, 2)) == 0 else None,
            dst_ports=draw(maybe(st.lists(port_items(), min_size=1, max_size=3).map(tuple))) if ports_ok else None,
        ))
    local = {"oncall": tuple(u.key for u in draw(st.lists(st.sampled_from(ids.users), max_size=2)))}
    return Policy(draw(st.sampled_from(["allow", "block"])), tuple(rules), local if draw(st.booleans()) else {})


def _edges(ranges, top: int) -> list[int]:
    """Both ends of each range and their neighbours: where an off-by-one would show."""
    return sorted({x for lo, hi in ranges for x in (lo - 1, lo, hi, hi + 1) if 0 <= x <= top})


@st.composite
def packets(draw, ids: Identities, policy: Policy):
    """A packet aimed at one rule's own edges (its prefixes' ends, its port ranges' ends), or
    at the edges of all rules at once."""
    sources = [a for d in ids.devices for a in d.addresses] + [ipaddress.ip_address("100.96.0.99"),
                                                                ipaddress.ip_address("fd00:5a::99")]
    src = draw(st.sampled_from(sources))
    family = ipaddress.IPv4Address if src.version == 4 else ipaddress.IPv6Address
    aimed = list(policy.rules) if draw(st.booleans()) or not policy.rules else [draw(st.sampled_from(policy.rules))]
    prefixes = [n for r in aimed for n in (r.dst_cidrs or ()) + (r.dst_except or ()) if n.version == src.version]
    dst_edges = _edges([(int(n.network_address), int(n.broadcast_address)) for n in prefixes],
                       2 ** (32 if src.version == 4 else 128) - 1)
    dst = family(draw(st.sampled_from(dst_edges or [int(family("10.20.0.10" if src.version == 4 else "fd20::10"))])))
    proto = draw(st.sampled_from([TCP, TCP, TCP, UDP, UDP, ICMP, ICMPV6, 47, 59]))
    if proto not in (TCP, UDP):
        return Packet(src, dst, proto)
    dports = _edges([rng for r in aimed for rng in (r.dst_ports or ())] + [(0, 65535)], 65535)
    sports = _edges([rng for r in aimed for rng in (r.src_ports or ())] + [(0, 65535)], 65535)
    return Packet(src, dst, proto, draw(st.sampled_from(sports)), draw(st.sampled_from(dports)))


# IPv6 extension headers that may follow a Fragment header (in the fragmentable part): kind,
# and the length byte (destination options and routing: (n + 1) * 8 bytes; AH: (n + 2) * 4).
FRAGMENTABLE_EXT = st.lists(st.tuples(st.sampled_from([60, 43, 51]), st.integers(0, 3)), max_size=3)


def v6_fragment(src, dst, l4: bytes, proto: int, exts, offset: int, more: bool, nh=None, ident=7) -> bytes:
    """IPv6, a Fragment header (offset in 8-byte units), then EXTS and L4 as its fragmentable
    part; NH: the next header the Fragment header names (default: the first of that part)."""
    kinds = [k for k, _ in exts] + [proto]
    body = b"".join(bytes([kinds[i + 1], n]) + bytes((n + 2) * 4 - 2 if k == 51 else (n + 1) * 8 - 2)
                    for i, (k, n) in enumerate(exts))
    frag = bytes([kinds[0] if nh is None else nh, 0]) + ((offset << 3) | int(more)).to_bytes(2, "big") \
        + ident.to_bytes(4, "big")
    payload = frag + body + l4
    return (bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([44, 64]) + src.packed + dst.packed
            + payload)


@st.composite
def probes(draw, ids: Identities, policy: Policy):
    """A packet by fields, or, for IPv6 TCP and UDP, its bytes as a first fragment with extension
    headers in its fragmentable part, or as a later fragment after them."""
    pkt = draw(packets(ids, policy))
    if pkt.src.version == 4 or pkt.proto not in (TCP, UDP) or draw(st.integers(0, 3)):
        return pkt
    l4 = build_raw(pkt)[40:]
    exts = draw(FRAGMENTABLE_EXT)
    if draw(st.booleans()):
        return v6_fragment(pkt.src, pkt.dst, l4, pkt.proto, exts, 0, True)
    return v6_fragment(pkt.src, pkt.dst, l4, pkt.proto, exts, draw(st.integers(1, 8191)), draw(st.booleans()))


@st.composite
def cases(draw):
    ids = draw(identities())
    policy = draw(policies(ids))
    pkts = draw(st.lists(probes(ids, policy), min_size=20, max_size=40))
    return policy, ids, pkts


def check(program, policy, ids, pkts):
    tables = compile_policy(policy, ids, program.layout)
    program.load(tables)
    got = kernel_verdicts(program, tables, pkts)
    want = reference_verdicts(policy, ids, pkts)
    for pkt, g, w in zip(pkts, got, want):
        assert g == w, f"packet {pkt}: kernel {g}, reference {w}"


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_kernel_equals_reference(program, case):
    check(program, *case)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_ethernet_program_equals_reference(eth_program, case):
    check(eth_program, *case)


def test_packets_by_field_and_by_bytes_agree(program):
    """A packet given by fields and the same packet given as raw bytes get one verdict."""
    ids = Identities((User("a@example.com", ("dev",)),),
                     (Device("a", "a@example.com", ipaddress.IPv4Address("100.96.0.2")),))
    policy = Policy("block", (Rule("ssh", 10, "allow", principals=(Principal("group", "dev"),),
                                   dst_ports=((22, 22),)),))
    pkt = Packet(ipaddress.ip_address("100.96.0.2"), ipaddress.ip_address("10.20.0.10"), TCP, 40000, 22)
    tables = compile_policy(policy, ids, TEST_LAYOUT)
    program.load(tables)
    by_fields, by_bytes = kernel_verdicts(program, tables, [pkt, build_raw(pkt)])
    assert by_fields == by_bytes == decide(policy, ids, pkt).as_json() == \
        {"verdict": "allow", "rule": "ssh", "reason": "rule"}


def test_odd_word_counts_still_verify():
    """Compiled layouts get power-of-two word counts however many tokens a policy has."""
    from dataclasses import replace

    from dataplane.program import Program

    layout = replace(TEST_LAYOUT, who_words=3, sport_words=5).with_headroom()
    assert (layout.who_words, layout.sport_words) == (4, 8)
    with Program(layout) as program:
        assert program.fn.fd > 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(sport=st.integers(1024, 65535), dport=st.sampled_from([22, 23, 5353, 53]), proto=st.sampled_from([TCP, UDP]),
       exts=FRAGMENTABLE_EXT, offset=st.integers(1, 40), nh=st.sampled_from([None, 6, 17, 60, 43]))
def test_later_fragments_follow_as_the_reference_says(program, sport, dport, proto, exts, offset, nh):
    """A running gateway's fragments (conntrack, not a dry run): an IPv6 first fragment with
    extension headers after its Fragment header, then a later fragment at some offset that names
    some next header. The kernel follows, drops as an overlap, or leaves it a fragment exactly as
    the reference's later_fragment says."""
    from tests.app_policy import ANN6, APP6, IDS, POLICY
    src, dst = ipaddress.ip_address(ANN6), ipaddress.ip_address(APP6)
    pkt = Packet(src, dst, proto, sport, dport)
    first = v6_fragment(src, dst, build_raw(pkt)[40:], proto, exts, 0, True)
    later = v6_fragment(src, dst, b"\x00" * 24, proto, exts, offset, False, nh=nh if nh is not None else
                        ([k for k, _ in exts] + [proto])[0])
    program.load(compile_policy(POLICY, IDS, program.layout))
    program.clear_flows()
    with program.on_one_cpu() as cpu:
        got_first = program.run(first, cpu=cpu)
        got_later = program.run(later, cpu=cpu)
    want = decide(POLICY, IDS, first)
    assert got_first.verdict.label == want.verdict
    reason = later_fragment(fragment_of(first), want.verdict == "allow", fragment_of(later))
    assert got_later.reason == (reason or Reason.IPV6_FRAGMENT), (first.hex(), later.hex())
