"""Rows of the incremental build's tables that can be freed and given again (control/incremental.py).

A destination class is referenced by the trie's leaf slots that hold it, a port table by the
classes (tcp, udp) that use it, a service by port-table entries and classes (icmp, other).
A row whose count falls to zero in a change is free from the next change on: the bank that
change writes holds the build after this one, where nothing references it (the bank in force,
which may, is never written).
"""
from __future__ import annotations

import numpy as np

from dataplane.mirrors import NODE_FLAG, PORT_END


class RowsFull(Exception):
    """A table of the program has no free row left."""


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
    """Leaf slots per class id over the trie's nodes in use."""
    slots = nodes[:n_nodes].ravel()
    return np.bincount(slots[(slots & NODE_FLAG) == 0], minlength=capacity).astype(np.int64)[:capacity]


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
