"""control/port_tables.py builds every class's services and port tables at once with numpy.
What it must build is defined by the plain sweep below (the compiler's own code before it was
vectorised): one sweep per (class, protocol) in port order, ids in first-seen order. The two
must agree exactly: the same class rows, port tables and services, the same ids."""
import ipaddress
from collections import Counter, defaultdict

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.compiler import ACTION_CODE, _Candidates, _destination_nodes, _Interner
from control.model import Policy, Principal, Rule
from control.port_tables import build_services, rule_facts
from dataplane.mirrors import CAND, CLASS, PORT_END

from tests.kernel.test_differential import identities, policies


class Sweeps:
    """The oracle: a service per matching-rule list, a port table per class and protocol."""

    def __init__(self, cands: _Candidates):
        self.c = cands
        self.services, self.services_cache = _Interner(), {}
        self.port_tables, self.port_cache = _Interner(), {}

    def service(self, rids) -> int:
        key = tuple(rids)
        if key not in self.services_cache:
            cands = []
            for rid in key:
                cands.append((rid, self.c.rid_who[rid], self.c.rid_sport[rid], self.c.rid_action[rid]))
                if not self.c.rid_who[rid] and not self.c.rid_sport[rid]:
                    break
            else:
                cands.append((0, 0, 0, self.c.default))
            self.services_cache[key] = self.services(tuple(cands))
        return self.services_cache[key]

    def port_table(self, rids, proto: str) -> int:
        key = tuple(r for r in rids if proto in self.c.rid_protos[r])
        if key not in self.port_cache:
            events = defaultdict(list)
            for rid in key:
                for lo, hi in (self.c.rules[rid - 1].dst_ports or ((0, 65535),)):
                    events[lo].append((rid, 1))
                    events[hi + 1].append((rid, -1))
            count: Counter = Counter()
            table = []
            for pos in sorted(events):
                if pos > 65535:
                    break
                for rid, d in events[pos]:
                    count[rid] += d
                    if not count[rid]:
                        del count[rid]
                svc = self.service(sorted(count))
                if not table or table[-1][1] != svc:
                    table.append((pos, svc))
            if not table or table[0][0] != 0:
                table.insert(0, (0, self.service(())))
            self.port_cache[key] = self.port_tables(tuple(table))
        return self.port_cache[key]

    def build(self, class_sets):
        classes = np.zeros(len(class_sets), CLASS)
        for cid, rids in enumerate(class_sets):
            classes[cid]["ports"] = (self.port_table(rids, "tcp"), self.port_table(rids, "udp"))
            classes[cid]["svc_icmp"] = self.service([r for r in rids if "icmp" in self.c.rid_protos[r]])
            classes[cid]["svc_other"] = self.service([r for r in rids if "other" in self.c.rid_protos[r]])
        tables = self.port_tables.values
        slots = max(8, 1 << (max(len(t) for t in tables) - 1).bit_length())
        pt = np.full((len(tables), 2, slots), PORT_END, np.uint32)
        pt[:, 1, :] = 0
        for i, table in enumerate(tables):
            lo, svc = zip(*table)
            pt[i, 0, :len(lo)] = lo
            pt[i, 1, :len(svc)] = svc
        services = np.zeros((len(self.services.values), max(map(len, self.services.values))), CAND)
        for i, cands in enumerate(self.services.values):
            for j, c in enumerate(cands):
                services[i, j] = c + (0,)
        return classes, pt, services


def check(policy: Policy) -> None:
    rules = policy.ordered_rules
    cands = _Candidates(rules, ACTION_CODE[policy.default_action])
    classes = _Interner()
    _destination_nodes(cands, classes)
    want_classes, want_pt, want_services = Sweeps(cands).build(classes.values)
    facts = rule_facts(rules, cands.rid_who, cands.rid_sport, cands.rid_action, cands.rid_protos, cands.default)
    got = build_services(facts, classes.values)
    assert np.array_equal(got.classes, want_classes)
    assert got.port_tables.shape == want_pt.shape and np.array_equal(got.port_tables, want_pt)
    assert got.port_slots == want_pt.shape[2]
    assert got.services.shape == want_services.shape and np.array_equal(got.services, want_services)
    assert got.max_cands == want_services.shape[1]


@st.composite
def drawn_policies(draw):
    return draw(policies(draw(identities())))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn_policies())
def test_vectorised_tables_equal_the_sweeps(policy):
    check(policy)


def test_long_lists_overlaps_and_cuts():
    """Lists longer than the packed word holds (up to 14 rules at a port), a rule's own
    overlapping and adjacent ranges, ranges reaching 65535, an unconditional rule in the
    middle (the cut) and one alone: the parts of the sweep a small policy seldom reaches."""
    net = (ipaddress.ip_network("10.0.0.0/8"),)
    who = (Principal("group", "dev"),)
    rules = [Rule(f"c{i}", 10 * i, "allow", principals=who, dst_cidrs=net, dst_ports=((i, 100 + i), (50, 60 + i)))
             for i in range(14)]
    rules += [Rule("mid", 7 * 10 + 5, "block", dst_cidrs=net, dst_ports=((55, 58),)),
              Rule("own", 200, "allow", principals=who, dst_ports=((0, 9), (10, 20), (15, 65535))),
              Rule("top", 300, "allow", principals=who, protocols=frozenset({"udp"}), dst_ports=((65535, 65535),)),
              Rule("any", 400, "block")]
    for default in ("allow", "block"):
        check(Policy(default, tuple(rules)))
    check(Policy("block", ()))
