"""Rule changes without a whole compile: the build in force, changed where a rule change
touches it, written into the program's bank not in force (control/kernel.py flips it).

Ids are stable here, not positions: a rule's candidate id is given when the rule comes in
(enabled, added, moved: each a new id; given again only once no class holds it, so a class
or a service row that names an id means one rule while it lives) and candidate lists are
ordered by precedence, not by id. Who-tokens and source-port sets keep their numbers. A
change of rules R (old ids out, new ids in) then touches only:

- the destination trie over the intervals R's destinations cover (control/incr_trie.py): each
  class there maps to its set without the old ids and with the new ones that hold there
  (an existing class with that set, or a new class row: control/incr_dest.py);
- the new classes' port tables and services, computed by control/port_tables.py for those
  classes alone (services equal to existing rows reuse them);
- a new who-token's bit in the identity classes of the sources it names (control/incr_idents.py).

Only those rows are written, into the bank not in force. That bank holds the build before
the one in force, so the rows the last change wrote (and device changes wrote in force since)
are copied over from the bank in force first (`pending`). Rows no longer referenced are
free for the next changes (control/incr_rows.py), and so are trie nodes merged back into
their parent (control/incr_trie.py). In a program built for hostnames (a policy before had
them) each new service row is also written as its list without names, which every
destination learned for no name walks (ebpf/policy.h walk()). What a change makes on the
source side goes into a copy of the build's Sources until it is applied. When the program
has no room left, or a change is one this does not take (hostnames, a new source-port set or
source prefixes, sources changed, groups or the default changed, many rules at once),
NotIncremental says why and the caller compiles everything.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from dataplane.mirrors import CAND, CLASS
from dataplane.tables import SETTLE

from .compiler import ACTION_CODE, Tables, _no_collections
from .incr_dest import Destinations, NotIncremental, start_refs
from .incr_idents import IdentsFull, Members, SourceWrites, add_token, class_counts, copied
from .learned import Patterns
from .model import Identities, Policy, Rule

__all__ = ["Change", "Incremental", "NotIncremental"]
MAX_RULES_CHANGED = 16
ARRAYS = ("zt_pool4", "zt_pool6", "zt_idents", "zt_nodes", "zt_classes", "zt_port_tables", "zt_services", "zt_sport")


@dataclass
class Change:
    """A change staged into the bank not in force: the build's tables (rule names and
    sources; the arrays are the bank's) and the rows written, by map."""

    tables: Tables
    dirty: dict
    written: int
    seconds: float


class Incremental(Destinations):
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
        self.by_precedence = {r.precedence: i for i, r in self.rule_of.items()}
        if len(self.by_precedence) != len(self.rule_of):
            raise NotIncremental("two enabled rules share a precedence")
        self.facts = {i: (cands.rid_who[i], cands.rid_sport[i], cands.rid_action[i], cands.rid_protos[i])
                      for i in self.rule_of}
        self.next_id, self.free_ids = len(cands.rules) + 1, []
        self._rules_by_id: tuple = (None, {})
        self.who_ids = dict(cands.who_tokens.ids)
        self.n_who = len(cands.who_tokens.values)
        self.sport_ids = dict(cands.sport_sets.ids)
        self.sources = tables.sources
        self.rule_names = list(tables.rule_names)
        self.stats = dict(tables.stats)
        self.n_nodes, self.free_nodes = tables.need.max_nodes, []
        with _no_collections():
            self._start_rows(classes, len(tables.port_tables), len(tables.services))
            self.counts = class_counts(program, program.bank)       # sources per identity class
            self.members = Members(identities, policy.groups)        # who is in a principal
        self.pending = [{}, {}]
        pt = program.policy_tables
        self._copy_whole(pt.bank, 1 - pt.bank)
        program.learned.load(tables.learned, 1 - pt.bank)

    def _start_rows(self, classes, n_pt: int, n_svc: int) -> None:
        """Reference counts of the rows in force, and the keys of the live ones."""
        self.class_refs, self.table_refs, self.svc_refs = start_refs(self.program, self.n_nodes, len(classes.values),
                                                                     n_pt, n_svc)
        self.class_sets, self.class_ids = list(classes.values), dict(classes.ids)
        for k in self.class_refs.free:
            del self.class_ids[self.class_sets[k]]
        services = self.program.policy_tables.in_bank("zt_services").view(CAND)
        live = np.flatnonzero(self.svc_refs.counts[:n_svc] > 0).tolist()
        self.svc_ids = {services[i].tobytes(): i for i in live}

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
        self.identities, self.counts = identities, None
        self.members = Members(identities, self.policy.groups, self.members)

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

    def stage(self, policy: Policy, identities: Identities, forget, counted: Optional[list] = None) -> Change:
        """POLICY (the policy in force with some rules changed) into the bank not in force.
        COUNTED: the rule ids that bank's counters hold (None: read them)."""
        with _no_collections():
            return self._stage(policy, identities, forget, counted)

    def _stage(self, policy: Policy, identities: Identities, forget, counted: Optional[list]) -> Change:
        started = time.perf_counter()
        removed, added = self._diff(policy, identities, forget)
        pt = self.program.policy_tables
        bank = 1 - pt.bank
        self._sync(pt.bank, bank)
        self._clear_counters(bank, counted)
        dirty: dict = {}
        old_ids = set()
        for r in removed:
            cid = self.slot.pop(r.name)
            del self.by_precedence[r.precedence]
            old_ids.add(cid)
        new_ids = [self._admit(r, bank, dirty) for r in sorted(added, key=lambda r: r.precedence)]
        self.n_nodes, fresh = self._paint(bank, self.n_nodes, old_ids, new_ids, dirty)
        self._class_rows(fresh, bank, dirty)
        self._free_rows(bank)
        self.free_ids += sorted(old_ids)
        live = {"classes": self.class_refs, "port_tables": self.table_refs, "services": self.svc_refs}
        self.stats.update({k: refs.n - len(refs.free) for k, refs in live.items()},
                          rules=len(self.slot), nodes=self.n_nodes, who_tokens=self.n_who,
                          idents=len(self.sources.idents.values))
        tables = self._tables()
        written = sum(1 if rows is True else len(rows) for rows in dirty.values())
        return Change(tables, dirty, written, time.perf_counter() - started)

    def _clear_counters(self, bank: int, counted: Optional[list]) -> None:
        """BANK's rule counters start at zero (those of COUNTED only, when the caller knows)."""
        pt = self.program.policy_tables
        if counted is None:
            pt.clear_rule_stats(bank)
            return
        stats = self.program.bpf["zt_rule_stats"]
        per = stats.max_entries // pt.banks
        for rid in counted:
            stats.clearitem(ctypes.c_int(int(rid) + bank * per))

    def _diff(self, policy: Policy, identities: Identities, forget) -> tuple[list, list]:
        """The rules that leave (removed, disabled, changed) and come in (added, enabled, changed):
        the rule objects of one policy that are not the other's (a change replaces only the
        rules it touches), compared by name."""
        if forget:
            raise NotIncremental("tunnel addresses change hands")
        if identities is not self.identities:
            self._same_sources(identities)
        old_p = self.policy
        if policy.default_action != old_p.default_action or policy.groups != old_p.groups:
            raise NotIncremental("the default action or the policy's groups changed")
        before, after = self._by_id(old_p), self._by_id(policy)
        if len({r.name for r in policy.rules}) != len(policy.rules):   # (refused by validation; changes go by name)
            raise NotIncremental("two rules share a name")
        gone = {r.name: r for r in map(before.get, before.keys() - after.keys())}   # (set operations at C
        came = {r.name: r for r in map(after.get, after.keys() - before.keys())}    # speed: 10,000 rules)
        same = {n for n in gone.keys() & came.keys() if gone[n] == came[n]}   # (a policy parsed again: new objects)
        if len(gone) + len(came) - 2 * len(same) > MAX_RULES_CHANGED:
            raise NotIncremental(f"{len(gone) + len(came) - 2 * len(same)} rules changed")
        removed = [r for n, r in gone.items() if r.enabled and n not in same]
        added = [r for n, r in came.items() if r.enabled and n not in same]
        taken = {self.rule_of[self.slot[r.name]].precedence for r in removed}
        for r in added:
            holder = self.by_precedence.get(r.precedence)
            if holder is not None and r.precedence not in taken:
                raise NotIncremental(f"rule {r.name!r} takes precedence {r.precedence} of another rule")
        if len({r.precedence for r in added}) != len(added):
            raise NotIncremental("two rules share a precedence")
        self._admissible(added)
        return removed, added

    def _same_sources(self, identities: Identities) -> None:
        """IDENTITIES differ from those of the build in force only where no source entry
        changes (`user add`, a group membership of a user with no device: the gateway makes no
        kernel step for them): they become this state's. Else NotIncremental."""
        old = self.identities
        if identities.devices is not old.devices and identities.devices != old.devices:
            raise NotIncremental("the identities changed")
        a, b = old.users, identities.users
        pairs = [p for p in zip(a, b) if p[0] is not p[1]]     # users replaced in place, added at the end:
        if len(pairs) <= MAX_RULES_CHANGED:                    # a pass at C speed (50,000 users)
            changed = {u.key for p in pairs for u in p} | {u.key for u in a[len(b):] + b[len(a):]}
        else:
            gone, came = set(map(id, a)), set(map(id, b))
            changed = {u.key for u in a if id(u) not in came} | {u.key for u in b if id(u) not in gone}
        if changed and any(d.user in changed for d in identities.devices):
            raise NotIncremental("the identities changed")
        self.identities, self.members = identities, Members(identities, self.policy.groups)

    def _by_id(self, policy: Policy) -> dict:
        """id(rule) -> rule of POLICY (the last one's kept: the policy in force, next time)."""
        if self._rules_by_id[0] is not policy:
            self._rules_by_id = (policy, dict(zip(map(id, policy.rules), policy.rules)))
        return self._rules_by_id[1]

    def _admissible(self, added: list) -> None:
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
        if self.free_ids:
            cid = self.free_ids.pop(0)
            self.rule_names[cid - 1] = r.name
        else:
            cid = self.next_id
            if cid >= self.program.layout.max_rules:
                raise NotIncremental(f"rule ids {cid + 1} > {self.program.layout.max_rules}")
            self.next_id += 1
            self.rule_names.append(r.name)
        self.rule_of[cid], self.slot[r.name], self.by_precedence[r.precedence] = r, cid, cid
        self.facts[cid] = (who, sport, ACTION_CODE[r.action], frozenset(protos))
        return cid

    def _new_token(self, key, bank: int, dirty: dict) -> int:
        token = self.n_who + 1
        if token >= 0xFFFF:
            raise NotIncremental("who-tokens exhausted")
        pt = self.program.policy_tables
        if self.counts is None:
            self.counts = class_counts(self.program, pt.bank)
        writes = SourceWrites()
        self.sources = copied(self.sources)     # the build in force's stay as they are
        try:
            add_token(token, key[0], self.sources, self.members, self.program, bank, self.counts, writes)
        except IdentsFull as e:
            raise NotIncremental(str(e)) from None
        self.n_who = token
        self.who_ids[key] = token
        dirty.setdefault("zt_idents", set()).update(writes.idents)
        _write_sources(pt, writes.sources, bank, dirty)
        return token

    def _tables(self) -> Tables:
        """The Tables of the build staged: its rule names and sources (the arrays are the bank's)."""
        lay = self.program.layout
        need = replace(lay, max_rules=self.next_id, max_nodes=self.n_nodes, max_classes=self.class_refs.n,
                       max_port_tables=self.table_refs.n, max_services=self.svc_refs.n,
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
