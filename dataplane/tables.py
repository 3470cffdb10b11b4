"""The policy's maps of one program (dataplane/program.py's POLICY_MAPS), written from
compiled tables (control/compiler.py's Tables). Each map holds two banks (ebpf/maps.h
zt_bank): the bank in force decides, and a new build is written into the other one, entry by
entry where it differs from what that bank holds, then made the one in force by one store into
zt_bank. Device changes write entries of the bank in force. The big arrays are mmapped: the
diff is a numpy compare and the writes are memory stores."""
from __future__ import annotations

import ctypes
import ipaddress
import mmap
import time
from typing import Iterable, Optional, Union

import numpy as np

from .errors import TablesDoNotFit
from .layout import POOL_BITS, Layout
from .libbpf import percpu_array, possible_cpus
from .mirrors import CAND_CHAIN, COUNTER, IDENT_EXPIRED, PORT_END, SRC_KEY, SRC_KEY_BANK, WHO_NEVER

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
SETTLE = 0.002   # (dataplane/conntrack.py's): a packet that read a bank has finished with it after this


class PolicyTables:
    """The policy maps of a loaded program (bcc's BPF object), compiled for LAYOUT. A program
    built from an ebpf/ tree before the banks (scripts/bench --against-source) has one bank
    and no zt_bank: everything is written into bank 0 and flip() is refused."""

    def __init__(self, bpf, layout: Layout, build: int = 0, bank: int = 0):
        self.bpf = bpf
        self.layout = layout
        self._maps: dict[str, mmap.mmap] = {}
        try:
            bpf["zt_bank"]
            self.banks = 2
        except KeyError:
            self.banks = 1
        self.bank = bank              # the bank in force (an adopted program's: dataplane/pinned.py)
        self.build = build            # the build it holds (events and conntrack carry it)
        self._left = [0.0, 0.0]       # when each bank stopped being in force (perf_counter)
        # what each bank of zt_src_hash holds (the arrays are read back through their mmap),
        # and of the pools (to skip their compare when nothing changed: a C-speed dict compare)
        self._hashed: list[dict] = [{}, {}]
        self._pooled: list[dict] = [{}, {}]
        if self.banks == 2:
            self._select(bank, build)

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()

    def array(self, name: str) -> np.ndarray:
        """A writable byte view of an mmapable array map, every bank: (max_entries, value stride)."""
        table = self.bpf[name]
        stride = (ctypes.sizeof(table.Leaf) + 7) & ~7
        entries = table.max_entries
        mm = self._maps.get(name)
        if mm is None:
            size = (stride * entries + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
            mm = self._maps[name] = mmap.mmap(table.get_fd(), size, mmap.MAP_SHARED,
                                               mmap.PROT_READ | mmap.PROT_WRITE)
        return np.frombuffer(mm, np.uint8, stride * entries).reshape(entries, stride)

    def in_bank(self, name: str, bank: Optional[int] = None) -> np.ndarray:
        """The rows of one bank (default: the one in force) of an mmapable array map."""
        view = self.array(name)
        per = len(view) // self.banks
        bank = self.bank if bank is None else bank
        return view[bank * per:(bank + 1) * per]

    def _write(self, name: str, rows: np.ndarray, bank: int) -> int:
        """Make BANK of NAME hold ROWS (and zeros after them), writing only the rows that
        differ: how many were written."""
        view = self.in_bank(name, bank)
        flat = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
        n, width = flat.shape
        changed = np.flatnonzero((view[:n, :width] != flat).any(axis=1))
        view[changed, :width] = flat[changed]
        stale = np.flatnonzero(view[n:].any(axis=1))
        view[n + stale] = 0
        return len(changed) + len(stale)

    def _write_pool(self, name: str, entries: dict, bank: int) -> int:
        if self._pooled[bank].get(name) == entries:
            return 0
        self._pooled[bank][name] = dict(entries)
        words = self.in_bank(name, bank).view(np.uint64)[:, 0]
        want = np.zeros(len(words), np.uint64)
        if entries:
            idx = np.fromiter(entries.keys(), np.int64, len(entries))
            val = np.array(list(entries.values()), np.uint32)
            want[idx] = val.view(np.uint64).ravel()
        changed = np.flatnonzero(words != want)
        words[changed] = want[changed]
        return len(changed)

    def _write_hash(self, entries: dict, bank: int) -> int:
        held, table = self._hashed[bank], self.bpf["zt_src_hash"]
        gone = [k for k in held if k not in entries]
        for family, addr in gone:
            try:
                del table[self._hash_key(family, addr, bank)]
            except KeyError:
                pass
            del held[(family, addr)]
        written = 0
        for (family, addr), value in entries.items():
            if held.get((family, addr)) != value:
                table[self._hash_key(family, addr, bank)] = table.Leaf(*value)
                held[(family, addr)] = value
                written += 1
        return len(gone) + written

    def hashed(self) -> int:
        """Entries the bank in force holds in zt_src_hash."""
        return len(self._hashed[self.bank])

    def _hash_key(self, family: int, addr: bytes, bank: int):
        key = self.bpf["zt_src_hash"].Key()
        ctypes.memmove(ctypes.byref(key), SRC_KEY.pack(family | bank << SRC_KEY_BANK, addr), SRC_KEY.size)
        return key

    def load(self, tables, bank: Optional[int] = None) -> int:
        """Make BANK (default: the one in force) hold `tables` (from control.compiler), writing
        only the entries that differ from what it holds, and its rule counters start at zero.
        The tables must fit the layout. Returns how many entries were written."""
        lay = self.layout
        short = lay.shortfalls(tables.need)
        if short:
            raise TablesDoNotFit(short)
        bank = self.bank if bank is None else bank
        if bank != self.bank:   # packets that read it before it left force are done with it
            time.sleep(max(0.0, self._left[bank] + SETTLE - time.perf_counter()))
        written = self._write_pool("zt_pool4", tables.pool4, bank) + self._write_pool("zt_pool6", tables.pool6, bank)
        written += self._write_hash(tables.src_hash, bank)
        written += self._write("zt_idents", _pad(tables.idents, lay.who_words, 0), bank)
        written += self._write("zt_nodes", tables.nodes, bank)
        written += self._write("zt_classes", tables.classes, bank)
        pt = np.full((len(tables.port_tables), 2, lay.port_slots), PORT_END, np.uint32)
        pt[:, 1, :] = 0
        pt[:, :, :tables.port_tables.shape[2]] = tables.port_tables
        written += self._write("zt_port_tables", pt, bank)
        written += self._write("zt_services", service_rows(_pad(tables.services, lay.max_cands, 0), lay), bank)
        written += self._write("zt_sport", _pad(tables.sport, lay.sport_words, 0), bank)
        self.clear_rule_stats(bank)
        return written

    def clear_rule_stats(self, bank: int) -> None:
        """Zero one bank's rule counters (only the entries that counted something)."""
        stats = self.bpf["zt_rule_stats"]
        if self.banks == 1:
            stats.clear()
            return
        per = stats.max_entries // self.banks
        counts = percpu_array(stats, "zt_rule_stats", COUNTER, possible_cpus())
        used = np.flatnonzero(counts["packets"][bank * per:(bank + 1) * per].any(axis=1))
        for rid in used:
            stats.clearitem(ctypes.c_int(int(rid) + bank * per))

    def flip(self, build: int) -> None:
        """Put the other bank in force, holding BUILD: one aligned 8-byte store into zt_bank."""
        if self.banks != 2:
            raise TablesDoNotFit(["this program has one bank"])
        self._left[self.bank] = time.perf_counter()
        self._select(1 - self.bank, build)

    def _select(self, bank: int, build: int) -> None:
        if not 0 <= build < 1 << 32:
            raise ValueError(f"build {build}: must fit 32 bits")
        # struct zt_bank {bank, build}: one uint64 scalar store, which numpy makes one
        # instruction; the program reads it with one 8-byte load
        self.array("zt_bank").view(np.uint64)[0, 0] = bank | build << 32
        self.bank, self.build = bank, build

    # -----------------------------------------------------------------------------------------
    # changes in place: a live gateway, no reload

    def _pool_slot(self, addr: Address) -> Optional[tuple[str, int]]:
        """(pool map, slot) of an address inside the layout's pools; None: the hash holds it."""
        name, base = ("zt_pool4", self.layout.pool4_base) if addr.version == 4 else ("zt_pool6", self.layout.pool6_base)
        if int(addr) >> POOL_BITS != base >> POOL_BITS:
            return None
        return name, int(addr) & ((1 << POOL_BITS) - 1)

    def _src_key(self, addr: Address):
        return self.bpf["zt_src_hash"], self._hash_key(addr.version, addr.packed.rjust(16, b"\0"), self.bank)

    def set_sources(self, entries: Iterable[tuple[Address, int, int]]) -> None:
        """Write (address, identity class, device id) entries into the bank in force; ident 0
        removes the address.

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
                words = self.in_bank(slot[0]).view(np.uint64)
                words[slot[1], 0] = (ident | device << 32) if ident else 0    # SRC: ident, then device
                self._pooled[self.bank].pop(slot[0], None)     # (compared whole at the next load)
                continue
            table, key = self._src_key(addr)
            held = self._hashed[self.bank]
            if ident:
                table[key] = table.Leaf(ident, device)
                held[(addr.version, addr.packed.rjust(16, b"\0"))] = (ident, device)
            else:
                held.pop((addr.version, addr.packed.rjust(16, b"\0")), None)
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
                value = int(self.in_bank(slot[0]).view(np.uint64)[slot[1], 0])
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
        words = self.in_bank("zt_idents").view(np.uint64)
        words[first_id:first_id + n, :width] = rows
        words[first_id:first_id + n, width:] = 0


def service_rows(services: np.ndarray, layout: Layout) -> np.ndarray:
    """One bank's rows of zt_services for these services ((n, max_cands) CAND): the lists as
    compiled; in a build with hostnames (name_words > 0), then, from row max_services on, each
    list again without its name candidates (ebpf/maps.h zt_services: what a packet whose
    destination was learned for no name walks)."""
    if not layout.name_words:
        return services
    out = np.zeros((2 * layout.max_services, services.shape[1]), services.dtype)
    out[:len(services)] = services
    out[layout.max_services:layout.max_services + len(services)] = without_names(services)
    return out


def without_names(rows: np.ndarray) -> np.ndarray:
    """Service rows ((n, cands) CAND) without their name candidates, the others in their order,
    zeros after: row by row, so it applies to any subset of a table's rows. A name candidate
    holds only for a destination learned for a name, and the list's unconditional end has no
    name: for any other destination, each row decides as its original does."""
    keep = rows["name"] == 0
    order = np.argsort(~keep, axis=1, kind="stable")   # the kept first, each side in its order
    out = np.take_along_axis(rows, order, axis=1)
    out[~np.take_along_axis(keep, order, axis=1)] = np.zeros((), rows.dtype)
    # A service of a chain (its last entry goes on elsewhere: ebpf/maps.h) keeps its entries in
    # place, a name candidate becoming one that never holds: zeros before its chain entry would
    # decide (they read as the default's entry).
    chained = rows["action"][:, -1] == CAND_CHAIN
    if chained.any():
        out[chained] = rows[chained]
        out["who"][chained] = np.where(keep[chained], rows["who"][chained], WHO_NEVER)
        out["name"][chained] = 0
    return out


def _pad(rows: np.ndarray, width: int, fill) -> np.ndarray:
    """Widen the second axis of `rows` to `width` (the program's capacity)."""
    if rows.shape[1] == width:
        return rows
    out = np.full((rows.shape[0], width) + rows.shape[2:], fill, rows.dtype)
    out[:, :rows.shape[1]] = rows
    return out
