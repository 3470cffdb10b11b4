"""Rule changes without a whole compile: the build in force, changed where a rule change
touches it, written into the program's bank not in force (control/kernel.py flips it).

Ids are stable here, not positions: a rule's candidate id is given when the rule comes in
(enabled, added, moved: each a new id, never reused until the next whole compile, so a
class or a service row that names an id means one rule forever) and candidate lists are
ordered by precedence, not by id. Who-tokens and source-port sets keep their numbers. A
change of rules R (old ids out, new ids in) then touches only:

- the destination trie over the intervals R's destinations cover (control/incr_trie.py): each
  class there maps to its set without the old ids and with the new ones that hold there
  (an existing class with that set, or a new class row);
- the new classes' port tables and services, computed by control/port_tables.py for those
  classes alone (services equal to existing rows reuse them);
- a new who-token's bit in the identity classes of the sources it names (control/incr_idents.py).

Only those rows are written, into the bank not in force. That bank holds the build before
the one in force, so the rows the last change wrote (and device changes wrote in force since)
are copied over from the bank in force first (`pending`). Rows no longer referenced are
left where they are; when the program has no room left, or a change is one this does not
take (hostnames, a new source-port set or source prefixes, identities or the default
changed, many rules at once), NotIncremental says why and the caller compiles everything.
"""
from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, replace

import numpy as np

from dataplane.mirrors import CAND, CLASS, PORT_END
from dataplane.tables import SETTLE

from .compiler import ACTION_CODE, Tables, _interval
from .incr_idents import IdentsFull, Members, SourceWrites, add_token, class_counts
from .incr_trie import Trie, TrieFull
from .learned import Patterns
from .model import Identities, Policy, Rule
from .port_tables import build_services, rule_facts

MAX_RULES_CHANGED = 16
FULL = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}
ARRAYS = ("zt_pool4", "zt_pool6", "zt_idents", "zt_nodes", "zt_classes", "zt_port_tables", "zt_services", "zt_sport")


class NotIncremental(Exception):
    """This change needs a whole compile; the message says why."""


@dataclass
class Change:
    """A change staged into the bank not in force: the build's tables (rule names and
    sources; the arrays are the bank's) and the rows written, by map."""

    tables: Tables
    dirty: dict
    written: int
    seconds: float


class Incremental:
    """The state of the build in force that changes need: made after a whole build is in force
    (its tables' basis and the program), kept by stage() and applied()."""

    def __init__(self, tables: Tables, policy: Policy, identities: Identities, program):
        if tables.basis is None:
            raise NotIncremental("the build keeps no basis")
        cands, classes = tables.basis
        if cands.name_tokens.values:
            raise NotIncremental("rules with hostnames")
        if program.policy_tables.banks != 2:
            raise NotIncremental("the program has one bank")
        self.program, self.policy, self.identities = program, policy, identities
        self.default = cands.default
        self.rule_of: dict[int, Rule] = dict(enumerate(cands.rules, start=1))
        self.slot = {r.name: i for i, r in self.rule_of.items()}
        self.facts = {i: (cands.rid_who[i], cands.rid_sport[i], cands.rid_action[i], cands.rid_protos[i])
                      for i in self.rule_of}
        self.next_id = len(cands.rules) + 1
        self.who_ids = dict(cands.who_tokens.ids)
        self.n_who = len(cands.who_tokens.values)
        self.sport_ids = dict(cands.sport_sets.ids)
        self.class_sets, self.class_ids = list(classes.values), dict(classes.ids)
        self.sources = tables.sources
        self.rule_names = list(tables.rule_names)
        self.counts = None                     # sources per identity class, made when first needed
        self.members = None                    # who is in a principal, made when first needed
        self.stats = dict(tables.stats)
        self.n_nodes, self.n_pt = tables.need.max_nodes, len(tables.port_tables)
        pt = program.policy_tables
        services = pt.in_bank("zt_services").view(CAND)
        self.n_svc = len(tables.services)
        self.svc_ids = {services[i].tobytes(): i for i in range(self.n_svc)}
        self.pending = [{}, {}]
        self._copy_whole(pt.bank, 1 - pt.bank)
        program.learned.load(tables.learned, 1 - pt.bank)

    # -----------------------------------------------------------------------------------------

    def _copy_whole(self, src: int, dst: int) -> None:
        """Make bank DST hold what bank SRC holds (after a whole build: DST held the one before)."""
        pt = self.program.policy_tables
        _settle(pt, dst)
        for name in ARRAYS:
            pt.in_bank(name, dst)[:] = pt.in_bank(name, src)
        pt._pooled[dst] = {}
        pt._write_hash(dict(pt._hashed[src]), dst)

    def _sync(self, src: int, dst: int) -> None:
        """Bank DST holds the build before SRC's: copy the rows written into SRC since."""
        pt = self.program.policy_tables
        _settle(pt, dst)
        for name, rows in self.pending[dst].items():
            if name == "zt_src_hash":
                pt._write_hash(dict(pt._hashed[src]), dst)
                continue
            idx = np.fromiter(rows, np.int64, len(rows))
            pt.in_bank(name, dst)[idx] = pt.in_bank(name, src)[idx]
        pt._pooled[dst] = {}
        self.pending[dst] = {}

    def devices_written(self, identities: Identities, entries: list, idents: range) -> None:
        """Kernel.stage_devices wrote these source entries and identity rows into the bank in
        force: the other bank needs them too, and the counts and members are stale."""
        pt = self.program.policy_tables
        pending = self.pending[1 - pt.bank]
        pending.setdefault("zt_idents", set()).update(idents)
        for addr, _, _ in entries:
            slot = pt._pool_slot(addr)
            if slot is None:
                pending["zt_src_hash"] = True
            else:
                pending.setdefault(slot[0], set()).add(slot[1])
        self.identities, self.counts, self.members = identities, None, None

    def applied(self, change: Change, policy: Policy, old_bank: int) -> None:
        """CHANGE is in force; OLD_BANK (in force before) lacks its rows."""
        self.policy = policy
        pending = self.pending[old_bank]
        for name, rows in change.dirty.items():
            if name == "zt_src_hash":
                pending[name] = True
            else:
                pending.setdefault(name, set()).update(rows)

    # -----------------------------------------------------------------------------------------

    def stage(self, policy: Policy, identities: Identities, forget) -> Change:
        """POLICY (the policy in force with some rules changed) into the bank not in force."""
        started = time.perf_counter()
        removed, added = self._diff(policy, identities, forget)
        pt = self.program.policy_tables
        bank = 1 - pt.bank
        self._sync(pt.bank, bank)
        pt.clear_rule_stats(bank)
        lay = self.program.layout
        dirty: dict = {}
        old_ids = {self.slot.pop(r.name) for r in removed}
        new_ids = []
        for r in sorted(added, key=lambda r: r.precedence):
            if self.next_id >= lay.max_rules:
                raise NotIncremental(f"rule ids {self.next_id + 1} > {lay.max_rules}")
            new_ids.append(self._admit(r, bank, dirty))
        trie = Trie(pt.in_bank("zt_nodes", bank).view(np.uint32), self.n_nodes)
        fresh: list = []
        try:
            for family in (4, 6):
                for lo, hi, here in self._intervals(family, old_ids, new_ids):
                    trie.paint(family, lo, hi, self._mapper(old_ids, here, fresh))
        except TrieFull as e:
            raise NotIncremental(str(e)) from None
        self.n_nodes = trie.n
        dirty["zt_nodes"] = trie.dirty
        self._class_rows(fresh, bank, dirty)
        self.stats.update(rules=len(self.slot), classes=len(self.class_sets), services=self.n_svc,
                          port_tables=self.n_pt, nodes=self.n_nodes, who_tokens=self.n_who,
                          idents=len(self.sources.idents.values))
        tables = self._tables()
        written = sum(1 if rows is True else len(rows) for rows in dirty.values())
        return Change(tables, dirty, written, time.perf_counter() - started)

    def _diff(self, policy: Policy, identities: Identities, forget) -> tuple[list, list]:
        """The rules that leave (removed, disabled, changed) and come in (added, enabled, changed)."""
        if forget:
            raise NotIncremental("tunnel addresses change hands")
        if identities is not self.identities:
            raise NotIncremental("the identities changed")
        old_p = self.policy
        if policy.default_action != old_p.default_action or policy.groups != old_p.groups:
            raise NotIncremental("the default action or the policy's groups changed")
        old = {r.name: r for r in old_p.rules if r.enabled}
        new = {r.name: r for r in policy.rules if r.enabled}
        removed = [r for n, r in old.items() if new.get(n) is not r and new.get(n) != r]
        added = [r for n, r in new.items() if old.get(n) is not r and old.get(n) != r]
        if len(removed) + len(added) > MAX_RULES_CHANGED:
            raise NotIncremental(f"{len(removed) + len(added)} rules changed")
        if len({r.precedence for r in new.values()}) != len(new):
            raise NotIncremental("two enabled rules share a precedence")
        fresh_tokens = 0
        for r in added:
            if r.dst_hostnames is not None:
                raise NotIncremental(f"rule {r.name!r} names hostnames")
            if r.src_ports is not None and _sport_key(r) not in self.sport_ids:
                raise NotIncremental(f"rule {r.name!r} has a new source-port set")
            if _who_key(r) is not None and _who_key(r) not in self.who_ids:
                if r.src_cidrs is not None:
                    raise NotIncremental(f"rule {r.name!r} has new source prefixes")
                fresh_tokens += 1
        if fresh_tokens > 1:
            raise NotIncremental("more than one new principal condition")
        return removed, added

    def _admit(self, r: Rule, bank: int, dirty: dict) -> int:
        """A new candidate id for rule R (and its who-token's bit, when it is new)."""
        key = _who_key(r)
        who = 0
        if key is not None:
            who = self.who_ids.get(key, 0)
            if not who:
                who = self._new_token(key, bank, dirty)
        protos = set(r.protocols) if r.protocols is not None else {"tcp", "udp", "icmp", "other"}
        if r.states_ports:
            protos &= {"tcp", "udp"}
        sport = self.sport_ids[_sport_key(r)] if r.src_ports is not None else 0
        cid = self.next_id
        self.next_id += 1
        self.rule_of[cid], self.slot[r.name] = r, cid
        self.facts[cid] = (who, sport, ACTION_CODE[r.action], frozenset(protos))
        self.rule_names.append(r.name)
        return cid

    def _new_token(self, key, bank: int, dirty: dict) -> int:
        token = self.n_who + 1
        if token >= 0xFFFF:
            raise NotIncremental("who-tokens exhausted")
        pt = self.program.policy_tables
        if self.counts is None:
            self.counts = class_counts(self.program, pt.bank)
        if self.members is None:
            self.members = Members(self.identities, self.policy.groups)
        writes = SourceWrites()
        try:
            add_token(token, key[0], self.sources, self.members, self.program, bank, self.counts, writes)
        except IdentsFull as e:
            raise NotIncremental(str(e)) from None
        self.n_who = token
        self.who_ids[key] = token
        dirty.setdefault("zt_idents", set()).update(writes.idents)
        _write_sources(pt, writes.sources, bank, dirty)
        return token

    # -----------------------------------------------------------------------------------------
    # destinations

    def _cover(self, cid: int, family: int) -> tuple[list, list]:
        r = self.rule_of[cid]
        cover = r.dst_cidrs if r.dst_cidrs is not None else (FULL[family],)
        return ([_interval(n) for n in cover if n.version == family],
                [_interval(n) for n in (r.dst_except or ()) if n.version == family])

    def _intervals(self, family: int, old_ids: set, new_ids: list):
        """The elementary intervals of the changed candidates' destinations, with the new
        candidates that hold each (in precedence order), where any changed one holds it."""
        span = 32 if family == 4 else 128
        covers = {c: self._cover(c, family) for c in list(old_ids) + new_ids}
        bounds = {0}
        for inc, exc in covers.values():
            for lo, hi in inc + exc:
                bounds.update((lo, hi + 1))
        points = sorted(b for b in bounds if b < 1 << span)

        def holds(c: int, x: int) -> bool:
            inc, exc = covers[c]
            return any(lo <= x <= hi for lo, hi in inc) and not any(lo <= x <= hi for lo, hi in exc)
        for i, lo in enumerate(points):
            hi = points[i + 1] - 1 if i + 1 < len(points) else (1 << span) - 1
            here = tuple(c for c in new_ids if holds(c, lo))
            if here or any(holds(c, lo) for c in old_ids):
                yield lo, hi, here

    def _mapper(self, old_ids: set, here: tuple, fresh: list):
        """Class id -> the class of its set without OLD_IDS and with HERE (new rows into FRESH)."""
        prec = self.rule_of

        def mapped(k: int) -> int:
            members = self.class_sets[k]
            kept = [c for c in members if c not in old_ids]
            key = tuple(sorted(kept + list(here), key=lambda c: prec[c].precedence)) if here else tuple(kept)
            if key == members:
                return k
            got = self.class_ids.get(key)
            if got is None:
                got = len(self.class_sets)
                if got >= self.program.layout.max_classes:
                    raise TrieFull(f"destination classes {got + 1} > {self.program.layout.max_classes}")
                self.class_sets.append(key)
                self.class_ids[key] = got
                fresh.append(got)
            return got
        return mapped

    def _class_rows(self, fresh: list, bank: int, dirty: dict) -> None:
        """The rows of the new classes, their port tables and services (control/port_tables.py
        on these classes alone, the candidates numbered locally in precedence order)."""
        if not fresh:
            return
        lay = self.program.layout
        union = sorted({c for k in fresh for c in self.class_sets[k]}, key=lambda c: self.rule_of[c].precedence)
        local = {c: i for i, c in enumerate(union, start=1)}
        f = [self.facts[c] for c in union]
        facts = rule_facts([self.rule_of[c] for c in union], [0] + [x[0] for x in f], [0] + [x[1] for x in f],
                           [0] + [x[2] for x in f], [()] + [x[3] for x in f], self.default,
                           rule=[0] + union, name=[0] * (len(union) + 1))
        st = build_services(facts, [tuple(local[c] for c in self.class_sets[k]) for k in fresh])
        if st.max_cands > lay.max_cands or st.port_slots > lay.port_slots:
            raise NotIncremental(f"candidates {st.max_cands} (of {lay.max_cands}) or port slots "
                                 f"{st.port_slots} (of {lay.port_slots}) outgrow the program")
        pt = self.program.policy_tables
        svc_map = self._service_rows(st.services, pt.in_bank("zt_services", bank).view(CAND),
                                     dirty.setdefault("zt_services", set()))
        tables = pt.in_bank("zt_port_tables", bank).view(np.uint32).reshape(-1, 2, lay.port_slots)
        if self.n_pt + len(st.port_tables) > len(tables):
            raise NotIncremental(f"port tables {self.n_pt + len(st.port_tables)} > {len(tables)}")
        rows = np.full((len(st.port_tables), 2, lay.port_slots), PORT_END, np.uint32)
        rows[:, 1, :] = 0
        rows[:, :, :st.port_slots] = st.port_tables
        used = rows[:, 0, :] != PORT_END
        rows[:, 1, :][used] = svc_map[rows[:, 1, :][used]]
        pt_first = self.n_pt
        tables[pt_first:pt_first + len(rows)] = rows
        self.n_pt += len(rows)
        dirty["zt_port_tables"] = set(range(pt_first, self.n_pt))
        classes = pt.in_bank("zt_classes", bank).view(CLASS)[:, 0]
        out = np.zeros(len(fresh), CLASS)
        out["ports"] = st.classes["ports"] + pt_first
        out["svc_icmp"] = svc_map[st.classes["svc_icmp"]]
        out["svc_other"] = svc_map[st.classes["svc_other"]]
        classes[fresh] = out
        dirty["zt_classes"] = set(fresh)

    def _service_rows(self, services: np.ndarray, view: np.ndarray, dirty: set) -> np.ndarray:
        """Each local service's row: an equal row's, or a new row in VIEW. (A per-row pass
        over services goes here: it sees only the rows this change writes.)"""
        width = view.shape[1]
        padded = np.zeros((len(services), width), CAND)
        padded[:, :services.shape[1]] = services
        out = np.empty(len(services), np.uint32)
        for k in range(len(services)):
            key = padded[k].tobytes()
            got = self.svc_ids.get(key)
            if got is None:
                got = self.n_svc
                if got >= len(view):
                    raise NotIncremental(f"services {got + 1} > {len(view)}")
                view[got] = padded[k]
                self.svc_ids[key] = got
                self.n_svc += 1
                dirty.add(got)
            out[k] = got
        return out

    def _tables(self) -> Tables:
        """The Tables of the build staged: its rule names and sources (the arrays are the bank's)."""
        lay = self.program.layout
        need = replace(lay, max_rules=self.next_id, max_nodes=self.n_nodes, max_classes=len(self.class_sets),
                       max_port_tables=self.n_pt, max_services=self.n_svc,
                       max_idents=len(self.sources.idents.values) + 1)
        empty = np.zeros(0, np.uint32)
        return Tables(need=need, rule_names=list(self.rule_names), pool4={}, pool6={}, src_hash={}, nodes=empty,
                      classes=np.zeros(0, CLASS), port_tables=empty, services=np.zeros(0, CAND), idents=empty,
                      sport=empty, sources=self.sources, stats=dict(self.stats), names=Patterns(()), learned={})


def _who_key(r: Rule):
    return (frozenset(r.principals), r.src_cidrs) if (r.principals or r.src_cidrs is not None) else None


def _sport_key(r: Rule):
    return tuple(sorted(set(r.src_ports)))


def _settle(pt, bank: int) -> None:
    """Packets that read BANK before it left force are done with it after SETTLE."""
    time.sleep(max(0.0, pt._left[bank] + SETTLE - time.perf_counter()))


def _write_sources(pt, entries: list, bank: int, dirty: dict) -> None:
    """(address, ident, device) source entries into BANK: pool words, or the hash."""
    for addr, ident, device in entries:
        slot = pt._pool_slot(addr)
        if slot is None:
            key = (addr.version, addr.packed.rjust(16, b"\0"))
            table = pt.bpf["zt_src_hash"]
            table[pt._hash_key(key[0], key[1], bank)] = table.Leaf(ident, device)
            pt._hashed[bank][key] = (ident, device)
            dirty["zt_src_hash"] = True
            continue
        pt.in_bank(slot[0], bank).view(np.uint64)[slot[1], 0] = ident | device << 32
        pt._pooled[bank].pop(slot[0], None)
        dirty.setdefault(slot[0], set()).add(slot[1])
