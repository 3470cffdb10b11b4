"""The destination side of an incremental change (control/incremental.py): the classes over the
changed rules' destinations, and the new classes' port tables and services.

Class keys are candidate ids in precedence order. A candidate id names one rule with one
precedence for as long as the id lives, so a key (and a service row, which names ids) means
one thing; ids of rules that left are free again only once no class holds them (every class
over their destinations was mapped to one without them, and freed when no slot held it)."""
from __future__ import annotations

import ipaddress

import numpy as np

from dataplane.layout import chain_links
from dataplane.mirrors import CAND, CLASS, PORT_END

from .compiler import _interval
from .incr_rows import ChainTooLong, Refs, RowsFull, free_services, service_rows, table_services
from .incr_trie import Trie, TrieFull
from .port_tables import build_services, rule_facts

FULL = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}


class NotIncremental(Exception):
    """This change needs a whole compile; the message says why."""


class Destinations:
    """(A part of Incremental.) Needs: program, rule_of, facts, default, class_sets, class_ids,
    svc_ids, the Refs class_refs, table_refs, svc_refs, and free_nodes (trie nodes below n_nodes
    that no slot points to)."""

    def _paint(self, bank: int, n_nodes: int, old_ids: set, new_ids: list, dirty: dict) -> tuple[int, list]:
        """Map the classes over the changed candidates' destinations: the nodes in use after,
        and the classes made."""
        pt = self.program.policy_tables
        trie = Trie(pt.in_bank("zt_nodes", bank).view(np.uint32), n_nodes, self.class_refs, self.free_nodes)
        fresh: list = []
        try:
            for family in (4, 6):
                for lo, hi, here in self._intervals(family, old_ids, new_ids):
                    trie.paint(family, lo, hi, self._mapper(old_ids, here, fresh))
        except (RowsFull, TrieFull) as e:
            raise NotIncremental(str(e)) from None
        dirty["zt_nodes"] = trie.dirty
        self.free_nodes += trie.freed
        return trie.n, fresh

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
        rule_of = self.rule_of

        def mapped(k: int) -> int:
            members = self.class_sets[k]
            kept = [c for c in members if c not in old_ids]
            key = tuple(sorted(kept + list(here), key=lambda c: rule_of[c].precedence)) if here else tuple(kept)
            if key == members:
                return k
            got = self.class_ids.get(key)
            if got is None:
                got = self.class_refs.take()
                if got == len(self.class_sets):
                    self.class_sets.append(key)
                else:
                    self.class_sets[got] = key
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
        if st.port_slots > lay.port_slots:
            raise NotIncremental(f"port slots {st.port_slots} (of {lay.port_slots}) outgrow the program")
        pt = self.program.policy_tables
        try:        # lists longer than the program's width are chained (control/incr_rows.py)
            svc_map = service_rows(st.services, pt.in_bank("zt_services", bank).view(CAND),
                                   dirty.setdefault("zt_services", set()), self.svc_ids, self.svc_refs,
                                   chain_links(lay.max_cands), lay.max_services if lay.name_words else 0)
        except (RowsFull, ChainTooLong) as e:
            raise NotIncremental(str(e)) from None
        rows = np.full((len(st.port_tables), 2, lay.port_slots), PORT_END, np.uint32)
        rows[:, 1, :] = 0
        rows[:, :, :st.port_slots] = st.port_tables
        used = rows[:, 0, :] != PORT_END
        rows[:, 1, :][used] = svc_map[rows[:, 1, :][used]]
        self.svc_refs.add(rows[:, 1, :][used])
        try:
            at = np.array([self.table_refs.take() for _ in range(len(rows))], np.int64)
        except RowsFull as e:
            raise NotIncremental(str(e)) from None
        pt.in_bank("zt_port_tables", bank).view(np.uint32).reshape(-1, 2, lay.port_slots)[at] = rows
        dirty.setdefault("zt_port_tables", set()).update(at.tolist())
        out = np.zeros(len(fresh), CLASS)
        out["ports"] = at[st.classes["ports"]]
        out["svc_icmp"] = svc_map[st.classes["svc_icmp"]]
        out["svc_other"] = svc_map[st.classes["svc_other"]]
        self.table_refs.add(out["ports"].ravel())
        self.svc_refs.add(np.concatenate([out["svc_icmp"], out["svc_other"]]))
        pt.in_bank("zt_classes", bank).view(CLASS)[:, 0][fresh] = out
        dirty.setdefault("zt_classes", set()).update(fresh)

    def _free_rows(self, bank: int) -> None:
        """Rows no longer referenced after this change: free for the next ones (classes first,
        then what they referenced)."""
        pt = self.program.policy_tables
        lay = self.program.layout
        classes = pt.in_bank("zt_classes", bank).view(CLASS)[:, 0]
        tables = pt.in_bank("zt_port_tables", bank).view(np.uint32).reshape(-1, 2, lay.port_slots)
        services = pt.in_bank("zt_services", bank).view(CAND)
        dead = self.class_refs.unreferenced()
        for k in dead:
            key = self.class_sets[k]
            if self.class_ids.get(key) == k:
                del self.class_ids[key]
            self.table_refs.drop(classes[k]["ports"])
            self.svc_refs.drop([classes[k]["svc_icmp"], classes[k]["svc_other"]])
        self.class_refs.release(dead)
        dead = self.table_refs.unreferenced()
        for p in dead:
            self.svc_refs.drop(table_services(tables[p]))
        self.table_refs.release(dead)
        free_services(services, self.svc_ids, self.svc_refs)


def start_refs(program, n_nodes: int, n_classes: int, n_pt: int, n_svc: int):
    """The Refs of classes, port tables and services of the bank in force of PROGRAM."""
    from .incr_rows import class_refs, service_refs, table_refs

    lay, pt = program.layout, program.policy_tables
    classes = pt.in_bank("zt_classes").view(CLASS)[:, 0]
    tables = pt.in_bank("zt_port_tables").view(np.uint32).reshape(-1, 2, lay.port_slots)
    c = Refs("destination classes", class_refs(pt.in_bank("zt_nodes").view(np.uint32), n_nodes, lay.max_classes),
             n_classes)
    live_c = np.flatnonzero(c.counts[:n_classes] > 0)
    t = Refs("port tables", table_refs(classes, live_c, lay.max_port_tables), n_pt)
    live_t = np.flatnonzero(t.counts[:n_pt] > 0)
    s = Refs("services", service_refs(classes, live_c, tables, live_t, lay.max_services), n_svc)
    return c, t, s
