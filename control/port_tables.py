"""Services and port tables of every destination class at once, with numpy.

What it builds is defined by one sweep per (class, protocol) in port order, which
tests/unit/test_port_tables.py keeps as the oracle: at each position where a rule's port
range starts or ends, the rules matching there (ascending ids = precedence order), cut after
the first unconditional one, are a service; a port table lists (first port, service) where
the service changes, and starts at port 0 (the empty service before the first range). Ids
are given in first-seen order (services and port tables both), in the order of the calls
the sweeps make: class by class, tcp table, udp table, icmp service, other service.

Here the sweeps of all distinct tables are array computations, a thousand tables a pass:
the tables' boundaries come out of one sort, each rule's port ranges become the runs of
boundaries they cover (the (boundary, rule) pairs), and each boundary's rule list is
described by values that equal lists share (_describe). The services are then numbered by
those values in the same first-seen order. The bench's large deployment (46,000 tables,
5 million boundaries) takes about a second this way; the sweeps in Python took eight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataplane.mirrors import CAND, CLASS, PORT_END

PROTO_BITS = {"tcp": 1, "udp": 2, "icmp": 4, "other": 8}
PORTS = 1 << 16
NO_RULE = 0xFFFF             # above every rule id (a policy holds fewer than 65535 rules)
ORDER_SHIFT = 17             # a row's place in the calls: call index << 17 | port (65536: after the sweep)
SWEEP_KEYS = 1024            # port-table keys swept per pass (see _sweep)
IDX = np.int32               # rule ids, ports and element indexes: half the memory of int64 (and so faster)


@dataclass
class RuleFacts:
    """Per rule id (index 0: the default action; with hostnames, per candidate id: see
    compiler._Candidates): what a service's candidates carry (the rule id, its who-token,
    source-port set, name token and action), whether the candidate is unconditional (no
    who-token, no source ports, no name: the walk stops there), the
    protocols it can match (PROTO_BITS) and its destination ports as merged ranges
    [seg_lo, seg_end) of segments seg_ptr[rid]:seg_ptr[rid + 1]."""

    who: np.ndarray
    sport: np.ndarray
    action: np.ndarray
    default: int
    uncond: np.ndarray
    protos: np.ndarray
    seg_ptr: np.ndarray
    seg_lo: np.ndarray
    seg_end: np.ndarray
    rule: np.ndarray
    name: np.ndarray


@dataclass
class ServiceTables:
    classes: np.ndarray          # CLASS per destination class
    port_tables: np.ndarray      # (n, 2, port_slots) uint32: lo[], svc[]
    port_slots: int
    services: np.ndarray         # (n, max_cands) CAND
    max_cands: int


def rule_facts(rules: list, who: list, sport: list, action: list, protos: list, default: int,
               rule: list = None, name: list = None) -> RuleFacts:
    """The arrays the sweeps read, from the compiler's per-rule-id lists (RULE: each id's rule
    id, default the id itself; NAME: its name token, default none)."""
    lo, end, ptr = [], [], [0, 0]          # rule id 0 (the default action) has no ports
    for r in rules:
        merged: list[list[int]] = []
        for a, b in sorted(r.dst_ports or ((0, 65535),)):
            if merged and a <= merged[-1][1]:      # overlapping or adjacent: one range
                merged[-1][1] = max(merged[-1][1], b + 1)
            else:
                merged.append([a, b + 1])
        lo += [a for a, _ in merged]
        end += [b for _, b in merged]
        ptr.append(len(lo))
    who_a, sport_a = np.array(who, IDX), np.array(sport, IDX)
    rule_a = np.array(rule, IDX) if rule is not None else np.arange(len(who), dtype=IDX)
    name_a = np.array(name, IDX) if name is not None else np.zeros(len(who), IDX)
    uncond = (who_a == 0) & (sport_a == 0) & (name_a == 0)
    uncond[0] = False
    bits = np.array([sum(PROTO_BITS[p] for p in ps) for ps in protos], np.uint8)
    return RuleFacts(who_a, sport_a, np.array(action, IDX), default, uncond, bits,
                     np.array(ptr, IDX), np.array(lo, IDX), np.array(end, IDX), rule_a, name_a)


def _runs(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs [starts[i], starts[i] + lengths[i]) laid end to end: for each element, the
    run it belongs to and its value. (Two running sums: np.repeat is slower at this.)"""
    ends = np.cumsum(lengths, dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    live = np.flatnonzero(lengths)
    at = ends[live] - lengths[live]
    step = np.zeros(total, IDX)
    step[at] = np.diff(live, prepend=0)
    inc = np.ones(total, IDX)
    last = starts[live] + lengths[live] - 1
    inc[at] = starts[live] - np.concatenate(([0], last[:-1]))
    return np.cumsum(step, dtype=IDX), np.cumsum(inc, dtype=IDX)


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values and, for each value, the index of its own among them."""
    order = np.argsort(values)
    ordered = values[order]
    new = np.concatenate(([True], ordered[1:] != ordered[:-1])) if len(values) else np.zeros(0, bool)
    inverse = np.empty(len(values), IDX)
    inverse[order] = np.cumsum(new, dtype=IDX) - 1
    return ordered[new], inverse


def _csr(sets: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, sets), IDX, len(sets))
    ptr = np.concatenate(([0], np.cumsum(lengths, dtype=IDX)))
    flat = np.fromiter((x for s in sets for x in s), IDX, int(ptr[-1]))
    return ptr, flat


def _filtered(ptr: np.ndarray, flat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR rows keeping only the masked elements."""
    kept = np.concatenate(([0], np.cumsum(mask, dtype=IDX)))
    return kept[ptr], flat[mask]


def build_services(facts: RuleFacts, class_sets: list[tuple]) -> ServiceTables:
    """The class rows, port tables and services for these destination classes (rule id tuples,
    in class id order)."""
    ptr, flat = _csr(class_sets)
    keys = _PortKeys(ptr, flat, facts)
    sweep = _sweep(keys, facts)
    rows = _Rows(sweep, keys, facts, ptr, flat)
    row_svc, lists = _intern(rows)
    services, max_cands = _pack_services(lists, facts)
    table_of_key, pt, port_slots = _port_tables(sweep, len(keys.calls), rows, row_svc)
    n = len(class_sets)
    classes = np.zeros(n, CLASS)
    classes["ports"] = table_of_key[keys.of_class]
    classes["svc_icmp"] = row_svc[rows.icmp_first:rows.icmp_first + n]
    classes["svc_other"] = row_svc[rows.icmp_first + n:rows.icmp_first + 2 * n]
    return ServiceTables(classes, pt, port_slots, services, max_cands)


class _PortKeys:
    """The distinct rule lists of the classes' tcp and udp port tables (a table's key), in the
    order the sweeps first meet them, with the call that first met each."""

    def __init__(self, ptr: np.ndarray, flat: np.ndarray, facts: RuleFacts):
        per_proto = [_filtered(ptr, flat, (facts.protos[flat] & PROTO_BITS[p]) != 0) for p in ("tcp", "udp")]
        per_proto = [(fptr.tolist(), frids) for fptr, frids in per_proto]   # read one by one below
        ids: dict[bytes, int] = {}
        calls, starts, lengths = [], [], []
        of_class = np.empty((len(ptr) - 1, 2), np.int64)
        offset = (0, len(per_proto[0][1]))          # where each protocol's rules sit in self.rids
        for c in range(len(ptr) - 1):
            for j, (fptr, frids) in enumerate(per_proto):
                a, b = fptr[c], fptr[c + 1]
                key = frids[a:b].tobytes()
                got = ids.get(key)
                if got is None:
                    got = ids[key] = len(calls)
                    calls.append(4 * c + j)
                    starts.append(offset[j] + a)
                    lengths.append(b - a)
                of_class[c, j] = got
        self.of_class = of_class
        self.rids = np.concatenate([frids for _, frids in per_proto])
        self.calls = np.array(calls, np.int64)
        self.starts, self.lengths = np.array(starts, IDX), np.array(lengths, IDX)


@dataclass
class _Described:
    """Rows' rule lists (ascending rule ids), described so that equal lists can be found:
    `count` rules; up to four of them packed in `word`, 16 bits each from the top; the rows
    with more (`long_rows`) have their lists in `long_lists`."""

    count: np.ndarray
    word: np.ndarray
    long_rows: np.ndarray
    long_lists: list

    @staticmethod
    def join(parts: list, offsets: list) -> "_Described":
        return _Described(np.concatenate([p.count for p in parts]), np.concatenate([p.word for p in parts]),
                          np.concatenate([p.long_rows + o for p, o in zip(parts, offsets)]),
                          [x for p in parts for x in p.long_lists])


def _describe(row: np.ndarray, rid: np.ndarray, n: int) -> _Described:
    """The lists of rows 0..n-1 from their (row, rule) pairs, in any order: a list of three
    or fewer is read off its smallest, largest and sum; longer ones are sorted."""
    count = np.bincount(row, minlength=n).astype(IDX)
    low = np.full(n, NO_RULE, IDX)
    np.minimum.at(low, row, rid)
    high = np.zeros(n, IDX)
    np.maximum.at(high, row, rid)
    size = count[row]
    middle = np.zeros(n, IDX)
    np.add.at(middle, row[size == 3], rid[size == 3])
    middle -= low + high
    word = np.zeros(n, np.uint64)
    for k, parts in ((1, (low,)), (2, (low, high)), (3, (low, middle, high))):
        at = np.flatnonzero(count == k)
        for i, part in enumerate(parts):
            word[at] |= part[at].astype(np.uint64) << np.uint64(48 - 16 * i)
    pairs = np.sort(row[size >= 4].astype(np.int64) << 16 | rid[size >= 4])
    p_row, p_rid = pairs >> 16, pairs & 0xFFFF
    new = np.ones(len(pairs), bool)
    new[1:] = p_row[1:] != p_row[:-1]
    index = np.arange(len(pairs))
    place = (index - np.maximum.accumulate(np.where(new, index, 0))).astype(np.uint64)
    four = count[p_row] == 4
    np.bitwise_or.at(word, p_row[four], p_rid[four].astype(np.uint64) << (np.uint64(48) - np.uint64(16) * place[four]))
    starts = np.flatnonzero(new & ~four)
    rids = p_rid.tolist()
    lists = [tuple(rids[a:a + count[p_row[a]]]) for a in starts.tolist()]
    return _Described(count, word, p_row[starts], lists)


@dataclass
class _Sweep:
    bounds: np.ndarray           # key << 16 | port, sorted: every key's boundaries
    key_first: np.ndarray        # per key: index of its first boundary (== next key's when none)
    lists: list                  # per boundary, in _Described parts: the rules its service lists

    def __post_init__(self):
        self.key_of_b = (self.bounds >> 16).astype(IDX)
        self.port_of_b = (self.bounds & 0xFFFF).astype(IDX)


def _sweep(keys: _PortKeys, facts: RuleFacts) -> _Sweep:
    """Every key's boundaries and, at each, the rules its service lists: SWEEP_KEYS keys at a
    time, so that each pass's arrays stay in the caches and reuse the last pass's memory (on
    this host, fresh pages cost as much as the arithmetic)."""
    wide = np.uint32 if len(keys.calls) < NO_RULE else np.int64    # room for (key + 1) << 16
    parts = [_sweep_keys(keys, facts, k, min(k + SWEEP_KEYS, len(keys.calls)), wide)
             for k in range(0, len(keys.calls), SWEEP_KEYS)]
    bounds = np.concatenate([bounds for bounds, _ in parts])
    key_first = np.searchsorted(bounds, np.arange(len(keys.calls) + 1).astype(wide) << wide(16))
    return _Sweep(bounds, key_first, [lists for _, lists in parts])


def _sweep_keys(keys: _PortKeys, facts: RuleFacts, k0: int, k1: int, wide):
    """The sweep of keys k0..k1-1: their boundaries and, at each, the rules matching there
    (the pairs of a boundary and a rule whose ports hold it) up to the first unconditional."""
    member_key, member = _runs(keys.starts[k0:k1], keys.lengths[k0:k1])
    rid = keys.rids[member]
    seg_rule, seg = _runs(facts.seg_ptr[rid], facts.seg_ptr[rid + 1] - facts.seg_ptr[rid])
    bounds, first_b, end_b = _boundaries(member_key[seg_rule], facts.seg_lo[seg], facts.seg_end[seg],
                                         k0, k1 - k0, wide)
    pair_seg, pair_b = _runs(first_b, end_b - first_b)
    pair_rid = rid[seg_rule][pair_seg]
    cut = np.full(len(bounds), NO_RULE, IDX)
    uncond = facts.uncond[pair_rid]
    np.minimum.at(cut, pair_b[uncond], pair_rid[uncond])
    kept = pair_rid <= cut[pair_b]
    return bounds, _describe(pair_b[kept], pair_rid[kept], len(bounds))


def _boundaries(key: np.ndarray, lo: np.ndarray, end: np.ndarray, k0: int, n_keys: int, wide):
    """The sorted distinct key << 16 | port where the segments [lo, end) of these keys (numbered
    from 0 here, from k0 in the result) start or end; each segment's first boundary and the one
    past its last. One sort, of (key, port, event number) words, so that each event learns its
    boundary's index; in segment order a member's ports ascend, and timsort takes such runs fast."""
    events = np.empty(2 * len(key), np.uint64)
    events[0::2], events[1::2] = lo, end
    events <<= np.uint64(32)
    events[0::2] |= key.astype(np.uint64) << np.uint64(48)
    events[1::2] |= key.astype(np.uint64) << np.uint64(48)
    events |= np.arange(len(events), dtype=np.uint64)
    real = np.ones(len(events), bool)
    real[1::2] = end < PORTS                   # an end at 65536 is the key's end, not a boundary
    events = np.sort(events[real], kind="stable")
    value = (events >> np.uint64(32)).astype(np.int64)
    new = np.ones(len(events), bool)
    new[1:] = value[1:] != value[:-1]
    index = np.empty(len(real), IDX)
    index[(events & np.uint64(0xFFFFFFFF)).astype(np.int64)] = np.cumsum(new, dtype=IDX) - 1
    bounds = (value[new] + (k0 << 16)).astype(wide)
    key_end = np.searchsorted(bounds, (np.arange(1, n_keys + 1) + k0).astype(wide) << wide(16)).astype(IDX)
    ends = index[1::2]
    ends[~real[1::2]] = key_end[key[~real[1::2]]]
    return bounds, index[0::2], ends


class _Rows:
    """Every service call of the sweeps as a row: a rule list and its place in the calls.
    Rows: the boundaries, then the leading empty service of each key that does not start at
    port 0 (added after its sweep), then each class's icmp and other services."""

    def __init__(self, sweep: _Sweep, keys: _PortKeys, facts: RuleFacts, ptr: np.ndarray, flat: np.ndarray):
        n_b = len(sweep.bounds)
        order = [np.take(keys.calls, sweep.key_of_b)]
        order[0] <<= ORDER_SHIFT
        order[0] |= sweep.port_of_b
        self.leading = _leading_keys(sweep, len(keys.calls))
        order.append(keys.calls[self.leading] << ORDER_SHIFT | PORTS)
        parts = sweep.lists + [_describe(np.zeros(0, IDX), np.zeros(0, IDX), len(self.leading))]
        self.icmp_first = n_b + len(self.leading)
        n_classes = len(ptr) - 1
        for j, proto in ((2, "icmp"), (3, "other")):
            fptr, frids = _filtered(ptr, flat, (facts.protos[flat] & PROTO_BITS[proto]) != 0)
            cls, _ = _runs(fptr[:-1], np.diff(fptr))
            cut = np.full(n_classes, NO_RULE, IDX)
            uncond = facts.uncond[frids]
            np.minimum.at(cut, cls[uncond], frids[uncond])
            kept = frids <= cut[cls]
            parts.append(_describe(cls[kept], frids[kept], n_classes))
            order.append((4 * np.arange(n_classes, dtype=np.int64) + j) << ORDER_SHIFT)
        self.order = np.concatenate(order)
        self.lists = _Described.join(parts, np.cumsum([0] + [len(p.count) for p in parts]).tolist())


def _leading_keys(sweep: _Sweep, n_keys: int) -> np.ndarray:
    """The keys whose sweep does not start at port 0: their tables get (0, the empty service) first."""
    has_b = sweep.key_first[1:] > sweep.key_first[:-1]
    starts_at_0 = np.zeros(n_keys, bool)
    starts_at_0[has_b] = (sweep.bounds[sweep.key_first[:-1][has_b]] & 0xFFFF) == 0
    return np.flatnonzero(~starts_at_0)


def _intern(rows: _Rows) -> tuple[np.ndarray, "_Lists"]:
    """Each row's service id (distinct rule lists numbered in first-seen order) and the rule
    lists of the services. A list's label: the empty one 0, one rule its id, two to four
    rules PORTS + the index of their word among the distinct words, longer ones after those."""
    d = rows.lists
    label = np.where(d.count == 1, d.word >> np.uint64(48), 0).astype(IDX)
    packed = np.flatnonzero((d.count >= 2) & (d.count <= 4))
    codes, inverse = _factorize(d.word[packed])
    label[packed] = PORTS + inverse
    ids: dict[tuple, int] = {}
    label[d.long_rows] = [PORTS + len(codes) + ids.setdefault(x, len(ids)) for x in d.long_lists]
    first = np.full(PORTS + len(codes) + len(ids), np.iinfo(np.int64).max)
    np.minimum.at(first, label, rows.order)
    used = np.flatnonzero(first < np.iinfo(np.int64).max)
    used = used[np.argsort(first[used])]
    svc_of_label = np.empty(len(first), IDX)
    svc_of_label[used] = np.arange(len(used))
    return svc_of_label[label], _Lists(used, codes, list(ids))


@dataclass
class _Lists:
    """The rule lists of the services, by their labels in service id order (see _intern)."""

    labels: np.ndarray
    codes: np.ndarray
    long: list

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(n, longest) rule ids, zero-padded, and each list's length."""
        width = max([4 if len(self.codes) else 1] + [len(x) for x in self.long])
        out = np.zeros((len(self.labels), width), IDX)
        single = self.labels < PORTS
        out[single, 0] = self.labels[single]
        n_codes = len(self.codes)
        packed = np.flatnonzero((self.labels >= PORTS) & (self.labels < PORTS + n_codes))
        words = self.codes[self.labels[packed] - PORTS]
        for i in range(4 if n_codes else 0):
            out[packed, i] = (words >> np.uint64(48 - 16 * i)) & np.uint64(0xFFFF)
        for row in np.flatnonzero(self.labels >= PORTS + n_codes).tolist():
            rules = self.long[self.labels[row] - PORTS - n_codes]
            out[row, :len(rules)] = rules
        lengths = (out != 0).sum(axis=1)
        return out[:, :max(1, int(lengths.max(initial=0)))], lengths


def _pack_services(lists: _Lists, facts: RuleFacts) -> tuple[np.ndarray, int]:
    """(n, max_cands) CAND: each list's rules, then the default action unless the last rule
    is unconditional. Padding is rule 0's zeros."""
    rules, lengths = lists.matrix()
    last = rules[np.arange(len(rules)), np.maximum(lengths - 1, 0)]     # 0 for the empty list
    closed = facts.uncond[last]
    max_cands = int((lengths + ~closed).max())
    out = np.zeros((len(rules), max_cands), CAND)
    width = rules.shape[1]
    out["rule"][:, :width] = facts.rule[rules]
    out["name"][:, :width] = facts.name[rules]
    out["who"][:, :width] = facts.who[rules]
    out["sport"][:, :width] = facts.sport[rules]
    out["action"][:, :width] = facts.action[rules]
    open_rows = np.flatnonzero(~closed)
    out["action"][open_rows, lengths[open_rows]] = facts.default
    return out, max_cands


def _port_tables(sweep: _Sweep, n_keys: int, rows: _Rows, row_svc: np.ndarray):
    """Each key's table id (equal tables one id, first-seen order) and the packed tables."""
    n_b = len(sweep.bounds)
    svc, key_of_b = row_svc[:n_b], sweep.key_of_b
    change = np.ones(n_b, bool)
    change[1:] = (svc[1:] != svc[:-1]) | (key_of_b[1:] != key_of_b[:-1])
    at = np.searchsorted(key_of_b[change], rows.leading)
    ent_key = np.insert(key_of_b[change], at, rows.leading)
    entries = np.empty((len(ent_key), 2), np.uint32)
    entries[:, 0] = np.insert(sweep.port_of_b[change], at, 0)
    entries[:, 1] = np.insert(svc[change], at, row_svc[n_b:n_b + len(rows.leading)])
    key_ptr = np.searchsorted(ent_key, np.arange(n_keys + 1))
    bounds = key_ptr.tolist()
    ids: dict[bytes, int] = {}
    table_of_key = np.empty(n_keys, np.int64)
    firsts = []
    for k in range(n_keys):
        got = table_of_key[k] = ids.setdefault(entries[bounds[k]:bounds[k + 1]].tobytes(), len(ids))
        if got == len(firsts):
            firsts.append(k)
    longest = int(np.diff(key_ptr).max())
    port_slots = max(8, 1 << (longest - 1).bit_length())
    pt = np.full((len(firsts), 2, port_slots), PORT_END, np.uint32)
    pt[:, 1, :] = 0
    # Every key's entries to its table's row (a repeated table's are the same: written twice).
    at = np.take(table_of_key.astype(IDX) * IDX(2 * port_slots) - key_ptr[:-1].astype(IDX), ent_key)
    at += np.arange(len(ent_key), dtype=IDX)
    flat = pt.reshape(-1)
    flat[at] = entries[:, 0]
    at += port_slots
    flat[at] = entries[:, 1]
    return table_of_key, pt, port_slots
