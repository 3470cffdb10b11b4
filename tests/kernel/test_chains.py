"""Candidate lists that outgrow the program's width, written in place as chains (ebpf/maps.h,
"A chain"; control/incr_rows.py): rules piled on one destination in a program of a small
width. After each change in place the kernel equals the reference on packets at the pile and
at the touched rule's edges and on random ones, a whole compile loaded fresh gives the same
verdicts, and the services' reference counts equal a recount of the bank (chains that shrink
give their services back). The bench's 50 adds on one destination stay in place at width 16;
a list past the chain's bound falls back; hostnames: both variants of a chained list walk as
the reference decides."""
import ipaddress
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.compiler import compile_policy
from control.incr_dest import start_refs
from control.incr_rows import Refs, chained_next, service_rows
from control.incremental import Incremental, NotIncremental
from control.model import TCP, UDP, Device, Identities, Packet, Policy, Principal, Rule, User
from control.probe import kernel_verdicts, reference_verdicts
from dataplane import mirrors
from dataplane.layout import WALK_CANDS, chain_links
from dataplane.mirrors import CAND, CAND_CHAIN, PORT_END
from dataplane.program import Program
from tests.kernel.test_banks import load_fresh
from tests.kernel.test_differential import GROUPS, identities, packets, policies
from tests.programs import TEST_LAYOUT

NARROW = replace(TEST_LAYOUT, max_rules=256, max_cands=8, who_words=2)     # 8 services of 8: 57 candidates
WIDE = replace(TEST_LAYOUT, max_rules=256, max_cands=64, who_words=2)      # a whole compile of any pile
PILE = ipaddress.ip_address("10.20.0.10")
PILE_NETS = [None, "10.20.0.10/32", "10.20.0.0/24", "10.0.0.0/8"]
PILE_PORTS = [None, ((443, 443),), ((400, 500),), ((443, 443), (8080, 8080))]
SPORT_SETS = [((1024, 65535),), ((0, 1023),), ((40000, 40000),)]


@pytest.fixture(scope="module")
def narrow():
    with Program(NARROW) as program:
        yield program


@pytest.fixture(scope="module")
def wide():
    with Program(WIDE) as program:
        yield program


def change(program, inc, policy, ids, number, whys: list):
    """POLICY in place when it can be (else a whole compile, its reason into WHYS, as
    control/kernel.py falls back). Returns the tables in force and the next state."""
    if inc is not None:
        try:
            staged = inc.stage(policy, ids, [])
        except NotIncremental as e:
            whys.append(str(e))
        else:
            old = program.bank
            program.flip(number)
            inc.applied(staged, policy, old)
            return staged.tables, inc
    tables = compile_policy(policy, ids, program.layout)
    program.stage(tables)
    program.flip(number)
    return tables, Incremental(tables, policy, ids, program)


def live_chains(inc) -> int:
    """Services in use in the bank in force whose list goes on in another."""
    view = inc.program.policy_tables.in_bank("zt_services").view(CAND)
    live = np.flatnonzero(inc.svc_refs.counts[:inc.svc_refs.n] > 0)
    return int((view[live, -1]["action"] == CAND_CHAIN).sum())


def check_counts(inc) -> None:
    """The services' reference counts are the bank's: port tables and classes in use, and the
    chain entries of the services in use (each walked once: one that several chains share,
    live only through them, would else count its own chain entry once per chain)."""
    n = inc.svc_refs.n
    _, _, refs = start_refs(inc.program, inc.n_nodes, inc.class_refs.n, inc.table_refs.n, n)
    counts = refs.counts.copy()
    view = inc.program.policy_tables.in_bank("zt_services").view(CAND)
    frontier = np.flatnonzero(counts[:n] > 0).tolist()
    while frontier:
        onward = [x for x in map(chained_next, view[frontier]) if x >= 0]
        frontier = sorted({x for x in onward if counts[x] == 0})
        np.add.at(counts, onward, 1)
    assert counts[:n].tolist() == inc.svc_refs.counts[:n].tolist()


def pile_probes(ids, policy) -> list:
    """From every device address to the pile and its neighbours, at the piled ports, from
    source ports on each side of the source-port sets' edges."""
    return [Packet(a, dst, proto, sport, dport) for d in ids.devices for a in d.addresses if a.version == 4
            for dst in (PILE, PILE + 1) for proto in (TCP, UDP) for sport in (1023, 40000) for dport in (443, 8080)]


def pile_length(policy: Policy) -> int:
    """The entries of the list of (PILE, tcp, 443): the rules that match there in precedence
    order, up to the first that always holds, and the default."""
    n = 1
    for r in policy.ordered_rules:
        if ((r.protocols is None or "tcp" in r.protocols) and (r.dst_cidrs is None or any(PILE in c for c in r.dst_cidrs))
                and not any(PILE in c for c in r.dst_except or ()) and r.dst_hostnames is None
                and (r.dst_ports is None or any(lo <= 443 <= hi for lo, hi in r.dst_ports))):
            if not r.principals and r.src_cidrs is None and r.src_ports is None:
                return n
            n += 1
    return n


@st.composite
def piled(draw, ids, name: str, precedence: int):
    """A rule on the pile's destination, nearly always with a who or source-port condition (so
    that the list is not cut there)."""
    principal = st.one_of(st.sampled_from(ids.users).map(lambda u: Principal("user", u.key)),
                          st.sampled_from(GROUPS).map(lambda g: Principal("group", g)),
                          st.sampled_from([d.name for d in ids.devices]).map(lambda n: Principal("device", n)))
    sport = draw(st.sampled_from([None, None] + SPORT_SETS))
    principals = tuple(draw(st.lists(principal, min_size=0 if sport else 1, max_size=2)))
    if draw(st.integers(0, 30)) == 0:
        principals, sport = (), None       # now and then one that always holds: the list is cut there
    net = draw(st.sampled_from(PILE_NETS))
    return Rule(name, precedence, draw(st.sampled_from(["allow", "block"])), principals=principals,
                protocols=draw(st.sampled_from([None, frozenset({"tcp"}), frozenset({"tcp", "udp"})])),
                src_ports=sport, dst_cidrs=(ipaddress.ip_network(net),) if net else None,
                dst_ports=draw(st.sampled_from(PILE_PORTS)))


@st.composite
def pile_cases(draw):
    """A policy (4 rules, and one per source-port set elsewhere: adds may name them in place), then
    20-45 rules added on the pile one by one, then most of them removed, disabled or moved."""
    ids = draw(identities())
    base = draw(policies(ids))
    seeds = tuple(Rule(f"sports-{i}", 900_000 + i * 10 + 5, "allow", src_ports=s, protocols=frozenset({"tcp"}),
                       dst_cidrs=(ipaddress.ip_network("192.168.0.0/16"),)) for i, s in enumerate(SPORT_SETS))
    kept = tuple(r for r in base.rules if r.principals)[:4]     # (its lists fit the width: it starts whole)
    policy = replace(base, rules=kept + seeds)
    n = draw(st.integers(16, 40))
    precedences = draw(st.lists(st.integers(1, 200_000), min_size=n, max_size=n, unique=True))
    rules, steps = list(policy.rules), []
    for i, p in enumerate(precedences):
        rule = draw(piled(ids, f"pile-{i}", 200_000 + p * 10 + 1))
        rules.append(rule)
        steps.append(("add", rule, replace(policy, rules=tuple(rules))))
    for i in draw(st.permutations(range(n)))[:draw(st.integers(n // 2, n))]:
        at = next(k for k, r in enumerate(rules) if r.name == f"pile-{i}")
        kind = draw(st.sampled_from(["remove", "remove", "disable", "move"]))
        rule = rules[at]
        if kind == "remove":
            del rules[at]
        else:
            rules[at] = rule = (replace(rule, enabled=False) if kind == "disable"
                                else replace(rule, precedence=rule.precedence + 3))
        steps.append((kind, rule, replace(policy, rules=tuple(rules))))
    probes = [draw(st.lists(packets(ids, replace(after, rules=(rule,))), min_size=3, max_size=5))
              + draw(st.lists(packets(ids, after), min_size=3, max_size=5)) for _, rule, after in steps]
    return ids, policy, steps, probes


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                HealthCheck.function_scoped_fixture])
@given(pile_cases())
def test_piled_rules_chain_in_place_and_equal_the_reference_and_a_whole_compile(narrow, wide, case):
    ids, policy, steps, probes = case
    tables = compile_policy(policy, ids, narrow.layout)
    narrow.load(tables)
    inc, whys, chained, longest = Incremental(tables, policy, ids, narrow), [], 0, 0
    for number, ((kind, rule, after), pkts) in enumerate(zip(steps, probes), narrow.build + 1):
        tables, inc = change(narrow, inc, after, ids, number, whys)
        assert whys == [], f"{kind} {rule}: {whys}"
        pkts = pile_probes(ids, after) + pkts
        got = kernel_verdicts(narrow, tables, pkts)
        assert got == reference_verdicts(after, ids, pkts), f"after {kind} {rule}"
        whole = compile_policy(after, ids, wide.layout)
        load_fresh(wide, whole)
        assert kernel_verdicts(wide, whole, pkts) == got, f"after {kind} {rule}"
        check_counts(inc)
        chained, longest = max(chained, live_chains(inc)), max(longest, pile_length(after))
    assert chained or longest <= NARROW.max_cands, "no list was chained"
    if not any(r.name.startswith("pile-") and r.enabled for r in after.rules):
        assert live_chains(inc) == 0                             # the piled rules gone: so are their chains


def test_the_benchs_fifty_adds_on_one_destination_stay_in_place_at_width_16():
    """scripts/benchchanges.py's rule changes at a layout like the large deployment's (16
    candidates a service, 4 chained services): 50 block rules naming one user each added on one
    destination and port, behind three candidates there, then each disabled, enabled, moved and
    removed. None falls back; the kernel equals the reference after each; the chains go with
    the rules."""
    users = tuple(User(f"u{i}@example.com", ()) for i in range(50))
    ids = Identities(users, tuple(Device(f"d{i}", u.key, ipaddress.ip_address("100.96.1.0") + i)
                                  for i, u in enumerate(users)))
    dst = ipaddress.ip_network("10.99.99.1/32")
    base = Policy("block", (
        Rule("g", 10, "allow", principals=(Principal("group", "dev"),), dst_cidrs=(dst,)),
        Rule("u0", 20, "allow", principals=(Principal("user", users[0].key),), protocols=frozenset({"tcp"})),
        Rule("s", 30, "allow", src_ports=((1024, 65535),), dst_ports=((443, 443),)),
        Rule("far", 40, "allow", dst_cidrs=(ipaddress.ip_network("10.1.0.0/16"),))))
    layout = replace(TEST_LAYOUT, max_rules=128, max_cands=16, who_words=1, max_idents=128)
    assert chain_links(layout.max_cands) == 4 and WALK_CANDS == mirrors.WALK_CANDS     # (layout's copy of the C's)
    probes = [Packet(a, ipaddress.ip_address("10.99.99.1"), TCP, sport, 443)
              for d in ids.devices for a in d.addresses for sport in (1000, 40000)]
    with Program(layout) as program:
        tables = compile_policy(base, ids, program.layout)
        program.load(tables)
        inc, whys, policy, chained = Incremental(tables, base, ids, program), [], base, 0
        for step in range(250):
            kind, i = ("add", "disable", "enable", "move", "remove")[step // 50], step % 50
            name = f"bench-{i}"
            if kind == "add":
                rules = policy.rules + (Rule(name, 1000 + i, "block", principals=(Principal("user", users[i].key),),
                                             protocols=frozenset({"tcp"}), dst_cidrs=(dst,), dst_ports=((443, 443),)),)
            elif kind == "remove":
                rules = tuple(r for r in policy.rules if r.name != name)
            else:
                rules = tuple((replace(r, enabled=kind == "enable") if kind != "move"
                               else replace(r, precedence=100_000 + i)) if r.name == name else r for r in policy.rules)
            policy = replace(policy, rules=rules)
            tables, inc = change(program, inc, policy, ids, program.build + 1, whys)
            assert whys == [], f"{kind} {name}: {whys}"
            some = probes if step % 10 == 9 else probes[2 * max(0, i - 2):2 * (i + 3)] + probes[-4:]   # (time)
            assert kernel_verdicts(program, tables, some) == reference_verdicts(policy, ids, some), f"{kind} {name}"
            chained = max(chained, live_chains(inc))
        check_counts(inc)
        assert chained == 3 and live_chains(inc) == 0


def test_a_list_past_the_chains_bound_falls_back(narrow):
    """At width 8 a chain holds 57 entries (8 services: 7 candidates and a chain entry each, 8
    in the last): 56 conditional rules on one point and the default. The 57th is no change in
    place, and says why (control/kernel.py then compiles the whole policy: a new program)."""
    users = tuple(User(f"v{i}@example.com", ()) for i in range(60))
    ids = Identities(users, tuple(Device(f"d{i}", u.key, ipaddress.ip_address("100.96.0.2") + i)
                                  for i, u in enumerate(users[:4])))
    policy = Policy("block", ())
    tables = compile_policy(policy, ids, narrow.layout)
    narrow.load(tables)
    inc = Incremental(tables, policy, ids, narrow)
    probes = [Packet(a, PILE, TCP, 40000, 443) for d in ids.devices for a in d.addresses]
    for i in range(60):
        rule = Rule(f"p{i}", 10 + i, "allow" if i % 3 else "block", principals=(Principal("user", users[i].key),))
        after = replace(policy, rules=policy.rules + (rule,))
        try:
            staged = inc.stage(after, ids, [])
        except NotIncremental as e:
            assert i == 56 and "a candidate list of 58 outgrows 8 chained services of 8" in str(e), (i, e)
            break
        old, policy = narrow.bank, after
        narrow.flip(narrow.build + 1)
        inc.applied(staged, policy, old)
        assert kernel_verdicts(narrow, staged.tables, probes) == reference_verdicts(policy, ids, probes)
    assert i == 56 and live_chains(inc) == 7


def _chained(tables, width: int):
    """TABLES with every list longer than WIDTH chained (control/incr_rows.py's writer), the
    port tables and classes naming the services it gave."""
    cap = 8 * len(tables.services)
    view = np.zeros((cap, width), CAND)
    refs = Refs("services", np.zeros(cap, np.int64), 0)
    svc = service_rows(tables.services, view, set(), {}, refs, chain_links(width))
    pt = tables.port_tables.copy()
    used = pt[:, 0, :] != PORT_END
    pt[:, 1, :][used] = svc[pt[:, 1, :][used]]
    classes = tables.classes.copy()
    for field in ("svc_icmp", "svc_other"):
        classes[field] = svc[classes[field]]
    return replace(tables, services=view[:refs.n], port_tables=pt, classes=classes,
                   need=replace(tables.need, max_cands=width, max_services=refs.n))


NAMES = ["git.corp.example", "x.db.corp.example", "wiki.corp.example"]


@st.composite
def named_piles(draw):
    """Rules piled on one destination, some by hostname (some by hostname only), with who and
    source-port conditions, and the names the pile was learned for (maybe none)."""
    ids = draw(identities())
    rules = [replace(draw(piled(ids, f"pile-{i}", 10 + i)),
                     dst_hostnames=draw(st.sampled_from([None, None, ("git.corp.example",), ("*.db.corp.example",),
                                                         ("*.corp.example", "wiki.corp.example")])))
             for i in range(draw(st.integers(12, 40)))]
    rules = [replace(r, dst_cidrs=None) if r.dst_hostnames and draw(st.booleans()) else r for r in rules]
    learned = {PILE: frozenset(draw(st.sets(st.sampled_from(NAMES), max_size=2)))}
    return ids, Policy(draw(st.sampled_from(["allow", "block"])), tuple(rules)), learned


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(named_piles())
def test_chained_lists_with_hostnames_walk_both_variants_as_the_reference(named, case):
    """A whole compile's lists chained at width 8 (the writer the changes in place use), in a
    build with hostnames: a destination learned for a name walks the lists as compiled, one
    learned for none (or another address) the lists without their name candidates."""
    ids, policy, learned = case
    tables = _chained(compile_policy(policy, ids, named.layout, learned if learned[PILE] else {}), 8)
    named.load(tables)
    pkts = pile_probes(ids, policy)
    assert kernel_verdicts(named, tables, pkts, learned=learned) == reference_verdicts(policy, ids, pkts, learned)


@pytest.fixture(scope="module")
def named():
    with Program(replace(TEST_LAYOUT, max_cands=8, who_words=2, name_words=1)) as program:
        yield program


def test_a_class_left_only_in_a_node_merged_back_is_not_counted(narrow):
    """A rule on one address splits its /24's slot into child nodes; removed, they merge back
    into the slot and are free, keeping their old slots (control/incr_trie.py); a rule over the
    /8 then maps that /24's class to another, and the class is dead. A recount of the bank
    (start_refs) counts the slots of nodes in use only: the classes' and services' counts equal
    the tracked ones, and the kernel the reference."""
    users = tuple(User(f"w{i}@example.com", ()) for i in range(3))
    ids = Identities(users, tuple(Device(f"d{i}", u.key, ipaddress.ip_address("100.96.2.0") + i)
                                  for i, u in enumerate(users)))
    who = [(Principal("user", u.key),) for u in users]
    base = Policy("block", (Rule("a", 10, "allow", principals=who[0], dst_cidrs=(ipaddress.ip_network("10.20.0.0/24"),)),))
    steps = [base.rules + (Rule("b", 20, "allow", principals=who[1], dst_cidrs=(ipaddress.ip_network("10.20.0.10/32"),)),),
             base.rules,
             base.rules + (Rule("c", 5, "block", principals=who[2], dst_cidrs=(ipaddress.ip_network("10.0.0.0/8"),)),)]
    probes = [Packet(a, ipaddress.ip_address(x), TCP, 40000, 443) for d in ids.devices for a in d.addresses
              for x in ("10.20.0.10", "10.20.0.11", "10.20.1.1", "10.1.1.1")]
    tables = compile_policy(base, ids, narrow.layout)
    narrow.load(tables)
    inc, whys = Incremental(tables, base, ids, narrow), []
    for rules in steps:
        policy = replace(base, rules=rules)
        tables, inc = change(narrow, inc, policy, ids, narrow.build + 1, whys)
        assert whys == []
        assert kernel_verdicts(narrow, tables, probes) == reference_verdicts(policy, ids, probes)
        classes, _, _ = start_refs(inc.program, inc.n_nodes, inc.class_refs.n, inc.table_refs.n, inc.svc_refs.n)
        assert classes.counts.tolist() == inc.class_refs.counts.tolist()
        check_counts(inc)
    assert inc.free_nodes, "no node was merged back"


def test_a_chain_tail_two_lists_share_counts_its_own_chain_entry_once(narrow):
    """Two lists of 17 entries at width 8 (a chain of 3 services) that differ in their first 7
    (7 rules at port 443, 7 at 8080) and share the rest (9 rules at both, the default):
    their heads differ and chain to one shared middle link, live only through them, which
    chains to the shared tail. The tail has one reference (the middle's chain entry): the
    recount walks the middle once, however many chains reach it. Then the 14 rules that made
    the heads differ are removed. The kernel equals the reference after each change."""
    users = tuple(User(f"t{i}@example.com", ()) for i in range(23))
    ids = Identities(users, tuple(Device(f"d{i}", u.key, ipaddress.ip_address("100.96.3.0") + i)
                                  for i, u in enumerate(users[:3])))
    ports = [((443, 443),)] * 7 + [((8080, 8080),)] * 7 + [((443, 443), (8080, 8080))] * 9
    policy = Policy("block", ())
    tables = compile_policy(policy, ids, narrow.layout)
    narrow.load(tables)
    inc, whys = Incremental(tables, policy, ids, narrow), []
    probes = [Packet(a, PILE, TCP, 40000, p) for d in ids.devices for a in d.addresses for p in (443, 8080, 22)]
    for i, dports in enumerate(ports):
        rule = Rule(f"t{i}", 10 + i, "allow" if i % 2 else "block", principals=(Principal("user", users[i].key),),
                    protocols=frozenset({"tcp"}), dst_cidrs=(ipaddress.ip_network("10.20.0.0/24"),), dst_ports=dports)
        policy = replace(policy, rules=policy.rules + (rule,))
        tables, inc = change(narrow, inc, policy, ids, narrow.build + 1, whys)
        assert whys == [], whys
        assert kernel_verdicts(narrow, tables, probes) == reference_verdicts(policy, ids, probes), rule.name
        check_counts(inc)
    assert live_chains(inc) >= 3
    for i in range(14):     # the heads go, one list at a time: the shared links with the last of them
        policy = replace(policy, rules=tuple(r for r in policy.rules if r.name != f"t{i}"))
        tables, inc = change(narrow, inc, policy, ids, narrow.build + 1, whys)
        assert whys == [], whys
        assert kernel_verdicts(narrow, tables, probes) == reference_verdicts(policy, ids, probes), f"-t{i}"
        check_counts(inc)
    assert live_chains(inc) == 1                             # both ports' list of 10: one head, one tail
