"""The destination trie of a build, changed over one address range in place (control/incremental.py).

The trie is the compiler's (control/compiler.py _fill): per family a first level of 2^16 slots
(nodes V4_TOP.. or V6_TOP.., 256 slots each), then children of 256 slots. A slot holds a class
id, or NODE_FLAG | the child node that splits it. paint() gives every address of [lo, hi] the
class mapper(its class): slots wholly inside the range are mapped as they are (children of
such slots wholly), and a leaf slot the range cuts gets a child holding its class first. A
child whose slots end up all one class is merged back into its parent's slot (the compiler's
trie has no such child) and its node is free for later changes: a change never leaves nodes
behind that no slot points to (an address blocked, unblocked, the next one blocked...).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from dataplane.mirrors import NODE_FLAG, V4_TOP, V6_TOP


class TrieFull(Exception):
    """The change needs more trie nodes than the program holds."""


class Trie:
    """NODES: (capacity, 256) uint32, written in place (a bank not in force); N: nodes in use;
    REFS: the classes' reference counts (control/incr_rows.py), kept as slots change; FREE:
    nodes below N that no slot points to (given before new ones). dirty: the node rows written
    so far; freed: the nodes this change merged back (free from the next change on)."""

    def __init__(self, nodes: np.ndarray, n: int, refs, free: list = None):
        self.nodes = nodes
        self.n = n
        self.refs = refs
        self.free = free if free is not None else []
        self.dirty: set[int] = set()
        self.freed: list[int] = []

    def paint(self, family: int, lo: int, hi: int, mapper: Callable[[int], int]) -> None:
        top, span = (V4_TOP, 32) if family == 4 else (V6_TOP, 128)
        self._paint(self.nodes[top:top + 256].reshape(-1), top, 0, span, 16, lo, hi, mapper)

    def _paint(self, view: np.ndarray, row0: int, base: int, span: int, stride: int, lo: int, hi: int,
               mapper) -> None:
        """VIEW: 2^stride slots over [base, base + 2^span), in node rows row0, row0 + 1, ..."""
        slot_bits = span - stride
        size = 1 << slot_bits
        a, b = max(lo, base) - base, min(hi, base + (1 << span) - 1) - base
        if a > b:
            return
        s0, s1 = a >> slot_bits, b >> slot_bits
        full0 = s0 if a & (size - 1) == 0 else s0 + 1
        full1 = s1 if (b + 1) & (size - 1) == 0 else s1 - 1
        for s in sorted({s0, s1}):
            if not full0 <= s <= full1:
                self._into_child(view, row0, s, base + s * size, slot_bits, lo, hi, mapper)
        if full0 > full1:
            return
        seg = view[full0:full1 + 1]
        ptr = (seg & NODE_FLAG) != 0
        for s in (np.flatnonzero(ptr) + full0).tolist():
            child = int(view[s]) & ~NODE_FLAG
            self._paint(self.nodes[child], child, base + s * size, slot_bits, 8, lo, hi, mapper)
            self._merge(view, row0, s, child)
        leaves = np.flatnonzero(~ptr)
        if not len(leaves):
            return
        vals = seg[leaves]
        old, inverse = np.unique(vals, return_inverse=True)
        new = np.fromiter((mapper(int(x)) for x in old), np.uint32, len(old))
        if np.array_equal(new, old):
            return
        now = new[inverse]
        moved = now != vals
        changed = leaves[moved]
        seg[changed] = now[moved]
        self.refs.drop(vals[moved])
        self.refs.add(now[moved])
        self.dirty.update((row0 + (changed + full0) // 256).tolist())

    def _into_child(self, view: np.ndarray, row0: int, s: int, slot_base: int, slot_bits: int, lo: int, hi: int,
                    mapper) -> None:
        """Paint inside slot S, which the range only partly covers: its child, made if it has none."""
        value = int(view[s])
        if value & NODE_FLAG:
            child = value & ~NODE_FLAG
        elif self.free:
            child = self.free.pop()
        else:
            child = self.n
            if child >= len(self.nodes):
                raise TrieFull(f"trie nodes {child + 1} > {len(self.nodes)}")
            self.n += 1
        if not value & NODE_FLAG:
            self.nodes[child] = value
            self.refs.add([value], 255)      # its 256 slots, less the parent's slot
            self.dirty.add(child)
            view[s] = NODE_FLAG | child
            self.dirty.add(row0 + s // 256)
        self._paint(self.nodes[child], child, slot_base, slot_bits, 8, lo, hi, mapper)
        self._merge(view, row0, s, child)

    def _merge(self, view: np.ndarray, row0: int, s: int, child: int) -> None:
        """Slot S's CHILD holds one class in all its slots: the slot holds it instead."""
        row = self.nodes[child]
        first = int(row[0])
        if first & NODE_FLAG or int(row[255]) != first or not (row == first).all():   # (the ends first: cheap)
            return
        view[s] = first
        self.refs.add([first], -255)     # its 256 slots, less the parent's slot
        self.dirty.add(row0 + s // 256)
        self.freed.append(child)
