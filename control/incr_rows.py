"""Rows of the incremental build's tables that can be freed and given again (control/incremental.py).

A destination class is referenced by the trie's leaf slots that hold it, a port table by the
classes (tcp, udp) that use it, a service by port-table entries and classes (icmp, other).
A row whose count falls to zero in a change is free from the next change on: the bank that
change writes holds the build after this one, where nothing references it (the bank in force,
which may, is never written).
"""
from __future__ import annotations

import numpy as np

from dataplane.mirrors import CAND_CHAIN, FIRST_CHILD_NODE, NODE_FLAG, PORT_END, WHO_NEVER
from dataplane.tables import without_names


class RowsFull(Exception):
    """A table of the program has no free row left."""


class ChainTooLong(Exception):
    """A candidate list that even a chain of the program's most services cannot hold."""


class Refs:
    """Reference counts of one table's rows (COUNTS, by row, the table's capacity long), the
    rows in use (< n) and the free ones among them."""

    def __init__(self, name: str, counts: np.ndarray, n: int):
        self.name, self.counts, self.n = name, counts, n
        self.free = np.flatnonzero(counts[:n] == 0).tolist()
        self.dropped: set[int] = set()      # rows whose count fell in this change

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        if self.n >= len(self.counts):
            raise RowsFull(f"{self.name} {self.n + 1} > {len(self.counts)}")
        self.n += 1
        return self.n - 1

    def add(self, rows, k: int = 1) -> None:
        np.add.at(self.counts, np.asarray(rows, np.int64), k)

    def drop(self, rows, k: int = 1) -> None:
        rows = np.asarray(rows, np.int64)
        np.add.at(self.counts, rows, -k)
        self.dropped.update(rows.tolist())

    def unreferenced(self) -> list[int]:
        """The rows dropped to zero in this change (they become free with release())."""
        out = [r for r in self.dropped if self.counts[r] == 0]
        self.dropped = set()
        return out

    def release(self, rows: list[int]) -> None:
        self.free += rows


def class_refs(nodes: np.ndarray, n_nodes: int, capacity: int) -> np.ndarray:
    """Leaf slots per class id over the trie's nodes in use: the first strides and the nodes
    their slots lead to. (Not every node below N_NODES: one a change merged back into its
    parent keeps its old slots, but no slot points to it; control/incr_trie.py.)"""
    counts = np.zeros(capacity, np.int64)
    level = np.arange(min(FIRST_CHILD_NODE, n_nodes))
    while len(level):
        slots = nodes[level].ravel()
        ptr = (slots & NODE_FLAG) != 0
        counts += np.bincount(slots[~ptr], minlength=capacity)[:capacity]
        level = (slots[ptr] & np.uint32(NODE_FLAG - 1)).astype(np.int64)
    return counts


def table_refs(classes: np.ndarray, live: np.ndarray, capacity: int) -> np.ndarray:
    """Port-table references of the LIVE classes (tcp and udp)."""
    return np.bincount(classes["ports"][live].ravel(), minlength=capacity).astype(np.int64)[:capacity]


def service_refs(classes: np.ndarray, live_classes: np.ndarray, tables: np.ndarray, live_tables: np.ndarray,
                 capacity: int) -> np.ndarray:
    """Service references of the live port tables' entries and the live classes (icmp, other)."""
    lo, svc = tables[live_tables, 0, :], tables[live_tables, 1, :]
    used = svc[lo != PORT_END]
    refs = np.concatenate([used, classes["svc_icmp"][live_classes], classes["svc_other"][live_classes]])
    return np.bincount(refs, minlength=capacity).astype(np.int64)[:capacity]


def table_services(row: np.ndarray) -> np.ndarray:
    """The services a port table's entries reference (one per entry in use)."""
    return row[1][row[0] != PORT_END]


# ---------------------------------------------------------------------------------------------
# Services, chained when a list outgrows the program's width (ebpf/maps.h, "A chain")

def list_length(row: np.ndarray) -> int:
    """A compiled list's entries: up to its first unconditional one (every list ends there;
    what follows is padding, zeros that look like the default's entry)."""
    ends = np.flatnonzero((row["who"] == 0) & (row["sport"] == 0) & (row["name"] == 0))
    return int(ends[0]) + 1 if len(ends) else len(row)


def chain_entry(row: np.ndarray, next_service: int) -> None:
    """ROW (one CAND) says: the list goes on in service NEXT_SERVICE of this bank."""
    row["rule"], row["sport"] = next_service & 0xFFFF, next_service >> 16
    row["who"], row["action"], row["name"] = WHO_NEVER, CAND_CHAIN, 0


def chained_next(row: np.ndarray) -> int:
    """The service a row's list goes on in, or -1 when its last entry is no chain entry."""
    last = row[-1]
    return int(last["rule"]) | int(last["sport"]) << 16 if last["action"] == CAND_CHAIN else -1


def service_rows(services: np.ndarray, view: np.ndarray, dirty: set, ids: dict, refs: Refs, links: int,
                 names: int = 0) -> np.ndarray:
    """Each list of SERVICES ((n, cands) CAND) as a service id of VIEW (the bank's rows, the
    program's width): an equal row's, or new rows; a list longer than the width as a chain of
    up to LINKS services, each but the last ending in a chain entry, written from its end so
    that equal tails are shared too. IDS: row bytes -> id of the live rows; REFS counts a
    chain entry as one reference of the service it names. (Per row in Python: only the rows a
    change writes come here.) NAMES: in a program built for hostnames, where each row's copy
    without name candidates starts (every destination learned for no name walks it), else 0."""
    width = view.shape[1]
    out = np.empty(len(services), np.int64)
    for k in range(len(services)):
        row = services[k, :list_length(services[k])]
        if len(row) <= width:
            out[k] = _intern(row, view, dirty, ids, refs, names)[0]
            continue
        n = -(-(len(row) - 1) // (width - 1))
        if n > links:
            raise ChainTooLong(f"a candidate list of {len(row)} outgrows {links} chained services of {width}")
        at = (n - 1) * (width - 1)
        nxt = _intern(row[at:], view, dirty, ids, refs, names)[0]
        while at:
            at -= width - 1
            link = np.zeros(width, row.dtype)
            link[:width - 1] = row[at:at + width - 1]
            chain_entry(link[width - 1:], nxt)
            head, new = _intern(link, view, dirty, ids, refs, names)
            if new:                 # a new row: its chain entry references NXT (an old one did already)
                refs.add([nxt])
            nxt = head
        out[k] = nxt
    return out


def _intern(row: np.ndarray, view: np.ndarray, dirty: set, ids: dict, refs: Refs, names: int) -> tuple[int, bool]:
    """ROW's service id (an equal live row's, or a new row's, written with its copy without
    names when NAMES), and whether it is new."""
    padded = np.zeros(view.shape[1], view.dtype)
    padded[:len(row)] = row
    key = padded.tobytes()
    got = ids.get(key)
    if got is None:
        got = refs.take()
        view[got] = padded
        ids[key] = got
        dirty.add(got)
        if names:     # left zero, that copy would allow by default (fail open)
            view[names + got] = without_names(padded[None])[0]
            dirty.add(names + got)
        return got, True
    return got, False


def free_services(view: np.ndarray, ids: dict, refs: Refs) -> None:
    """The services no longer referenced after a change: free for the next ones, and the
    services their chains went on in with them when nothing else references those."""
    dead = refs.unreferenced()
    while dead:
        for s in dead:
            key = view[s].tobytes()
            if ids.get(key) == s:
                del ids[key]
        refs.release(dead)
        onward = [n for n in map(chained_next, view[dead]) if n >= 0]
        if not onward:
            break
        refs.drop(onward)
        dead = refs.unreferenced()
