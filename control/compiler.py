"""The policy compiler: the model in, the kernel's table contents out (see ebpf/README.md).

Its one job is to make the kernel agree with control/reference.py, at a per-packet cost that
does not grow with rules, users or devices. The work is done here, once per change:

  source address -> identity class   (who-bits: which rules' principal/source conditions hold)
  destination    -> destination class (multibit trie over the elementary address intervals)
  class, protocol, destination port  -> service (a sorted port table per class and protocol)
  service        -> candidate rules in precedence order, cut at the first unconditional one

The kernel walks a service's candidates and takes the first whose who-bit (and source-port
bit) is set. Everything the walk reads was decided here.
"""
from __future__ import annotations

import gc
import ipaddress
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

import numpy as np

from dataplane.layout import POOL_BITS, Layout
from dataplane.mirrors import CAND, FIRST_CHILD_NODE, IDENT_EXPIRED, NODE_FLAG, V4_TOP, V6_TOP

from .errors import InputError
from .learned import Patterns
from .model import Address, Device, Identities, Policy, Rule, User
from .port_tables import build_services, rule_facts

PROTO_CLASSES = ("tcp", "udp", "icmp", "other")
ACTION_CODE = {"allow": 0, "block": 1}   # == enum zt_verdict
U16_MAX = 0xFFFF
MAX_NAME_TOKENS = int(np.iinfo(CAND["name"]).max)   # zt_cand.name: token 0 is "no name condition"


@dataclass
class Tables:
    """Everything the kernel needs, in the kernel's layout. Built by compile_policy()."""

    need: Layout                           # the smallest layout that holds these tables
    rule_names: list[str]                  # rule id - 1 -> name
    pool4: dict[int, tuple[int, int]]      # pool offset -> (ident, device)
    pool6: dict[int, tuple[int, int]]
    src_hash: dict[tuple[int, bytes], tuple[int, int]]  # (family, 16-byte address) -> (ident, device)
    nodes: np.ndarray                      # (n, 256) uint32
    classes: np.ndarray                    # CLASS
    port_tables: np.ndarray                # (n, 2, port_slots) uint32: lo[], svc[]
    services: np.ndarray                   # (n, max_cands) CAND
    idents: np.ndarray                     # (n, who_words) uint64; row 0 = unknown
    sport: np.ndarray                      # (65536, sport_words) uint64
    sources: Optional["Sources"] = None    # source -> identity; kept for one-device updates
    stats: dict = field(default_factory=dict)
    names: Patterns = field(default_factory=lambda: Patterns(()))   # name token -> its rule's hostnames
    learned: dict = field(default_factory=dict)  # learned address -> name bits (zt_learned)
    block_names: int = 0                   # name bits of block rules: learning one can take an allow away
    basis: Optional[tuple] = None          # (candidates, class interner): what control/incremental.py starts from


def _interval(net) -> tuple[int, int]:
    lo = int(net.network_address)     # (broadcast_address is a slow cached property)
    return lo, lo | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)


class _Interner:
    """Gives equal values one id, in first-seen order, starting at `first`."""

    def __init__(self, first: int = 0):
        self.ids: dict = {}
        self.values: list = []
        self.first = first

    def __call__(self, value) -> int:
        got = self.ids.get(value)
        if got is None:
            got = self.ids[value] = len(self.values) + self.first
            self.values.append(value)
        return got


@contextmanager
def _no_collections():
    """The compile makes hundreds of thousands of small objects and keeps them: the cyclic
    collector would walk the whole deployment again and again for nothing (a tenth of the
    large compile). Reference counting still frees everything as usual."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def compile_policy(policy: Policy, identities: Identities, layout: Optional[Layout] = None,
                   learned: Optional[Mapping] = None) -> Tables:
    """Compile; `layout` gives the pools (and the ethernet flag) to compile for, when set;
    `learned`: address -> the names it was learned for now (control/learned.py)."""
    with _no_collections():
        return _compile(policy, identities, layout, learned or {})


def learned_bits(names: Patterns, learned: Mapping) -> dict:
    """Address -> name bits, for the addresses learned for a name some rule names."""
    out = {}
    for addr, held in learned.items():
        bits = names.bits(held)
        if bits:
            out[addr] = bits
    return out


def _compile(policy: Policy, identities: Identities, layout: Optional[Layout], learned: Mapping) -> Tables:
    base = layout or choose_pools(identities)
    rules = policy.ordered_rules
    if len(rules) >= U16_MAX:
        raise InputError(f"policy: {len(rules)} enabled rules; the data plane holds at most {U16_MAX - 1}")
    cands = _Candidates(rules, ACTION_CODE[policy.default_action])
    classes = _Interner()   # a destination class: the candidates (ids) whose destination holds it
    node_rows = _destination_nodes(cands, classes)

    facts = rule_facts(cands.rules, cands.rid_who, cands.rid_sport, cands.rid_action, cands.rid_protos, cands.default,
                       rule=cands.rid_rule, name=cands.rid_name)
    svc = build_services(facts, classes.values)

    # Source: who-bits per tunnel address, shared by addresses whose bits are equal.
    sources = Sources(policy, identities, cands.who_tokens.values, base)
    pool4, pool6, src_hash = sources.all_entries(identities)
    ident_rows = sources.ident_rows()
    sport, sport_words = _sport_bitmap(cands.sport_sets.values)
    names = Patterns(cands.name_tokens.values)
    learned_rows = learned_bits(names, learned)

    need = replace(
        base,
        max_rules=len(rules) + 1, max_nodes=len(node_rows), max_classes=len(classes.values),
        max_port_tables=len(svc.port_tables), port_slots=svc.port_slots,
        max_services=len(svc.services), max_cands=svc.max_cands, max_idents=len(ident_rows),
        who_words=sources.who_words, sport_words=sport_words, max_src_hash=len(src_hash),
        name_words=(len(cands.name_tokens.values) + 1 + 63) // 64 if cands.name_tokens.values else 0,
        max_learned=len(learned_rows),
    )
    return Tables(
        need=need, rule_names=[r.name for r in rules], pool4=pool4, pool6=pool6, src_hash=src_hash,
        nodes=np.stack(node_rows), classes=svc.classes, port_tables=svc.port_tables, services=svc.services,
        idents=ident_rows, sport=sport, sources=sources, names=names, learned=learned_rows,
        block_names=sum(1 << t for t, a in set(zip(cands.rid_name, cands.rid_action)) if t and a == ACTION_CODE["block"]),
        stats={"rules": len(rules), "who_tokens": len(cands.who_tokens.values), "classes": len(classes.values),
               "services": len(svc.services), "port_tables": len(svc.port_tables),
               "nodes": len(node_rows), "idents": len(ident_rows) - 1,
               "name_tokens": len(cands.name_tokens.values), "learned": len(learned_rows)},
        basis=(cands, classes),
    )


class _Candidates:
    """Per candidate id (1-based; 0: the default action): its rule id, its who-token
    (principals and source prefixes, a property of the source address), its source-port set,
    its name token (0: none), its action and the protocol classes it can match.
    control/port_tables.py builds the services and port tables from them.

    A rule is one candidate; a rule with hostnames is two, next to each other in precedence
    order: its prefixes (cidrs minus except, unconditional on names) and everything else
    outside except, on the condition that the destination was learned for one of its names
    (the name token: the rule's list of names). A destination class holds one of the two
    (_dst_intervals). Without hostnames, candidate ids are rule ids."""

    def __init__(self, rules: list, default: int):
        self.default = default
        self.rules: list[Rule] = []                  # per candidate id - 1
        self.named: dict[int, int] = {}              # name candidate id -> its rule's prefix candidate id
        self.who_tokens, self.sport_sets, self.name_tokens = _Interner(first=1), _Interner(first=1), _Interner(first=1)
        self.rid_rule, self.rid_who, self.rid_sport, self.rid_action, self.rid_protos = [0], [0], [0], [0], [()]
        self.rid_name = [0]
        for rid, r in enumerate(rules, start=1):
            has_who = bool(r.principals) or r.src_cidrs is not None
            who = self.who_tokens((frozenset(r.principals), r.src_cidrs)) if has_who else 0
            sport = self.sport_sets(tuple(sorted(set(r.src_ports)))) if r.src_ports is not None else 0
            protos = set(r.protocols) if r.protocols is not None else {"tcp", "udp", "icmp", "other"}
            if r.states_ports:
                protos &= {"tcp", "udp"}
            names = [0] if r.dst_hostnames is None else [0, self.name_tokens(tuple(sorted(set(r.dst_hostnames))))]
            for name in names:
                self.rules.append(r)
                if name:
                    self.named[len(self.rules)] = len(self.rules) - 1
                self.rid_rule.append(rid)
                self.rid_who.append(who)
                self.rid_sport.append(sport)
                self.rid_name.append(name)
                self.rid_action.append(ACTION_CODE[r.action])
                self.rid_protos.append(frozenset(protos))
        if len(self.who_tokens.values) >= U16_MAX or len(self.sport_sets.values) >= U16_MAX:
            raise InputError("policy: more than 65534 distinct principal or source-port conditions")
        if len(self.rules) >= U16_MAX:
            raise InputError(f"policy: {len(self.rules)} rule conditions (a rule with hostnames counts twice); "
                             f"the data plane holds at most {U16_MAX - 1}")
        if len(self.name_tokens.values) > MAX_NAME_TOKENS:
            raise InputError(f"policy: {len(self.name_tokens.values)} distinct destination.hostnames lists; "
                             f"the data plane holds at most {MAX_NAME_TOKENS}")


def _destination_nodes(cands: _Candidates, classes: _Interner) -> list[np.ndarray]:
    """Destination: the elementary intervals of every candidate's (cidrs minus except), per family."""
    node_rows: list[np.ndarray] = [np.zeros(256, np.uint32) for _ in range(FIRST_CHILD_NODE)]
    for family, top, span in ((4, V4_TOP, 32), (6, V6_TOP, 128)):
        bounds, cls = _dst_intervals(cands, family, span, classes)
        top_view = np.concatenate(node_rows[top:top + 256])
        _fill(top_view, 0, span, 16, 0, bounds, cls, node_rows)
        for i in range(256):
            node_rows[top + i] = top_view[i * 256:(i + 1) * 256]
    return node_rows


def _sport_bitmap(sport_sets: list) -> tuple[np.ndarray, int]:
    sport_words = max(1, (len(sport_sets) + 1 + 63) // 64)
    sport_bits = np.zeros((65536, sport_words * 64), bool)
    for sid, ranges in enumerate(sport_sets, start=1):
        for lo, hi in ranges:
            sport_bits[lo:hi + 1, sid] = True
    return np.packbits(sport_bits, axis=1, bitorder="little").view(np.uint64), sport_words


def _dst_intervals(cands: _Candidates, family: int, span: int, class_of):
    """Sorted interval starts and the class of each: the set of candidates whose destination
    (cidrs minus except; a name candidate: every address minus except) holds the whole
    interval, a rule's name candidate only where its prefix candidate does not hold."""
    full = ipaddress.ip_network("0.0.0.0/0" if family == 4 else "::/0")
    events = defaultdict(list)   # position -> [(rid, is_except, +1/-1)]
    for rid, r in enumerate(cands.rules, start=1):
        if rid in cands.named:
            cover = (full,)
        else:
            cover = r.dst_cidrs if r.dst_cidrs is not None else (() if r.dst_hostnames is not None else (full,))
        for nets, exc in ((cover, False), (r.dst_except or (), True)):
            for net in nets:
                if net.version != family:
                    continue
                lo, hi = _interval(net)
                events[lo].append((rid, exc, 1))
                events[hi + 1].append((rid, exc, -1))
    cover: dict[int, int] = {}
    excluded: dict[int, int] = {}
    members: set[int] = set()
    bounds, cls = [0], [class_of(())]
    end = 1 << span
    for pos in sorted(events):
        if pos >= end:
            break
        for rid, exc, d in events[pos]:
            counts = excluded if exc else cover
            counts[rid] = counts.get(rid, 0) + d
            if cover.get(rid, 0) > 0 and not excluded.get(rid, 0):
                members.add(rid)
            else:
                members.discard(rid)
        c = class_of(tuple(sorted(m for m in members if cands.named.get(m) not in members)))
        if pos == 0:
            cls[0] = c
        elif c != cls[-1]:
            bounds.append(pos)
            cls.append(c)
    return bounds, cls


def _fill(view: np.ndarray, base: int, span: int, stride: int, j: int, bounds, cls, nodes) -> None:
    """Fill one trie node (`view`, 2^stride slots covering [base, base + 2^span)).
    bounds[j] is the last interval start <= base. Slots cut by an interval start get a child."""
    slot_bits = span - stride
    size = 1 << slot_bits
    end = base + (1 << span)
    cur_slot, cur_class, k = 0, cls[j], j + 1
    while k < len(bounds) and bounds[k] < end:
        off = bounds[k] - base
        slot = off >> slot_bits
        view[cur_slot:slot] = cur_class
        if off & (size - 1) == 0:
            cur_slot, cur_class = slot, cls[k]
            k += 1
            continue
        child = np.zeros(256, np.uint32)
        node_id = len(nodes)
        nodes.append(child)
        slot_base = base + slot * size
        _fill(child, slot_base, slot_bits, 8, k - 1, bounds, cls, nodes)
        view[slot] = NODE_FLAG | node_id
        while k < len(bounds) and bounds[k] < slot_base + size:
            k += 1
        cur_slot, cur_class = slot + 1, cls[k - 1]
    view[cur_slot:] = cur_class


def choose_pools(identities: Identities) -> Layout:
    """Pools for a one-off compile (the probes): the 2^20-address blocks holding most devices."""
    best = Layout()
    blocks: dict[int, Counter] = {4: Counter(), 6: Counter()}
    for d in identities.devices:
        if d.enabled:
            for a in d.addresses:
                blocks[a.version][int(a) >> POOL_BITS] += 1
    for version, attr in ((4, "pool4_base"), (6, "pool6_base")):
        if blocks[version]:
            best = replace(best, **{attr: blocks[version].most_common(1)[0][0] << POOL_BITS})
    return best


class Sources:
    """Source address -> (identity class, device id): the who-bits of each tunnel address,
    interned into identity classes. Built by the full compile and kept by the gateway, which
    uses entries() to change one device or one user without compiling anything else."""

    def __init__(self, policy: Policy, identities: Identities, tokens: list, layout: Layout):
        self.layout = layout
        self.by_principal: dict[tuple[str, str], int] = defaultdict(int)
        self.any_principal = 0          # tokens with no principals (only source prefixes)
        self.src_conditional = 0        # tokens with source prefixes
        self.src_nets: dict[int, list] = {4: [], 6: []}   # (lo, hi, token bit)
        for t, (principals, src_cidrs) in enumerate(tokens, start=1):
            bit = 1 << t
            if not principals:
                self.any_principal |= bit
            for p in principals:
                self.by_principal[(p.kind, p.name)] |= bit
            if src_cidrs is not None:
                self.src_conditional |= bit
                for net in src_cidrs:
                    self.src_nets[net.version].append((*_interval(net), bit))
        self.who_words = max(1, (len(tokens) + 1 + 63) // 64)
        self.local_groups: dict[str, set[str]] = defaultdict(set)   # email -> the policy's groups
        for g, members in policy.groups.items():
            for email in members:
                self.local_groups[email].add(g)
        self.group_bits = {name: bits for (kind, name), bits in self.by_principal.items() if kind == "group"}
        self.idents = _Interner(first=1)                 # who-bits -> identity class id
        self.device_ids = {d.name: i for i, d in enumerate(identities.devices, start=1)}

    def user_bits(self, user: User) -> int:
        key = user.key
        bits = self.by_principal.get(("user", key), 0)
        group_bits = self.group_bits
        for g in user.all_groups:
            bits |= group_bits.get(g, 0)
        for g in self.local_groups.get(key, ()):
            bits |= group_bits.get(g, 0)
        return bits

    def _bits(self, user_bits: int, device: Device, src_ok: int) -> int:
        bits = user_bits | self.by_principal.get(("device", device.name), 0) | self.any_principal
        return bits & ~(self.src_conditional & ~src_ok)

    def place(self, addr: Address, entry: tuple[int, int], pool4: dict, pool6: dict, src_hash: dict) -> None:
        """Put an address's entry where the kernel looks for it: a pool slot or the hash."""
        pool, base = (pool4, self.layout.pool4_base) if addr.version == 4 else (pool6, self.layout.pool6_base)
        if int(addr) >> POOL_BITS << POOL_BITS == base:
            pool[int(addr) - base] = entry
        else:
            src_hash[(addr.version, addr.packed.rjust(16, b"\0"))] = entry

    def all_entries(self, identities: Identities):
        """Every enabled device's addresses, swept in one pass (the full compile): place()
        and _bits() address by address, the same identity classes in the same order, with
        the work done once per user where the device adds no bits of its own."""
        user_bits = {u.key: self.user_bits(u) for u in identities.users}
        devices = [d for d in identities.devices if d.enabled]
        src_ok = _source_bits([a for d in devices for a in d.addresses], self.src_nets) if self.src_conditional else {}
        pool4, pool6, src_hash = {}, {}, {}
        pools = {4: (pool4, self.layout.pool4_base), 6: (pool6, self.layout.pool6_base)}
        by_user: dict[str, int] = {}        # email -> identity class, for devices with no bits of their own
        now = time.time()
        for d in devices:
            extra = self.by_principal.get(("device", d.name), 0) | self.any_principal
            device = self.device_ids[d.name]
            if identities.session_expired(d, now):
                for addr in d.addresses:
                    self.place(addr, (IDENT_EXPIRED, device), pool4, pool6, src_hash)
                continue
            ident = None if extra or self.src_conditional else by_user.get(d.user)
            for addr in d.addresses:
                if ident is None or self.src_conditional:
                    ident = self.idents(self._bits(user_bits[d.user], d, src_ok.get(addr, 0)))
                    if not extra and not self.src_conditional:
                        by_user[d.user] = ident
                pool, base = pools[addr.version]
                number = int(addr)
                if number >> POOL_BITS << POOL_BITS == base:
                    pool[number - base] = (ident, device)
                else:
                    src_hash[(addr.version, addr.packed.rjust(16, b"\0"))] = (ident, device)
        return pool4, pool6, src_hash

    def entries(self, identities: Identities, devices: list[Device]) -> list[tuple[Address, int, int]]:
        """(address, ident, device id) for these devices as `identities` has them now; a
        disabled device's addresses get ident 0 (unknown). New devices get new ids, new
        bit patterns new identity classes (ident_row() gives their rows)."""
        out = []
        now = time.time()
        for d in devices:
            if d.name not in self.device_ids:
                self.device_ids[d.name] = len(self.device_ids) + 1
            if not d.enabled:
                out += [(a, 0, 0) for a in d.addresses]
                continue
            if identities.session_expired(d, now):   # its packets drop as session-expired
                out += [(a, IDENT_EXPIRED, self.device_ids[d.name]) for a in d.addresses]
                continue
            ub = self.user_bits(identities.user(d.user))
            for a in d.addresses:
                ok = 0
                for lo, hi, bit in self.src_nets[a.version]:
                    if lo <= int(a) <= hi:
                        ok |= bit
                out.append((a, self.idents(self._bits(ub, d, ok)), self.device_ids[d.name]))
        return out

    def ident_row(self, ident: int) -> np.ndarray:
        bits = self.idents.values[ident - 1]
        return np.frombuffer(bits.to_bytes(self.who_words * 8, "little"), np.uint64)

    def ident_rows(self) -> np.ndarray:
        rows = np.zeros((len(self.idents.values) + 1, self.who_words), np.uint64)
        for i in range(1, len(self.idents.values) + 1):
            rows[i] = self.ident_row(i)
        return rows

    @property
    def device_names(self) -> list[str]:
        return sorted(self.device_ids, key=self.device_ids.get)


def _source_bits(addresses, src_nets) -> dict:
    """For each address, the bits of the source-prefix tokens whose prefixes hold it (one sweep)."""
    out = {}
    for version in (4, 6):
        events = sorted([(lo, 1, bit) for lo, hi, bit in src_nets[version]] +
                        [(hi + 1, -1, bit) for lo, hi, bit in src_nets[version]])
        addrs = sorted(int(a) for a in addresses if a.version == version)
        count: Counter = Counter()
        bits, e = 0, 0
        for a in addrs:
            while e < len(events) and events[e][0] <= a:
                _, d, bit = events[e]
                count[bit] += d
                bits = bits | bit if count[bit] > 0 else bits & ~bit
                e += 1
            out[ipaddress.IPv6Address(a) if version == 6 else ipaddress.IPv4Address(a)] = bits
    return out
