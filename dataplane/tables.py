"""The policy's maps of one build (dataplane/program.py's POLICY_MAPS), written from compiled
tables (control/compiler.py's Tables): whole when a build is loaded, or entry by entry on a
live gateway. The big arrays are mmapped: one memory copy fills each."""
from __future__ import annotations

import ctypes
import ipaddress
import mmap
from typing import Iterable, Optional, Union

import numpy as np

from .errors import TablesDoNotFit
from .layout import POOL_BITS, Layout
from .mirrors import IDENT_EXPIRED, PORT_END, SRC_KEY

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class PolicyTables:
    """The policy maps of a loaded program (bcc's BPF object), compiled for LAYOUT."""

    def __init__(self, bpf, layout: Layout):
        self.bpf = bpf
        self.layout = layout
        self._maps: dict[str, mmap.mmap] = {}

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()

    def array(self, name: str) -> np.ndarray:
        """A writable byte view of an mmapable array map: (max_entries, value stride)."""
        table = self.bpf[name]
        stride = (ctypes.sizeof(table.Leaf) + 7) & ~7
        entries = table.max_entries
        mm = self._maps.get(name)
        if mm is None:
            size = (stride * entries + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
            mm = self._maps[name] = mmap.mmap(table.get_fd(), size, mmap.MAP_SHARED,
                                               mmap.PROT_READ | mmap.PROT_WRITE)
        return np.frombuffer(mm, np.uint8, stride * entries).reshape(entries, stride)

    def _write(self, name: str, rows: np.ndarray) -> None:
        view = self.array(name)
        flat = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
        view[len(rows):] = 0
        view[:len(rows), :flat.shape[1]] = flat

    def load(self, tables) -> None:
        """Make the maps hold `tables` (from control.compiler), and the rule counters start at
        zero. The tables must fit the layout."""
        lay = self.layout
        short = lay.shortfalls(tables.need)
        if short:
            raise TablesDoNotFit(short)
        for name, entries in (("zt_pool4", tables.pool4), ("zt_pool6", tables.pool6)):
            view = self.array(name)
            view[:] = 0
            if entries:
                idx = np.fromiter(entries.keys(), np.int64, len(entries))
                val = np.array(list(entries.values()), np.uint32)
                view[idx, :8] = val.view(np.uint8).reshape(-1, 8)
        src_hash = self.bpf["zt_src_hash"]
        src_hash.clear()
        for (family, addr), (ident, device) in tables.src_hash.items():
            key = src_hash.Key()
            ctypes.memmove(ctypes.byref(key), SRC_KEY.pack(family, addr), SRC_KEY.size)
            src_hash[key] = src_hash.Leaf(ident, device)

        self._write("zt_idents", _pad(tables.idents, lay.who_words, 0))
        self._write("zt_nodes", tables.nodes)
        self._write("zt_classes", tables.classes)
        pt = np.full((len(tables.port_tables), 2, lay.port_slots), PORT_END, np.uint32)
        pt[:, 1, :] = 0
        pt[:, :, :tables.port_tables.shape[2]] = tables.port_tables
        self._write("zt_port_tables", pt)
        self._write("zt_services", _pad(tables.services, lay.max_cands, 0))
        self._write("zt_sport", _pad(tables.sport, lay.sport_words, 0))
        self.bpf["zt_rule_stats"].clear()

    # -----------------------------------------------------------------------------------------
    # changes in place: a live gateway, no reload

    def _pool_slot(self, addr: Address) -> Optional[tuple[str, int]]:
        """(pool map, slot) of an address inside the layout's pools; None: the hash holds it."""
        name, base = ("zt_pool4", self.layout.pool4_base) if addr.version == 4 else ("zt_pool6", self.layout.pool6_base)
        if int(addr) >> POOL_BITS != base >> POOL_BITS:
            return None
        return name, int(addr) & ((1 << POOL_BITS) - 1)

    def _src_key(self, addr: Address):
        table = self.bpf["zt_src_hash"]
        key = table.Key()
        ctypes.memmove(ctypes.byref(key), SRC_KEY.pack(addr.version, addr.packed.rjust(16, b"\0")), SRC_KEY.size)
        return table, key

    def set_sources(self, entries: Iterable[tuple[Address, int, int]]) -> None:
        """Write (address, identity class, device id) entries; ident 0 removes the address.

        The kernel sees each entry whole. A pool slot is one aligned 8-byte store into the
        mmapped array ({ident, device} is 8 bytes at an 8-aligned offset, and numpy stores an
        aligned uint64 scalar with one instruction); the program reads the slot with one
        8-byte load. A hash entry is one bpf_map_update_elem or delete_elem, which replaces
        the element under RCU. Entries are written one after another, not as a transaction."""
        for addr, ident, device in entries:
            if not 0 <= ident < self.layout.max_idents and ident != IDENT_EXPIRED:
                raise ValueError(f"{addr}: identity class {ident} is outside 0..{self.layout.max_idents - 1}")
            if not 0 <= device < 1 << 32:
                raise ValueError(f"{addr}: device id {device} does not fit 32 bits")
            slot = self._pool_slot(addr)
            if slot is not None:
                words = self.array(slot[0]).view(np.uint64)
                words[slot[1], 0] = (ident | device << 32) if ident else 0    # SRC: ident, then device
                continue
            table, key = self._src_key(addr)
            if ident:
                table[key] = table.Leaf(ident, device)
            else:
                try:
                    del table[key]
                except KeyError:
                    pass

    def sources_of(self, addresses: Iterable[Address]) -> list[tuple[Address, int, int]]:
        """What the kernel holds now for these addresses, as set_sources() takes it ((a, 0, 0):
        nothing): the undo of a set_sources()."""
        out = []
        for addr in addresses:
            slot = self._pool_slot(addr)
            if slot is not None:
                value = int(self.array(slot[0]).view(np.uint64)[slot[1], 0])
                out.append((addr, value & 0xFFFFFFFF, value >> 32))
                continue
            table, key = self._src_key(addr)
            try:
                leaf = table[key]
            except KeyError:
                out.append((addr, 0, 0))
            else:
                out.append((addr, leaf.ident, leaf.device))
        return out

    def set_idents(self, first_id: int, rows) -> None:
        """Write identity-class rows (who-bits as uint64 words, (n, words)) at first_id, ...

        Each word is one aligned 8-byte store, so the kernel sees every word whole; a row of
        several words is not written at once, and a packet decided meanwhile may see some words
        old and some new. So a class that sources point at should not be rewritten: write the
        new bits at a free id and move the sources there with set_sources (as the gateway does)."""
        rows = np.asarray(rows, np.uint64)
        if rows.ndim == 1:
            rows = rows[None, :]
        n, width = rows.shape
        if first_id < 1 or first_id + n > self.layout.max_idents:
            raise ValueError(f"identity classes {first_id}..{first_id + n - 1}: outside "
                             f"1..{self.layout.max_idents - 1}")
        if width > self.layout.who_words:
            raise ValueError(f"rows of {width} words: this build holds {self.layout.who_words}")
        words = self.array("zt_idents").view(np.uint64)
        words[first_id:first_id + n, :width] = rows
        words[first_id:first_id + n, width:] = 0


def _pad(rows: np.ndarray, width: int, fill) -> np.ndarray:
    """Widen the second axis of `rows` to `width` (the program's capacity)."""
    if rows.shape[1] == width:
        return rows
    out = np.full((rows.shape[0], width) + rows.shape[2:], fill, rows.dtype)
    out[:, :rows.shape[1]] = rows
    return out
